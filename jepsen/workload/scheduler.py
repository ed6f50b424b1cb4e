"""The scheduler of the fault-injection workload: waves of tasks, each wave
depending on the one before, for as long as the run lasts.

The harness copies this file into the run directory with the constants
below replaced (``WORKLOAD_SEED`` etc.), so that every replica runs the same
code.  Wave ``w`` has ``WIDTH`` ``leaf`` tasks whose inputs are the total of
wave ``w - 1`` and a number drawn from ``random.Random(WORKLOAD_SEED * 100003 + w)``;
a ``total`` task sums them.  Every ``REPLICATE_EVERY``-th leaf runs with
``replicas=2``.  Between the leaves and the total every ``DECOY_EVERY``-th
wave starts one ``decoy`` task (it sleeps 6-10 s, nothing depends on it): the
harness cancels some decoys with ``tasksprint cancel`` while they run, so a
cancelled task is expected not to complete, and everything else is expected
to.  Task ids are handed out in start order from 1, so wave ``w``'s decoy is
:func:`decoy_tid`.
Waves continue until ``RUN_FOR`` seconds (of the log's own clock,
``self.now``) have passed since ``init``; then the last total
finishes the computation with everything a checker needs: the totals, the
tids started, the tids seen in ``task_done`` in order, each completion's
``[tid, attempt, client]``, and what became of the decoys that did not
complete: before finishing, the scheduler kills every one of them with
``kill_task``; those it killed were still active (``decoys_open_at_finish``),
those already killed were cancelled from the command line
(``decoys_cancelled``).  :func:`expected_totals` recomputes the totals
from the seed alone.
"""

import random

from tasksprint import Coordinator

WORKLOAD_SEED = 0
WIDTH = 6
LEAF_SLEEP = 0.2
RUN_FOR = 20.0
REPLICATE_EVERY = 4
DECOY_EVERY = 5
DECOY_SLEEP = (6.0, 10.0)
MOD = 1_000_003


def decoy_tid(wave, width):
    """The task id of wave ``wave``'s decoy (None if it has none).

    A wave starts ``width`` leaves, then its decoy if ``wave % DECOY_EVERY == 0``, then its total.
    """
    if wave % DECOY_EVERY:
        return None
    decoys_before = (wave + DECOY_EVERY - 1) // DECOY_EVERY
    return 1 + wave * (width + 1) + decoys_before + width


def newest_decoy(started, width):
    """The highest decoy task id among the first ``started`` tasks, or None."""
    wave = started // (width + 1)
    while wave >= 0:
        tid = decoy_tid(wave, width)
        if tid is not None and tid <= started:
            return tid
        wave -= 1
    return None


def decoy_sleep(seed, wave):
    return round(random.Random(seed * 7919 + wave).uniform(*DECOY_SLEEP), 3)


def wave_inputs(seed, wave, width):
    rng = random.Random(seed * 100003 + wave)
    return [rng.randint(1, 1000) for _ in range(width)]


def expected_totals(seed, waves, width):
    """The total of each wave, computed without the cluster."""
    totals, prev = [], 0
    for w in range(waves):
        leaves = [(31 * prev + x) % MOD for x in wave_inputs(seed, w, width)]
        prev = sum(leaves) % MOD
        totals.append(prev)
    return totals


class JepsenWaves(Coordinator):
    def init(self, seed):
        self.t0 = self.now
        self.started = []
        self.done = []
        self.records = []
        self.totals = []
        self.decoys = []
        self.wave = 0
        self.total_tid = None
        self._start_wave(None)

    def _start(self, name, **kw):
        tid = self.start_task(name, keys=["v", "rec"], **kw)
        self.started.append(tid)
        return tid

    def _start_wave(self, prev_total):
        leaves = []
        for i, x in enumerate(wave_inputs(WORKLOAD_SEED, self.wave, WIDTH)):
            kw = {"args": [x], "kwargs": {"sleep": LEAF_SLEEP}}
            if prev_total is not None:
                kw["pretasks"] = [prev_total]
                kw["prekeys"] = ["v"]
            if (self.wave * WIDTH + i) % REPLICATE_EVERY == 0:
                kw["replicas"] = 2
            leaves.append(self._start("leaf", **kw))
        if self.wave % DECOY_EVERY == 0:
            sleep = decoy_sleep(WORKLOAD_SEED, self.wave)
            self.decoys.append(self._start("decoy", args=[self.wave], kwargs={"sleep": sleep}))
        self.total_tid = self._start("total", pretasks=leaves, prekeys=["v"] * len(leaves))

    def task_killed(self, tid):
        # The harness cancels decoys from the command line; the waves never wait for them
        # (the finish below tells cancelled decoys from those still open).
        pass

    def task_done(self, tid, values):
        self.done.append(tid)
        self.records.append(values.get("rec"))
        if not self.t0:
            # init may be applied before the first TICK (now == 0).
            self.t0 = self.now
        if tid != self.total_tid:
            return
        self.totals.append(values["v"])
        self.wave += 1
        if self.now - self.t0 < RUN_FOR:
            self._start_wave(tid)
            return
        completed = set(self.done)
        open_at_finish, cancelled = [], []
        for d in self.decoys:
            if d not in completed:
                # kill_task returns [] for a task already killed: only a command-line cancel does that.
                (open_at_finish if self.kill_task(d) else cancelled).append(d)
        self.finish(
            taskids=[tid],
            values={
                "waves": self.wave,
                "totals": self.totals,
                "started": self.started,
                "done": self.done,
                "records": self.records,
                "decoys": self.decoys,
                "decoys_open_at_finish": open_at_finish,
                "decoys_cancelled": cancelled,
            },
        )

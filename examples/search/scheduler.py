#!/usr/bin/env python3
"""Proof-of-work search, the scheduler: find a nonce, then kill the rest.

The nonce space is cut into ranges of ``RANGE`` nonces, one ``search`` task
per range.  ``WINDOW`` tasks are kept started at any time, more than the
workers can run at once, so there are always tasks waiting; each range that
comes back empty is replaced by the next one.  The first task to report a
nonce ends the search: the scheduler kills every other task (``kill_task``
frees the workers at once and drops the waiting tasks) and finishes with the
nonce, its hash and the ids of the killed tasks.

The prefix (the "block" being mined) is drawn with ``self.random``, so every
replica searches for the same thing.

Run it with
``tasksprint run examples/search/scheduler.py:SearchCoordinator --node "python examples/search/node.py"``.
"""

from tasksprint import Coordinator

DIFFICULTY = 6  # leading zero hex digits: about 16.8 million hashes on average
RANGE = 1 << 21  # nonces per task, about a second of hashing
WINDOW = 12  # tasks started at once (pending or running)
MAX_TASKS = 400  # give up after this many ranges (about 50 times the expected work)


class SearchCoordinator(Coordinator):
    def init(self, seed):
        self.prefix = "tasksprint-block-%016x:" % self.random.getrandbits(64)
        self.next_start = 0
        self.started = 0
        self.active = []  # ids of started tasks not done yet, in start order
        self.empty = 0  # ranges searched without a hit
        self.hashes = 0
        for _ in range(WINDOW):
            self.start_range()

    def start_range(self):
        tid = self.start_task(
            name="search",
            args=[self.prefix, self.next_start, RANGE, DIFFICULTY],
            keys=["found"],
        )
        self.next_start += RANGE
        self.started += 1
        self.active.append(tid)

    def task_done(self, tid, values):
        self.active.remove(tid)
        found = values["found"]
        self.hashes += found["tried"]
        if found["nonce"] is None:
            self.empty += 1
            if self.started < MAX_TASKS:
                self.start_range()
            elif not self.active:
                self.finish(values=self.summary(tid, found, []))
            return
        killed = []
        for other in list(self.active):
            killed.extend(self.kill_task(other))
        self.active = []
        print("nonce %d found by task %d; killed tasks %s" % (found["nonce"], tid, killed))
        self.finish(taskids=[tid], values=self.summary(tid, found, killed))

    def summary(self, tid, found, killed):
        return {
            "prefix": self.prefix,
            "difficulty": DIFFICULTY,
            "nonce": found["nonce"],
            "hash": found["hash"],
            "found_by": tid,
            "killed": killed,
            "tasks_started": self.started,
            "ranges_empty": self.empty,
            "hashes_reported": self.hashes,
        }


SearchCoordinator().start()

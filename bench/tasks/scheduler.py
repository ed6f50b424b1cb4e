#!/usr/bin/env python3
"""The schedulers of the task-throughput benchmark (``bench/tasks.py``).

Each workload waits until every expected worker client has joined, then
starts all of its tasks in the ``client_joined`` hook that saw the last one
join, so the measured time starts with a warm cluster (the replicas log
``client_joined`` with a timestamp when they apply that entry) and ends with
``finish`` (logged as ``computation_finished``).

The harness passes the sizes in the environment of the replica processes;
every replica gets the same environment, so every copy of the scheduler
starts the same tasks:

* ``TASKSPRINT_BENCH_N``: tasks (independent), map tasks (mapreduce) or
  chain length (chain);
* ``TASKSPRINT_BENCH_CLIENTS``: worker clients to wait for.
"""

import os

from tasksprint import Coordinator


class _Bench(Coordinator):
    def init(self, seed):
        self.n = int(os.environ.get("TASKSPRINT_BENCH_N", "100"))
        self.expected = int(os.environ.get("TASKSPRINT_BENCH_CLIENTS", "1"))
        self.joined = 0
        self.started = False
        self.done = 0

    def client_joined(self, cid):
        self.joined += 1
        if self.joined >= self.expected and not self.started:
            self.started = True
            self.begin()

    def begin(self):
        raise NotImplementedError


class IndependentCoordinator(_Bench):
    """``n`` independent no-op tasks; finishes when all are done."""

    def begin(self):
        for _ in range(self.n):
            self.start_task(name="noop", retries=0)

    def task_done(self, tid, values):
        self.done += 1
        if self.done == self.n:
            self.finish(values={"done": self.done})


class MapReduceCoordinator(_Bench):
    """``n`` map tasks and one reduce over the small output of each."""

    def begin(self):
        maps = [self.start_task(name="map", args=[i], retries=0) for i in range(self.n)]
        self.final = self.start_task(
            name="reduce", pretasks=maps, prekeys=["small"] * len(maps), keys=["sum", "n"], retries=0
        )

    def task_done(self, tid, values):
        if tid == self.final:
            self.finish(taskids=[tid])


class ChainCoordinator(_Bench):
    """``n`` tasks, each taking the previous one's output; the whole chain is started at once."""

    def begin(self):
        prev = self.start_task(name="step", args=[0], retries=0)
        for i in range(1, self.n):
            keys = ["v"] if i == self.n - 1 else []
            prev = self.start_task(name="step", args=[i], pretasks=[prev], prekeys=["v"], keys=keys, retries=0)
        self.final = prev

    def task_done(self, tid, values):
        if tid == self.final:
            self.finish(taskids=[tid])

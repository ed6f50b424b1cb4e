#!/usr/bin/env python3
"""The node of the task-throughput benchmark (``bench/tasks.py``).

Every method is as cheap as a task can be, so the benchmark measures what
the system spends around a task, not the task itself.
"""

from tasksprint_sdk.node import Node


class BenchNode(Node):
    def noop(self):
        return {}

    def map(self, i):
        # One small output the reduce takes, one bigger output that stays put.
        return {"small": i, "big": "x" * 1000}

    def reduce(self, *smalls):
        return {"sum": sum(smalls), "n": len(smalls)}

    def step(self, *prev_and_i):
        # step(i) for the first link of the chain, step(prev, i) for the others.
        prev = prev_and_i[0] if len(prev_and_i) == 2 else 0
        return {"v": prev + 1}


if __name__ == "__main__":
    BenchNode().start()

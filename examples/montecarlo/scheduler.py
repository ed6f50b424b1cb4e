#!/usr/bin/env python3
"""Monte Carlo estimate of pi: the scheduler.

Eleven ``montecarlo`` tasks sample points; one ``merge`` task combines their
counts, and its result ends the computation.  Run it with
``tasksprint run examples/montecarlo/scheduler.py:MonteCarloCoordinator``.
"""
from tasksprint import Coordinator
class MonteCarloCoordinator(Coordinator):
  def init(self, seed):
    alltasks = [self.start_task(name="montecarlo") for i in range(11)]
    self.final = self.start_task(name="merge", prekeys=["result" for i in range(len(alltasks))], pretasks=alltasks, keys=["result"])
  def client_joined(self, cid): print("Somebody joined! %d" % cid)
  def client_dead(self, cid): print("Somebody died :( %d" % cid)
  def task_done(self, tid, values):
    if tid == self.final: self.finish(taskids=[tid], values=values)
    print("Task %d is done. Result: %s" % (tid, values))
MonteCarloCoordinator().start()

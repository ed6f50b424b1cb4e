"""Fault injection against real TaskSprint processes in Linux network namespaces.

See jepsen/README.md.  Entry point: ``jepsen/run`` (:func:`jepsen.harness.runner.main`).
"""

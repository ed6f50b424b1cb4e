"""The read-only web dashboard and the cluster's read model.

:mod:`~tasksprint.readmodel` polls the replicas (their own
status, the computation's status, one task's info) into typed snapshots and
keeps a short time series of what it polled; :mod:`~tasksprint.dashboard.server`
serves pages, server-sent events and ``/metrics`` from it.  Nothing here keeps
state the replicas do not have, except that short history.
"""

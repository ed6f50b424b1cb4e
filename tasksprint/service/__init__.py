"""The long-running TaskSprint service: a queue of command tasks submitted at any time.

:mod:`~tasksprint.service.scheduler` is the built-in replicated queue
scheduler (a ``Coordinator`` like any user's); :mod:`~tasksprint.service.home`
the state directory (credentials, addresses); :mod:`~tasksprint.service.api`
the Python client (``tasksprint.connect``); :mod:`~tasksprint.service.server`
runs the replicas; :mod:`~tasksprint.service.commands` what ``tasksprint
server``, ``worker``, ``new``, ``wait``, ``logs``, ``tags`` and ``drain`` do.
"""

"""TaskSprint: fault-tolerant distributed computation.

``from tasksprint import Coordinator, Node`` gives the user-facing SDK;
``tasksprint.connect()`` (and ``aconnect()`` for trio) the service's client
(:mod:`tasksprint.service.api`).  The names are resolved lazily so that
importing a runtime module (the Paxos core, the replica) does not import the
SDK, and vice versa.
"""

__all__ = ["Coordinator", "Node", "aconnect", "connect", "timeout"]


def __getattr__(name: str):
    if name in ("connect", "aconnect"):
        from tasksprint.service import api

        return getattr(api, name)
    if name in __all__:
        import tasksprint_sdk

        return getattr(tasksprint_sdk, name)
    raise AttributeError(f"module 'tasksprint' has no attribute {name!r}")

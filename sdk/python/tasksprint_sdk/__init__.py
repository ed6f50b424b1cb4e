"""The TaskSprint SDK: what users program against.

``Coordinator`` is the base class of a scheduler, ``Node`` the base class of
a node (the worker program), ``timeout`` the decorator that bounds a node
method's running time.  ``tasksprint`` re-exports all three.
"""

from tasksprint_sdk.coordinator import Coordinator
from tasksprint_sdk.node import Node, timeout

__all__ = ["Coordinator", "Node", "timeout"]

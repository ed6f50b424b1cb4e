"""A deterministic simulator for the Multi-Paxos core, driven by one integer seed.

Theory of operation
-------------------
A :class:`Cluster` is the world: N replicas, each a ``PaxosCore`` plus an
``Applier(KVMachine)`` plus a "disk" (a :class:`DurableState` that survives
crashes), a few :class:`Client` objects, and a :class:`Checker` that holds
the ground truth and raises :class:`SimFailure` as soon as an invariant
breaks.  The cluster does not decide *when* anything happens: the network is
a callback (``Cluster.net``) and every fault is a method call.  Two drivers
decide:

* :class:`Simulation` draws everything from ``random.Random(seed)``: message
  delays (hence reordering), drops, duplicates, partitions into arbitrary
  groups, crashes (also in the middle of a driver pass: after a Ready's
  messages left but before its records were durable, after they were durable
  but before ``advance``, or right after applying a slot), wiped disks, pauses (a replica stops, then resumes with its
  state and a backlog, like a stopped VM), clock skew and jumps, fsyncs that
  take time while messages keep arriving (with several Readies' writes in
  flight at once, as the replica's writer has them), and stragglers (a message held back
  for seconds, so stale answers arrive).  It then heals everything and requires every client
  to finish within a bounded simulated time.  Re-running a seed replays it
  exactly; a failure names its seed.
* ``tests/test_simulation.py`` also drives a cluster from a hypothesis
  ``RuleBasedStateMachine`` whose rules are single deliveries and faults, and
  hands the cluster to :class:`Simulation` for the final liveness phase.

Each replica is driven by the replica process's own driver,
:class:`~tasksprint.driver.ReplicaDriver`, so the order of writes, sends and
applies under test is the one that runs in production.  The simulator gives it
a disk (writes in the calling thread go to the replica's ``DurableState`` at
once), a background writer whose writes complete at scheduled simulated times,
in order (in the asynchronous mode every synced write goes there, so several
Readies' writes are in flight at once), mailboxes that hand messages to the
network, and the replica's simulated clock.  A crash keeps an in-order prefix
of the queued writes; a crash inside a pass (before or after a write, after
applying a slot) is an exception raised from the disk or the applier.

What the checker verifies after every step (see :class:`Checker`):

* agreement: every value a replica learns, persists as chosen or applies at a
  slot equals every other one, and equals the value a majority of acceptors
  durably accepted at one ballot (the oracle counts real votes on disks, so a
  wrong value is caught even before anybody applies it; votes on a wiped disk
  stop counting); one ballot never carries two values for one slot;
* validity: every applied command was submitted by a client, every TICK
  carries a clock reading and the tick data of the replica that proposed it;
* exactly-once: in every replica's KV state each appended value appears at
  most once, and each result handed to a client points at its own value;
* the applied index only grows within a life, and after a restart from an
  intact disk the replica still knows everything it had applied as chosen;
* equal digests at equal applied index;
* at the end: every acknowledged command is in the state of every live
  replica, no replica is stuck recovering, and every client got all its
  answers within the bound.

Modules: ``common`` (keys, errors, the small Paxos limits), ``clients``,
``checker`` (the ground truth), ``adapters`` (what each replica's driver gets
instead of I/O), ``cluster`` (the world), ``manual_net`` (explicit
deliveries), ``simulation`` (the seeded driver); ``python -m tests.sim SEED
[N]`` replays one seed and prints its last events.
"""

from .adapters import CheckedApplier, Link, Node, SimDisk, SimWriter
from .checker import Checker
from .clients import Client, Outstanding
from .cluster import Cluster
from .common import KEYS, Crashed, SimFailure, load, sim_config
from .manual_net import ManualNet
from .simulation import Knobs, Simulation, run_seed

__all__ = [
    "KEYS",
    "CheckedApplier",
    "Checker",
    "Client",
    "Cluster",
    "Crashed",
    "Knobs",
    "Link",
    "ManualNet",
    "Node",
    "Outstanding",
    "SimDisk",
    "SimFailure",
    "SimWriter",
    "Simulation",
    "load",
    "run_seed",
    "sim_config",
]

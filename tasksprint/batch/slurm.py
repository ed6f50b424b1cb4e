"""Under Slurm: the allocation as engines, where the replicas go, and which idle nodes to release.

Pure decisions; ``tasksprint batch`` (:mod:`tasksprint.batch_command`) runs
the commands they lead to (``srun``, ``scontrol``).

* :func:`slurm_nodes` reads the allocation (``SLURM_JOB_NODELIST`` expanded,
  ``SLURM_JOB_CPUS_PER_NODE``): one engine per node.
* :func:`slurm_slots`: how many tasks each node runs at once, as disBatch
  decides it: the job's tasks there (``SLURM_TASKS_PER_NODE``, so
  ``sbatch -n 20 -c 4`` runs 20 at once), at most cores // cores per task.
* :func:`node_addresses` reads where each node listens (``NodeAddr`` of
  ``scontrol show node -o``): a node's name need not resolve (several
  slurmd on one machine, or names that are Slurm's only).
* :func:`replica_hosts` spreads the replicas over up to three of its nodes,
  the driver's first, so that losing one node loses at most one replica of
  three (with five replicas on three nodes, at most two).
* Retiring, as disBatch does it: once no batch task will start any more, an
  engine with nothing running or placed there can never get work again
  (:func:`engines_to_retire`, from the batch scheduler's answer); the driver
  stops its client and runs the retire command with disBatch's environment
  (:func:`retire_environment`).
  The default command is disBatch's (:data:`DEFAULT_RETIRE_COMMAND`), which
  shrinks the job to the nodes still in use; a node that holds a replica or
  the driver stays in use until the run ends.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from tasksprint.batch.scheduler import engine_name

__all__ = [
    "DEFAULT_RETIRE_COMMAND",
    "MAX_REPLICA_NODES",
    "engines_to_retire",
    "kept_nodes",
    "node_addresses",
    "replica_hosts",
    "retire_environment",
    "same_host",
    "slurm_counts",
    "slurm_nodes",
    "slurm_slots",
]

#: disBatch's retire command under Slurm: the job keeps the driver's node and the nodes still active.
DEFAULT_RETIRE_COMMAND = 'scontrol update JobId="$SLURM_JOBID" NodeList="${DRIVER_NODE:+$DRIVER_NODE,}$ACTIVE"'
#: Replicas are spread over at most this many nodes (three replicas, one each).
MAX_REPLICA_NODES = 3

_SLURM_COUNT = re.compile(r"([0-9]+)(?:\(x([0-9]+)\))?")
_NODE_FIELD = re.compile(r"(?:^|\s)(NodeName|NodeAddr)=(\S{1,255})")
# ``scontrol show node -o`` prints one line of a few hundred characters per node.
_MAX_NODE_LINE = 16384


def slurm_counts(text: str) -> list[int]:
    """Slurm's compressed per-node counts (``SLURM_JOB_CPUS_PER_NODE``): ``"16(x2),8"`` is [16, 16, 8].

    Raises ValueError naming the item that is not such a count.
    """
    out: list[int] = []
    for item in text.split(","):
        m = _SLURM_COUNT.fullmatch(item.strip())
        if m is None or len(item) > 40:
            raise ValueError(f"{item!r:.60} is not a Slurm count such as 16 or 16(x2)")
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


def slurm_nodes(environ: Mapping[str, str], hostnames: list[str]) -> list[tuple[str, int]]:
    """(node, cores) of a Slurm allocation: ``hostnames`` expanded from ``SLURM_JOB_NODELIST``.

    Cores per node come from ``SLURM_JOB_CPUS_PER_NODE``; ValueError if the two disagree.
    """
    cores = slurm_counts(environ.get("SLURM_JOB_CPUS_PER_NODE", "1"))
    if len(cores) == 1:
        cores *= len(hostnames)
    if len(cores) != len(hostnames):
        raise ValueError(f"SLURM_JOB_CPUS_PER_NODE gives {len(cores)} nodes, SLURM_JOB_NODELIST {len(hostnames)}")
    return list(zip(hostnames, cores, strict=True))


def slurm_slots(
    environ: Mapping[str, str], cores: Sequence[int], *, cpus_per_task: float | None, tasks_per_node: int | None
) -> list[int]:
    """Tasks at once on each node of the allocation (``cores``: each node's), as disBatch decides under Slurm.

    ``tasks_per_node`` (``-t``, else ``SLURM_NTASKS_PER_NODE``) wins; else the
    job's tasks on the node (``SLURM_TASKS_PER_NODE``; without it, no limit)
    but at most cores // cores per task (``-c``, else ``SLURM_CPUS_PER_TASK``,
    else 1).  ValueError naming a variable that is not Slurm's form.
    """
    if tasks_per_node is None and environ.get("SLURM_NTASKS_PER_NODE"):
        (tasks_per_node,) = slurm_counts(environ["SLURM_NTASKS_PER_NODE"])[:1]
    if tasks_per_node:
        return [tasks_per_node] * len(cores)
    if cpus_per_task is None:
        (cpus,) = slurm_counts(environ.get("SLURM_CPUS_PER_TASK") or "1")[:1]
        cpus_per_task = float(max(cpus, 1))
    if cpus_per_task <= 0:
        raise ValueError(f"cpus per task must be positive, not {cpus_per_task}")
    by_cores = [int(c // cpus_per_task) for c in cores]
    if not environ.get("SLURM_TASKS_PER_NODE"):
        return by_cores
    tasks = slurm_counts(environ["SLURM_TASKS_PER_NODE"])
    if len(tasks) == 1:
        tasks *= len(cores)
    if len(tasks) != len(cores):
        raise ValueError(f"SLURM_TASKS_PER_NODE gives {len(tasks)} nodes, SLURM_JOB_NODELIST {len(cores)}")
    return [min(t, c) for t, c in zip(tasks, by_cores, strict=True)]


def node_addresses(text: str) -> dict[str, str]:
    """Each node's address (``NodeAddr``) from ``scontrol show node -o`` output: {name: address}.

    Lines without both fields, or too long to be scontrol's, are left out (the caller falls back to the name).
    """
    out: dict[str, str] = {}
    for line in text.splitlines():
        if len(line) > _MAX_NODE_LINE:
            continue
        fields = {m.group(1): m.group(2) for m in _NODE_FIELD.finditer(line)}
        if "NodeName" in fields and "NodeAddr" in fields:
            out[fields["NodeName"]] = fields["NodeAddr"]
    return out


def same_host(a: str, b: str) -> bool:
    """Whether two host names name one machine, as disBatch compares them (the first label)."""
    return a.split(".", 1)[0] == b.split(".", 1)[0]


def replica_hosts(nodes: Sequence[str], replicas: int, driver: str) -> list[str]:
    """The node of each replica: round robin over up to three nodes, the driver's node first if allocated."""
    if not nodes:
        raise ValueError("no nodes to place the replicas on")
    mine = [n for n in nodes if same_host(n, driver)][:1]
    chosen = (mine + [n for n in nodes if n not in mine])[:MAX_REPLICA_NODES]
    return [chosen[i % len(chosen)] for i in range(replicas)]


def engines_to_retire(retire: Mapping[str, Any] | None, ranks: Iterable[int], retired: Iterable[int]) -> list[int]:
    """Ranks of the engines to retire now, of ``ranks`` (the run's engines) less ``retired``.

    ``retire`` is the batch scheduler's answer: None while a batch task may
    still start (or PERENGINE STOP is due), else ``busy`` (the engines
    running or holding a task) and ``unplaced`` (tasks no engine holds yet:
    then none retires, since any idle one may get them).
    """
    if not isinstance(retire, Mapping) or retire.get("unplaced") != 0:
        return []
    busy = retire.get("busy")
    if not isinstance(busy, list):
        return []
    gone = set(retired)
    return sorted(r for r in set(ranks) if r not in gone and engine_name(r) not in busy)


def kept_nodes(env: Mapping[str, str]) -> set[str]:
    """The nodes the default retire command keeps in the job: ``DRIVER_NODE`` and ``ACTIVE``."""
    return {n for n in [env.get("DRIVER_NODE", ""), *env.get("ACTIVE", "").split(",")] if n}


def retire_environment(
    retiring: Sequence[str],
    codes: Sequence[int],
    engine_nodes: Mapping[int, str],
    live_ranks: Iterable[int],
    keep: Iterable[str],
    driver: str,
) -> dict[str, str]:
    """disBatch's variables for the retire command.

    ``NODES`` the nodes retired now (``RETCODES`` their engines' exit
    codes), ``ACTIVE`` the nodes still in use (an engine still runs there,
    or ``keep``: the replicas' nodes) but the driver's, ``RETIRED`` every
    other node of the run's engines, ``DRIVER_NODE`` the driver's node when
    it is one of the engines' nodes.
    """
    live = set(live_ranks)
    kept = set(keep)
    all_nodes = list(dict.fromkeys(engine_nodes.values()))
    driver_node = next((n for n in all_nodes if same_host(n, driver)), "")
    in_use = {engine_nodes[r] for r in live if r in engine_nodes} | kept
    active = [n for n in dict.fromkeys([*all_nodes, *kept]) if n in in_use and n != driver_node]
    retired = [n for n in all_nodes if n not in in_use and n != driver_node]
    return {
        "NODES": ",".join(retiring),
        "RETCODES": ",".join(str(c) for c in codes),
        "ACTIVE": ",".join(active),
        "RETIRED": ",".join(retired),
        "DRIVER_NODE": driver_node,
    }

"""The scheduler side of the TaskSprint SDK: the ``Coordinator`` base class.

A user's scheduler subclasses :class:`Coordinator` and overrides the hooks
(``init``, ``client_joined``, ``client_dead``, ``task_done``,
``task_failed``).  Every coordinator replica runs its own copy of the
scheduler and calls the same hooks, with the same arguments, in the same
order, so a hook must be deterministic: it may use ``self.random`` and
``self.now`` but no wall clock, no unseeded randomness, and no iteration over
sets whose order can differ between processes.

Inside a hook the scheduler acts through ``start_task``, ``kill_task`` and
``finish``.  These delegate to a runtime object that the replicated state
machine binds to the instance (the protocol is in
:mod:`tasksprint_sdk.runtime`); outside a hook there is nothing to act on,
so they raise :class:`SchedulerUsageError`.

This module needs only the standard library (the package is also imported
on machines that only run nodes).  It also holds the helpers the
``tasksprint`` command uses to load a scheduler class from a file and to
fingerprint its code.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import importlib
import importlib.util
import inspect
import itertools
import os
import random
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from tasksprint_sdk.runtime import SchedulerRuntime, bound

__all__ = [
    "Coordinator",
    "SchedulerLoadError",
    "SchedulerUsageError",
    "load_scheduler",
    "loading_scheduler",
    "scheduler_code_digest",
]

# True while TaskSprint imports a user's scheduler file to get at its class:
# the file's trailing ``MyCoordinator().start()`` must then do nothing.
_loading: contextvars.ContextVar[bool] = contextvars.ContextVar("tasksprint_loading_scheduler", default=False)

# Scheduler files are imported under fresh module names so two files that are
# both called ``scheduler.py`` do not replace each other in ``sys.modules``.
_module_numbers = itertools.count(1)


class SchedulerUsageError(RuntimeError):
    """An action was used where it cannot work (e.g. ``start_task`` outside a hook)."""


class SchedulerLoadError(Exception):
    """A scheduler spec names a file, module or class that cannot be used."""


class Coordinator:
    """Base class of a user's scheduler.

    Override the hooks you need; each does nothing by default (``command``
    and ``query`` are refused unless overridden).  Start the
    computation's tasks in :meth:`init`.  End the script that defines the
    subclass with ``MyCoordinator().start()`` so running the file starts a
    coordinator replica.
    """

    #: Classes of other modules the scheduler's state may hold.  A snapshot
    #: of the state may name the classes of the scheduler's own module and
    #: plain data types; a scheduler that keeps instances of a library's
    #: value classes lists those classes here (plain data classes only:
    #: restoring a snapshot creates their instances).
    SNAPSHOT_CLASSES: tuple[type, ...] = ()

    # ------------------------------------------------------------------ hooks

    def init(self, seed: int) -> None:
        """Called once, first, with the computation's seed (the same on every replica)."""

    def client_joined(self, cid: int) -> None:
        """Called when a client (a worker machine) joins; ``cid`` is its id."""

    def client_dead(self, cid: int) -> None:
        """Called when a client is declared dead; its tasks are placed again automatically."""

    def task_done(self, tid: int, values: dict[str, Any]) -> None:
        """Called once per task, with the outputs named in the task's ``keys``."""

    def task_failed(self, tid: int, error: str) -> None:
        """Called when task ``tid`` failed on its last allowed attempt.

        An override may declare a third parameter, ``record``: it then gets
        the record of a failed command task's last run (plain data as in
        :meth:`task_done`'s values; None for a node task).

        If a scheduler does not override this hook, such a failure ends the
        computation with a report naming the task and its error.  Tasks that
        depend on the failed task are killed before this hook runs.
        """

    def task_killed(self, tid: int) -> None:
        """Called for each task killed from outside (``tasksprint cancel``), dependents included.

        Tasks the scheduler kills itself (``kill_task``) do not come here.
        If a scheduler does not override this hook, such a cancel ends the
        computation with a report naming the cancelled tasks, since the
        scheduler could otherwise wait for them forever.
        """

    def command(self, body: Any) -> Any:
        """Called for a command sent to the scheduler through the log; returns the answer (plain data).

        ``body`` is plain data from outside (a shell, a script): treat it as
        hostile and answer bad input with an error value rather than raising
        (a raising hook fails the computation, as any hook).  A scheduler
        that does not override this refuses commands.
        """
        raise NotImplementedError

    def query(self, args: Any) -> Any:
        """Answer a read-only question (``args``: plain data from outside); returns plain data.

        Runs on whichever replica is asked, outside the log: read the state,
        change nothing (no actions, no ``random``).  ``task_info`` works here.
        An exception is answered as a refusal naming it.  A scheduler that
        does not override this refuses questions.
        """
        raise NotImplementedError

    # ---------------------------------------------------------------- actions

    def start_task(
        self,
        name: str | None = None,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        pretasks: Sequence[int] = (),
        prekeys: Sequence[str | None] | None = None,
        keys: Sequence[str] | None = None,
        require: Iterable[str] = (),
        want: Iterable[str] = (),
        replicas: int = 1,
        retries: int = 2,
        timeout: float | None = None,
        *,
        cmd: str | None = None,
        argv: Sequence[str] | None = None,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        stdin: str | None = None,
        stdout: str | None = None,
        stderr: str | None = None,
        limits: Any = None,
        sandbox: bool = False,
        network: bool = False,
        files: dict[str, bytes | str] | None = None,
        results: Sequence[str] | None = None,
    ) -> int:
        """Create a task and return its id (an int).

        ``name`` is the node method to run, with ``args``/``kwargs`` (plain
        data).  The task runs once every task in ``pretasks`` is done; the
        node method is called as ``method(*inputs, *args, **kwargs)`` where
        ``inputs[i]`` is output ``prekeys[i]`` of ``pretasks[i]`` (its whole
        output dict when ``prekeys`` or ``prekeys[i]`` is None).  ``keys`` names the
        outputs sent to :meth:`task_done`; the others stay on the machine that
        made them until a dependent fetches them.  ``require`` tags must all
        be offered by a client to run the task there, ``want`` tags are
        preferred.  ``replicas`` copies run on distinct clients and the first
        completion wins; a failed task is tried again up to ``retries``
        times; ``timeout`` (seconds) bounds each attempt.

        A *command task* gives ``cmd`` (a bash command line, run as
        ``bash -c``) or ``argv`` (a program and its arguments, no shell)
        instead of ``name``, ``args`` and ``kwargs``; the worker client runs it
        itself, no node needed.  ``cwd`` is its working directory, ``env``
        variables added to its environment, ``stdin`` a file read as its
        input, ``stdout`` / ``stderr`` files its output goes to (None: the
        client captures it and keeps its size, head and tail), ``limits`` a
        :class:`tasksprint.exec.Limits` or a dict of its fields
        (``memory_bytes``, ``cpus``, ``cpuset``, ``pids``, ``wall_time_s``,
        ``cpu_time_s``, ``output_bytes``), ``sandbox`` runs it under
        bubblewrap (``network`` then allows the network).  ``files`` are
        input files (name -> bytes or text, at most 1 MiB in all) and
        ``results`` names or globs (``out/*.txt``) of files kept after a
        successful run, in the output ``files`` (name -> base64 text, at most
        32 MiB in all); a dependent command task gets its pretasks' result
        files staged into its working directory.  A task with files or
        results runs in a fresh directory of its own (no ``cwd``); names
        are relative, without ``..``.  Its outputs are the
        record of its run (``verdict``, ``exit_code``, ``signal``, times,
        ``peak_memory_bytes``, ...): all of them reach :meth:`task_done`
        unless ``keys`` names fewer.  A non-zero exit, a signal or a limit is
        a failure (retried as any task); :meth:`task_failed` gets an error
        naming the verdict and, if it declares a ``record`` parameter, the
        record too.

        Raises :class:`SchedulerUsageError` outside a hook, ``ValueError`` or
        ``TypeError`` for invalid arguments.
        """
        return self._tasksprint_runtime_for("start_task").start_task(
            name=name,
            args=args,
            kwargs=kwargs,
            pretasks=pretasks,
            prekeys=prekeys,
            keys=keys,
            require=require,
            want=want,
            replicas=replicas,
            retries=retries,
            timeout=timeout,
            cmd=cmd,
            argv=argv,
            cwd=cwd,
            env=env,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            limits=limits,
            sandbox=sandbox,
            network=network,
            files=files,
            results=results,
        )

    def kill_task(self, tid: int) -> list[int]:
        """Kill task ``tid`` and every task that transitively depends on it.

        Returns the ids of the tasks that were killed (tasks already done,
        failed or killed are left as they are).  Raises
        :class:`SchedulerUsageError` outside a hook and ``ValueError`` for an
        unknown task id.
        """
        return self._tasksprint_runtime_for("kill_task").kill_task(tid)

    def finish(self, taskids: Sequence[int] | None = None, values: Any = None) -> None:
        """End the computation successfully.

        The result is the ``values`` given here (plain data) together with the
        ``task_done`` values of each task in ``taskids``.  No hook is called
        after this.  Raises :class:`SchedulerUsageError` outside a hook or
        when called twice, ``ValueError`` when a task in ``taskids`` is not done.
        """
        self._tasksprint_runtime_for("finish").finish(taskids=taskids, values=values)

    def forget_task(self, tid: int) -> None:
        """Drop finished task ``tid`` from the coordinator's state (a long-running scheduler's compaction).

        Its record, values included, is gone from then on: keep what you need
        first (``task_info``).  Raises ``ValueError`` for an unknown task, one
        still pending or running, or one that a task still on record reads.
        """
        self._tasksprint_runtime_for("forget_task").forget_task(tid)

    def archive(self, key: int, record: Any) -> None:
        """Keep ``record`` (plain data) under ``key`` (an int >= 0) in each replica's durable history.

        The history is kept by every replica on its disk, outside the
        replicated state, so what a long-running scheduler compacts away
        costs neither memory nor snapshot size; every replica that applies
        the same hooks archives the same records.  A later record under the
        same key replaces the earlier one.  Read it back with
        :meth:`archived`, in :meth:`query` only.  Raises
        :class:`SchedulerUsageError` outside a hook, ``TypeError`` if
        ``record`` is not plain data.
        """
        self._tasksprint_runtime_for("archive").archive(key, record)

    def archived(self, key: int) -> Any:
        """The record :meth:`archive` kept under ``key`` in this replica's history, or None.

        Only in :meth:`query`: the answer is this replica's, and a replica
        that caught up from another's snapshot lacks what was archived
        while it was away (ask another replica).  Raises
        :class:`SchedulerUsageError` in any other hook.
        """
        return self._tasksprint_runtime_for("archived").archived(key)

    def task_info(self, tid: int) -> dict[str, Any] | None:
        """What the coordinator knows of task ``tid`` (plain data), or None if there is no such task.

        Read-only; usable in hooks and in :meth:`query`.  Keys include
        ``state`` (pending, running, done, failed, killed), ``attempt``,
        ``require``, ``want``, ``clients`` and ``workers`` (the ids and names
        of the clients running it), ``values`` and ``error``.
        """
        return self._tasksprint_runtime_for("task_info").task_info(tid)

    @property
    def random(self) -> random.Random:
        """A ``random.Random`` seeded from the computation's seed, the same on every replica."""
        return self._tasksprint_runtime_for("random").random

    @property
    def now(self) -> float:
        """The coordinator's time in seconds: the leader's clock at the last applied tick."""
        return self._tasksprint_runtime_for("now").now

    # ------------------------------------------------------------------ start

    def start(self) -> None:
        """Run a coordinator replica with this scheduler (``python scheduler.py --id 0 --peers ...``).

        The command-line arguments are those of ``tasksprint replica``.  Does
        nothing while TaskSprint itself imports the file to load the class
        (see :func:`loading_scheduler`).  Exits the process when the replica stops.
        """
        if _loading.get():
            return
        # Imported here: the runtime (trio, networking) is only needed when a
        # replica actually runs, and the SDK must import without it.
        from tasksprint import launch

        raise SystemExit(launch.main(sys.argv[1:], scheduler=type(self)))

    # -------------------------------------------------------------- internals

    def _tasksprint_runtime_for(self, what: str) -> SchedulerRuntime:
        runtime = bound(self)
        if runtime is None:
            raise SchedulerUsageError(
                f"{type(self).__name__}.{what} is only available while TaskSprint runs the scheduler: "
                f"use it inside a hook (init, client_joined, client_dead, task_done, task_failed), "
                f"not in __init__ or at module level"
            )
        runtime.check_usable(what)
        return runtime


@contextlib.contextmanager
def loading_scheduler() -> Iterator[None]:
    """While active, ``Coordinator.start()`` returns at once instead of running a replica.

    Wrap it around importing a user's scheduler file to get at its class.
    """
    token = _loading.set(True)
    try:
        yield
    finally:
        _loading.reset(token)


def load_scheduler(spec: str) -> type[Coordinator]:
    """Import the scheduler class named by ``spec`` and return it.

    ``spec`` is ``path/to/file.py:ClassName`` or ``package.module:ClassName``.
    A file is imported under a fresh module name, with its directory on
    ``sys.path`` (as when it is run as a script), so helper modules beside
    it can be imported.

    Raises :class:`SchedulerLoadError` when the spec is malformed, the file or
    module is missing or fails to import, or the class is missing or is not a
    :class:`Coordinator` subclass.
    """
    target, sep, class_name = spec.rpartition(":")
    if not sep or not target or not class_name:
        raise SchedulerLoadError(
            f"scheduler spec {spec!r} must be FILE.py:CLASS or MODULE:CLASS, "
            f"e.g. examples/montecarlo/scheduler.py:MonteCarloCoordinator"
        )
    with loading_scheduler():
        if target.endswith(".py") or os.sep in target or "/" in target:
            module = _import_file(target)
            where = f"scheduler file {target}"
        else:
            try:
                module = importlib.import_module(target)
            except ModuleNotFoundError as exc:
                raise SchedulerLoadError(f"cannot import scheduler module {target!r}: {exc}") from exc
            except Exception as exc:
                raise SchedulerLoadError(
                    f"importing scheduler module {target!r} failed: {type(exc).__name__}: {exc}"
                ) from exc
            where = f"scheduler module {target}"
    cls = getattr(module, class_name, None)
    if cls is None:
        found = sorted(
            n
            for n, v in vars(module).items()
            if isinstance(v, type) and issubclass(v, Coordinator) and v is not Coordinator
        )
        hint = (
            f"Coordinator subclasses defined there: {', '.join(found)}"
            if found
            else "it defines no Coordinator subclass"
        )
        raise SchedulerLoadError(f"{where} has no class {class_name!r} ({hint})")
    if not isinstance(cls, type) or not issubclass(cls, Coordinator) or cls is Coordinator:
        raise SchedulerLoadError(
            f"{class_name} in {where} is not a Coordinator subclass: "
            f"define it as `class {class_name}(Coordinator)` with `from tasksprint import Coordinator`"
        )
    return cls


def _import_file(path: str) -> Any:
    if not os.path.isfile(path):
        raise SchedulerLoadError(f"scheduler file {path} does not exist (paths are relative to {os.getcwd()})")
    stem = "".join(ch if ch.isalnum() else "_" for ch in os.path.splitext(os.path.basename(path))[0])
    module_name = f"tasksprint_scheduler_{next(_module_numbers)}_{stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise SchedulerLoadError(f"scheduler file {path} cannot be imported as Python source")
    module = importlib.util.module_from_spec(spec)
    directory = os.path.dirname(os.path.abspath(path))
    if directory not in sys.path:
        sys.path.insert(0, directory)
    # Registered before running it: pickling the scheduler (snapshots) and
    # dataclasses both look the module up by name.
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:
        del sys.modules[module_name]
        if isinstance(exc, (KeyboardInterrupt, GeneratorExit)):
            raise
        raise SchedulerLoadError(f"importing scheduler file {path} failed: {type(exc).__name__}: {exc}") from exc
    return module


def scheduler_code_digest(cls: type) -> str:
    """SHA-256 (hex) of the source file that defines ``cls``.

    Replicas compare it with the digest recorded in the log's first entry,
    so one started with a different scheduler file refuses to apply.
    Raises :class:`SchedulerLoadError` when the class has no source file.
    """
    module = sys.modules.get(cls.__module__)
    path = getattr(module, "__file__", None)
    if path is None:
        try:
            path = inspect.getsourcefile(cls)
        except TypeError:
            path = None
    if path is None or not os.path.isfile(path):
        raise SchedulerLoadError(
            f"cannot find the source file of scheduler class {cls.__qualname__} (module {cls.__module__}): "
            f"define the scheduler in a .py file"
        )
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()

"""Process management for the benchmarks, once: ``bench/log.py`` and ``bench/tasks.py`` use it.

What a benchmark run starts, it stops, whatever happens (an error, Ctrl-C,
SIGTERM, even the parent being killed):

* :class:`Child` / :class:`Children`: a child speaking JSON lines on
  stdin/stdout (load generators, PySyncObj nodes), stderr to a file, in its
  own session; :meth:`Children.stop_all` ends every one still running.
* :class:`Cleanup`: an ExitStack whose unwinding a second Ctrl-C cannot cut
  short; :func:`exit_on_signals` turns SIGTERM/SIGHUP into an orderly exit;
  :func:`temp_dir` is the run's directory, removed or kept.
* :class:`MarkedRun`: one child at a time whose whole process tree carries
  ``MARK_VAR=<token>`` in its environment, so that whatever it started --
  replicas, clients, nodes, Dask or Ray workers, in whatever session -- is
  found in ``/proc`` and killed once it is done; :func:`watch_parent` does
  the same from inside the child if the parent dies.
* A local TaskSprint cluster (:class:`tasksprint.localcluster.LocalCluster`,
  :class:`tasksprint.run.LocalRun`): :func:`wait_stable` waits until the
  replicas agree on a caught-up leader; :func:`interrupt` stops processes
  with SIGINT first (a process's exit handlers run), then SIGTERM, then SIGKILL.
* Peer systems: :func:`start_pysyncobj` / :func:`pysyncobj_leader` /
  :func:`stop_pysyncobj`, :func:`dask_cluster` and :func:`ray_session`
  (started, waited for until every worker is up, stopped on the way out).
* Machine figures taken around a run: :func:`cpu_seconds`,
  :func:`fsync_samples_ms`, :func:`loadavg`, :func:`percentile`.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PYSYNCOBJ_NODE = HERE / "_pysyncobj_node.py"
LOOPBACK = "127.0.0.1"
#: The environment variable that marks every process of one :class:`MarkedRun` child.
MARK_VAR = "TASKSPRINT_BENCH_RUN"


class BenchError(Exception):
    """The benchmark could not measure something; the message says what."""


def note(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------
# Machine figures


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of ``values``; None if empty."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(q / 100.0 * len(s)) - 1))
    return s[k]


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds a process has used so far (Linux /proc), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def fsync_samples_ms(directory: Path, n: int) -> list[float]:
    """``n`` timings (ms) of write + fsync of 100 bytes in ``directory``: the disk the replicas use, right now."""
    path = directory / "fsync-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    times = []
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            os.write(fd, b"x" * 100)
            os.fsync(fd)
            times.append((time.perf_counter() - t0) * 1000.0)
    finally:
        os.close(fd)
        path.unlink()
    return times


def loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


# ----------------------------------------------------------------------
# Exits, signals, the run's directory


def _raise_exit(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def exit_on_signals(*signums: int) -> dict[int, Any]:
    """Make each of ``signums`` raise SystemExit(128 + signum), so clean-up code runs; returns the old handlers."""
    return {s: signal.signal(s, _raise_exit) for s in signums}


@contextlib.contextmanager
def temp_dir(prefix: str, keep: bool = False) -> Iterator[Path]:
    """A new temporary directory, removed on the way out unless ``keep`` (then its path is noted)."""
    if not keep:
        with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
            yield Path(tmp)
        return
    tmp = tempfile.mkdtemp(prefix=prefix)
    try:
        yield Path(tmp)
    finally:
        note(f"kept {tmp}")


# ----------------------------------------------------------------------
# Children speaking JSON lines


class Child:
    """A child process taking JSON lines on stdin and answering JSON lines on stdout.

    stderr goes to a file.  Children run in their own session so a Ctrl-C in
    the terminal reaches only this script, which then stops them itself.
    """

    def __init__(self, name: str, argv: list[str], stderr_path: Path, env: dict | None = None) -> None:
        self.name = name
        self.stderr_path = stderr_path
        self._err = open(stderr_path, "ab")
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._err,
            start_new_session=True,
            text=True,
            bufsize=1,
            env=env,
        )
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, name=f"read-{name}", daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.strip()
            if not line:
                continue
            try:
                self.lines.put(json.loads(line))
            except json.JSONDecodeError:
                self.lines.put({"_raw": line})
        self.lines.put(None)

    def send(self, obj: Any) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(obj) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise BenchError(f"{self.name} is gone ({exc}); {self.stderr_tail()}") from None

    def recv(self, timeout: float) -> dict:
        try:
            msg = self.lines.get(timeout=max(0.0, timeout))
        except queue.Empty:
            raise BenchError(f"{self.name} did not answer within {timeout:.0f}s; {self.stderr_tail()}") from None
        if msg is None:
            self.proc.wait(1)
            raise BenchError(f"{self.name} exited with code {self.proc.returncode}; {self.stderr_tail()}")
        return msg

    def ask(self, obj: Any, timeout: float) -> dict:
        self.send(obj)
        return self.recv(timeout)

    def stderr_tail(self, n: int = 15) -> str:
        try:
            lines = self.stderr_path.read_text(errors="replace").splitlines()[-n:]
        except OSError:
            lines = []
        return "its stderr ends with:\n  " + "\n  ".join(lines) if lines else "its stderr is empty"

    def stop(self, grace: float = 2.0) -> None:
        with contextlib.suppress(OSError):
            if self.proc.stdin:
                self.proc.stdin.close()
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._err.close()


class Cleanup(contextlib.ExitStack):
    """An ExitStack whose unwinding a second Ctrl-C cannot cut short."""

    def __exit__(self, *exc: Any) -> bool | None:
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            return super().__exit__(*exc)
        finally:
            signal.signal(signal.SIGINT, old)


class Children:
    """Every child started so far; :meth:`stop_all` ends them on any exit path."""

    def __init__(self) -> None:
        self.all: list[Child] = []

    def start(self, name: str, argv: list[str], stderr_path: Path, env: dict | None = None) -> Child:
        c = Child(name, argv, stderr_path, env)
        self.all.append(c)
        return c

    def stop(self, c: Child, grace: float = 2.0) -> None:
        c.stop(grace)
        if c in self.all:
            self.all.remove(c)

    def stop_all(self) -> None:
        for c in self.all:
            if c.proc.poll() is None:
                c.proc.kill()
        for c in self.all:
            c.stop(0.5)
        self.all.clear()


# ----------------------------------------------------------------------
# A child and everything it starts, found by a marker in the environment


def marked(token: str) -> list[int]:
    """Every process whose environment carries ``MARK_VAR=token``: a child and all it started."""
    needle = f"{MARK_VAR}={token}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read()
        except OSError:
            continue
        if needle in env.split(b"\0"):
            found.append(int(entry))
    return found


def kill_marked(token: str) -> int:
    """SIGKILL every process started for run ``token`` (processes outlive a killed parent); how many."""
    victims = marked(token)
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return len(victims)


class MarkedRun:
    """Runs children one at a time; kills the running one (and all below it) on the way out."""

    def __init__(self) -> None:
        self.current: subprocess.Popen | None = None
        self.token: str | None = None

    def run(self, cmd: list[str], env: dict[str, str], timeout: float) -> tuple[str, str, int]:
        """Run ``cmd`` to its end (killed ``timeout`` s on); return its stdout, stderr and leftovers killed.

        Every process still carrying the child's marker when it is done --
        nothing, when it cleaned up after itself -- is killed and counted.
        """
        token = os.urandom(6).hex()
        env = dict(env)
        env[MARK_VAR] = token
        self.token = token
        self.current = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,
        )
        try:
            stdout, stderr = self.current.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_marked(token)
            stdout, stderr = self.current.communicate()
        finally:
            # Whatever the child left behind (nothing, when it cleaned up after itself).
            left = kill_marked(token)
            self.current.wait()
            self.current = self.token = None
        return stdout, stderr, left

    def close(self) -> None:
        if self.token is not None:
            kill_marked(self.token)
        if self.current is not None:
            self.current.wait()
            self.current = self.token = None


def watch_parent(tmp: Path) -> None:
    """If the parent dies (even by SIGKILL), stop everything this child started and leave.

    Run in a daemon thread of a :class:`MarkedRun` child; ``tmp`` is the
    child's directory, removed with its parent's once empty.
    """
    parent = os.getppid()
    while os.getppid() == parent:
        time.sleep(0.5)
    token = os.environ.get(MARK_VAR)
    if token:
        kill_marked(token)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.parent.rmdir()  # the parent's directory, once every child's is gone
    except OSError:
        pass
    os._exit(1)


# ----------------------------------------------------------------------
# A local TaskSprint cluster


def interrupt(procs: list[subprocess.Popen | None], timeout: float = 5.0) -> None:
    """SIGINT to each running process, then wait up to ``timeout`` s for all: their exit handlers run.

    The caller stops what is left the usual way (SIGTERM, then SIGKILL).
    """
    live = [p for p in procs if p is not None and p.poll() is None]
    for p in live:
        p.send_signal(signal.SIGINT)
    deadline = time.monotonic() + timeout
    for p in live:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(max(0.01, deadline - time.monotonic()))


def statuses(addrs: list, secret: bytes, timeout: float = 1.0) -> list:
    """Each replica's ReplicaStatus, or None where it did not answer."""
    import trio

    from tasksprint.log_client import LogClient

    async def main() -> list:
        out: list = [None] * len(addrs)

        async def one(client: LogClient, i: int) -> None:
            try:
                out[i] = await client.status(tuple(addrs[i]), timeout=timeout)
            except Exception:  # down, refusing, too slow: all mean "no answer"
                out[i] = None

        async with LogClient(list(addrs), secret) as client:
            async with trio.open_nursery() as nursery:
                for i in range(len(addrs)):
                    nursery.start_soon(one, client, i)
        return out

    return trio.run(main)


def wait_stable(cl: Any, live: list[int], timeout: float = 30.0) -> int:
    """Wait until the live replicas agree on one leader and have applied what it had committed; return it."""
    deadline = time.monotonic() + timeout
    prev_commit: int | None = None
    last: list = []
    while time.monotonic() < deadline:
        st = statuses(cl.addrs, cl.secret)
        last = st
        leaders = [i for i in live if st[i] is not None and st[i].role == "leader"]
        if len(leaders) == 1:
            lead = leaders[0]
            agreed = all(st[i] is not None and st[i].leader == lead for i in live)
            if agreed and prev_commit is not None and all(st[i].applied >= prev_commit for i in live):
                return lead
            prev_commit = st[lead].commit
        else:
            prev_commit = None
        time.sleep(0.05)
    desc = ", ".join(
        f"{i}: {s.role} leader={s.leader} commit={s.commit} applied={s.applied}" if s else f"{i}: no answer"
        for i, s in enumerate(last)
    )
    raise BenchError(f"replicas {live} did not settle on one caught-up leader within {timeout:.0f}s ({desc})")


def elected_after(cl: Any, rid: int, since_wall: float) -> float | None:
    """Seconds from ``since_wall`` (time.time()) until replica ``rid`` logged that it became leader."""
    for line in cl.logs(rid).splitlines():
        if '"role_changed"' not in line or '"leader"' not in line:
            continue
        try:
            ev = json.loads(line)
            when = datetime.datetime.fromisoformat(ev["timestamp"].replace("Z", "+00:00")).timestamp()
        except (json.JSONDecodeError, KeyError, ValueError):
            continue
        if ev.get("role") == "leader" and when >= since_wall:
            return when - since_wall
    return None


def storage_fsync_flags(cl: Any) -> list:
    """The ``fsync`` flag each replica logged when it opened its storage (proof of the durability setting)."""
    flags = []
    for i in range(cl.replicas):
        flag = None
        for line in cl.logs(i).splitlines():
            if '"storage_opened"' in line:
                with contextlib.suppress(json.JSONDecodeError):
                    flag = json.loads(line).get("fsync")
        flags.append(flag)
    return flags


# ----------------------------------------------------------------------
# Peer systems


def pysyncobj_info() -> dict:
    import pysyncobj
    from pysyncobj import SyncObjConf

    try:
        from pysyncobj.version import VERSION
    except ImportError:
        VERSION = getattr(pysyncobj, "__version__", "unknown")
    conf = SyncObjConf()
    return {"version": VERSION, "flush_journal_option": hasattr(conf, "flushJournal")}


def start_pysyncobj(base: Path, children: Children, *, batch: bool, tag: str, compaction: int) -> list[Child]:
    """Three PySyncObj nodes (``_pysyncobj_node.py``) on loopback, data under ``base/pysyncobj-<tag>``."""
    from tasksprint.localcluster import free_ports

    addrs = [f"127.0.0.1:{p}" for p in free_ports(3)]
    nodes = []
    for i, a in enumerate(addrs):
        d = base / f"pysyncobj-{tag}" / f"node{i}"
        d.mkdir(parents=True)
        argv = [
            sys.executable,
            str(PYSYNCOBJ_NODE),
            "--self",
            a,
            "--partners",
            ",".join(x for x in addrs if x != a),
            "--dir",
            str(d),
            "--journal",
            "1",
            "--batch",
            "1" if batch else "0",
            "--compaction-entries",
            str(compaction),
        ]
        nodes.append(children.start(f"PySyncObj node {i} ({tag})", argv, d.parent / f"node{i}.err"))
    return nodes


def stop_pysyncobj(nodes: list[Child], children: Children) -> None:
    """Ask every PySyncObj node to quit, then make sure each has stopped."""
    for n in nodes:
        with contextlib.suppress(BenchError):
            n.send({"cmd": "quit"})
    for n in nodes:
        children.stop(n)


def pysyncobj_leader(nodes: list[Child], timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    st: list = []
    while time.monotonic() < deadline:
        st = [n.ask({"cmd": "status"}, 10) for n in nodes]
        leaders = [i for i, s in enumerate(st) if s["is_leader"]]
        if len(leaders) == 1:
            addr = st[leaders[0]]["leader"]
            if all(s["leader"] == addr and s["ready"] for s in st):
                return leaders[0]
        time.sleep(0.1)
    raise BenchError(f"PySyncObj nodes did not agree on a leader within {timeout:.0f}s: {st}")


@contextlib.contextmanager
def dask_cluster(workers: int, tmp: Path) -> Iterator[Any]:
    """A Dask distributed client of ``workers`` single-thread worker processes, all up and warmed up."""
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            host=LOOPBACK,
            dashboard_address=None,
            local_directory=str(tmp),
            silence_logs=40,
        ) as cluster,
        Client(cluster) as client,
    ):
        client.wait_for_workers(workers)
        yield client


@contextlib.contextmanager
def ray_session(workers: int, tmp: Path) -> Iterator[Any]:
    """Ray on this machine with ``workers`` CPUs; shut down on the way out."""
    import ray

    ray.init(
        num_cpus=workers,
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=256 * 1024 * 1024,
        _node_ip_address=LOOPBACK,
        _temp_dir=str(tmp / "ray"),
    )
    try:
        yield ray
    finally:
        ray.shutdown()

"""Network namespaces, a bridge and veth pairs for one run, and their removal.

Layout of a run with prefix ``tsj-<pid>-``::

    tsj-<pid>-br   namespace holding bridge br0 (no address of its own)
    tsj-<pid>-r0   replica 0: eth0 = 10.77.0.10/24   (veth peer r0 on br0)
    tsj-<pid>-c0   client 0:  eth0 = 10.77.0.100/24  (veth peer c0 on br0)
    tsj-<pid>-ctl  the harness itself: eth0 = 10.77.0.250/24

Every address lives inside namespaces this module created; the host's own
interfaces, routes and firewall are never touched.  The harness process
moves itself into ``ctl`` (:func:`enter`) so that its status probes reach
the replicas without any host route.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from jepsen.harness import leaks

SUBNET = "10.77.0"
PREFIX_LEN = 24
CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/run/netns")


class NetError(RuntimeError):
    pass


def sh(*cmd: str, check: bool = True, timeout: float = 20.0) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise NetError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def list_netns() -> list[str]:
    out = sh("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def netns_pids(name: str) -> list[int]:
    out = sh("ip", "netns", "pids", name, check=False).stdout
    return [int(x) for x in out.split() if x.isdigit()]


def kill_netns_pids(name: str) -> None:
    """SIGKILL every process inside namespace ``name`` (never the harness itself)."""
    me = os.getpid()
    for _ in range(20):
        pids = [p for p in netns_pids(name) if p != me]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def delete_netns(name: str, kill: bool = True) -> None:
    if kill:
        kill_netns_pids(name)
    sh("ip", "netns", "del", name, check=False)


def sweep_stale(prefix: str = "tsj-") -> list[str]:
    """Delete namespaces left by earlier runs whose harness process is gone."""
    removed = []
    for name in sorted(leaks.stale_namespaces(prefix)):
        delete_netns(name)
        removed.append(name)
    return removed


class Network:
    """The namespaces of one run; :meth:`teardown` removes all of them (idempotent)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.bridge_ns = f"{prefix}br"
        self.created: list[str] = []
        self.addrs: dict[str, str] = {}  # short name (r0, c1, ctl) -> address
        self.entered = False

    def ns(self, short: str) -> str:
        return f"{self.prefix}{short}"

    def _add_ns(self, name: str) -> None:
        sh("ip", "netns", "add", name)
        self.created.append(name)
        sh("ip", "-n", name, "link", "set", "lo", "up")

    def create(self, members: list[tuple[str, int]]) -> None:
        """``members``: (short name, host number) pairs, e.g. ("r0", 10)."""
        self._add_ns(self.bridge_ns)
        sh("ip", "-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.bridge_ns, "link", "set", "br0", "up")
        for short, host in members:
            name = self.ns(short)
            self._add_ns(name)
            sh("ip", "-n", self.bridge_ns, "link", "add", short, "type", "veth", "peer", "name", "eth0", "netns", name)
            sh("ip", "-n", self.bridge_ns, "link", "set", short, "master", "br0", "up")
            addr = f"{SUBNET}.{host}"
            sh("ip", "-n", name, "addr", "add", f"{addr}/{PREFIX_LEN}", "dev", "eth0")
            sh("ip", "-n", name, "link", "set", "eth0", "up")
            self.addrs[short] = addr

    def enter(self, short: str) -> None:
        """Move this process (its calling thread; call before starting threads) into ``short``'s namespace."""
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(NETNS_DIR / self.ns(short), os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise NetError(f"setns({self.ns(short)}): {os.strerror(err)}")
        finally:
            os.close(fd)
        self.entered = True

    def exec_prefix(self, short: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns(short)]

    # -- faults ----------------------------------------------------------

    def iptables(self, short: str, *args: str, check: bool = True) -> None:
        sh(*self.exec_prefix(short), "iptables", "-w", *args, check=check)

    def drop_all(self, short: str) -> None:
        """Cut ``short`` off the bridge: drop everything in and out of its eth0."""
        self.iptables(short, "-A", "INPUT", "-i", "eth0", "-j", "DROP")
        self.iptables(short, "-A", "OUTPUT", "-o", "eth0", "-j", "DROP")

    def drop_between(self, short: str, others: list[str]) -> None:
        """Drop traffic between ``short`` and each of ``others`` (in ``short``'s namespace)."""
        for o in others:
            a = self.addrs[o]
            self.iptables(short, "-A", "INPUT", "-s", a, "-j", "DROP")
            self.iptables(short, "-A", "OUTPUT", "-d", a, "-j", "DROP")

    def random_loss(self, short: str, probability: float) -> None:
        """Drop each packet in and out of eth0 with ``probability`` (iptables statistic match)."""
        for chain, flag in (("INPUT", "-i"), ("OUTPUT", "-o")):
            self.iptables(
                short,
                "-A",
                chain,
                flag,
                "eth0",
                "-m",
                "statistic",
                "--mode",
                "random",
                "--probability",
                str(probability),
                "-j",
                "DROP",
            )

    def queue_egress(self, short: str, mark: int, queue: int = 0) -> None:
        """Hand every packet leaving ``short``'s eth0 to NFQUEUE ``queue``, except those carrying
        ``mark`` (the handler's own duplicates).  ``--queue-bypass``: with no handler bound,
        packets pass untouched instead of being dropped."""
        self.iptables(
            short,
            "-A",
            "OUTPUT",
            "-o",
            "eth0",
            "-m",
            "mark",
            "!",
            "--mark",
            str(mark),
            "-j",
            "NFQUEUE",
            "--queue-num",
            str(queue),
            "--queue-bypass",
        )

    def heal(self, short: str) -> None:
        self.iptables(short, "-F", "INPUT", check=False)
        self.iptables(short, "-F", "OUTPUT", check=False)

    def netem(self, short: str, spec: list[str]) -> None:
        sh("tc", "-n", self.ns(short), "qdisc", "replace", "dev", "eth0", "root", "netem", *spec)

    def netem_clear(self, short: str) -> None:
        sh("tc", "-n", self.ns(short), "qdisc", "del", "dev", "eth0", "root", check=False)

    def rules(self, short: str) -> str:
        return sh(*self.exec_prefix(short), "iptables", "-w", "-S", check=False).stdout

    # -- removal ---------------------------------------------------------

    def teardown(self) -> list[str]:
        """Delete every namespace of this run (processes inside are killed first).

        Returns the names still listed afterwards (should be empty).
        """
        for name in reversed(self.created):
            try:
                # The harness lives in ctl; only its own children run there.
                delete_netns(name, kill=name != self.ns("ctl"))
            except Exception as exc:  # keep going: the rest must go too
                print(f"jepsen: deleting {name}: {exc}", file=sys.stderr)
        self.created = [n for n in self.created if n in list_netns()]
        return [n for n in list_netns() if n.startswith(self.prefix)]

#!/usr/bin/env python3
"""A userspace netem for kernels without the netem qdisc: delay, jitter, loss,
duplication and reordering of the packets an iptables ``NFQUEUE`` rule hands over.

Usage (inside the namespace whose egress it impairs; standard library only)::

    python nfq.py --queue 0 --mark 122 --delay 0.04 --jitter 0.02 --loss 0.05 \
                  --duplicate 0.05 --reorder 0.10 --seed N

with a rule such as::

    iptables -A OUTPUT -o eth0 -m mark ! --mark 122 -j NFQUEUE --queue-num 0 --queue-bypass

Theory of operation
-------------------
The kernel's nfnetlink_queue holds every queued packet until userspace
gives it a verdict.  This program speaks that netlink protocol directly
(no libnetfilter_queue): it binds queue ``--queue`` with full packet copies,
and for each packet draws, from a seeded ``random.Random``:

* loss: verdict DROP now, with probability ``--loss``;
* reorder: verdict ACCEPT now, with probability ``--reorder`` -- it overtakes
  the packets still held (netem's ``reorder``);
* otherwise: verdict ACCEPT after ``delay +- jitter`` seconds (uniform), so
  packets also overtake each other within the jitter;
* duplicate: with probability ``--duplicate``, a second copy of the IP packet
  is sent through a raw socket carrying mark ``--mark`` (the rule skips
  marked packets, so the copy is not queued again), right away -- ahead of
  the original when that one is held.

Verdicts given later than others reinject packets out of order; the kernel
keeps held packets in the queue (up to ``--maxlen``; the queue fails open
when full).  On SIGTERM/SIGINT every held packet is accepted before exit, so
stopping the impairment never loses what it held.  Counts go to stdout as
one JSON line at exit (and every 5 s) for the report.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import random
import select
import signal
import socket
import struct
import sys
import time

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = 0
NFQNL_MSG_VERDICT = 1
NFQNL_MSG_CONFIG = 2
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLMSG_ERROR = 0x2
NLMSG_DONE = 0x3
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_PAYLOAD = 10
NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQA_CFG_MASK = 4
NFQA_CFG_FLAGS = 5
NFQA_CFG_F_FAIL_OPEN = 1
NFQNL_CFG_CMD_BIND = 1
NFQNL_CFG_CMD_UNBIND = 2
NFQNL_COPY_PACKET = 2
NF_DROP = 0
NF_ACCEPT = 1
SO_MARK = 36


class NfqError(RuntimeError):
    pass


def _attr(kind: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return struct.pack("=HH", n, kind) + payload + b"\0" * ((4 - n % 4) % 4)


def _msg(msg_type: int, queue: int, attrs: bytes, seq: int, flags: int = NLM_F_REQUEST, family: int = 0) -> bytes:
    body = struct.pack("=BBH", family, 0, socket.htons(queue)) + attrs
    return struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_QUEUE << 8) | msg_type, flags, seq, 0) + body


def _attrs(data: bytes) -> dict[int, bytes]:
    out = {}
    i = 0
    while i + 4 <= len(data):
        n, kind = struct.unpack_from("=HH", data, i)
        if n < 4:
            break
        out[kind & 0x7FFF] = data[i + 4 : i + n]
        i += (n + 3) & ~3
    return out


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def fix_checksums(packet: bytes) -> bytes:
    """The IPv4 packet with its IP and TCP/UDP checksums recomputed (a queued
    packet may still carry a partial checksum meant for offload)."""
    p = bytearray(packet)
    if len(p) < 20 or p[0] >> 4 != 4:
        return bytes(p)
    ihl = (p[0] & 0x0F) * 4
    total = struct.unpack_from("!H", p, 2)[0]
    p = p[:total]
    p[10:12] = b"\0\0"
    p[10:12] = struct.pack("!H", _checksum(bytes(p[:ihl])))
    proto = p[9]
    seg = p[ihl:]
    off = {6: 16, 17: 6}.get(proto)
    if off is not None and len(seg) >= off + 2:
        seg[off : off + 2] = b"\0\0"
        pseudo = bytes(p[12:20]) + struct.pack("!BBH", 0, proto, len(seg))
        c = _checksum(pseudo + bytes(seg))
        if proto == 17 and c == 0:
            c = 0xFFFF
        seg[off : off + 2] = struct.pack("!H", c)
        p[ihl:] = seg
    return bytes(p)


class Queue:
    def __init__(self, num: int, maxlen: int) -> None:
        self.num = num
        self.seq = 0
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.sock.bind((0, 0))
        self._config(_attr(NFQA_CFG_CMD, struct.pack("!BBH", NFQNL_CFG_CMD_BIND, 0, 0)))
        self._config(_attr(NFQA_CFG_PARAMS, struct.pack("!IB", 0xFFFF, NFQNL_COPY_PACKET)))
        self._config(_attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", maxlen)))
        self._config(
            _attr(NFQA_CFG_FLAGS, struct.pack("!I", NFQA_CFG_F_FAIL_OPEN))
            + _attr(NFQA_CFG_MASK, struct.pack("!I", NFQA_CFG_F_FAIL_OPEN))
        )

    def _config(self, attrs: bytes) -> None:
        self.seq += 1
        self.sock.send(_msg(NFQNL_MSG_CONFIG, self.num, attrs, self.seq, NLM_F_REQUEST | NLM_F_ACK))
        while True:
            data = self.sock.recv(65536)
            n, kind, _flags, seq, _pid = struct.unpack_from("=IHHII", data, 0)
            if kind == NLMSG_ERROR and seq == self.seq:
                err = struct.unpack_from("=i", data, 16)[0]
                if err != 0:
                    raise NfqError(f"nfnetlink_queue config refused: {os.strerror(-err)}")
                return

    def packets(self) -> list[tuple[int, bytes]]:
        """Every (packet id, IP packet) in one datagram from the kernel."""
        data = self.sock.recv(1 << 17)
        out = []
        i = 0
        while i + 16 <= len(data):
            n, kind, _flags, _seq, _pid = struct.unpack_from("=IHHII", data, i)
            if n < 16:
                break
            if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
                a = _attrs(data[i + 20 : i + n])
                if NFQA_PACKET_HDR in a:
                    pid = struct.unpack_from("!I", a[NFQA_PACKET_HDR], 0)[0]
                    out.append((pid, a.get(NFQA_PAYLOAD, b"")))
            i += (n + 3) & ~3
        return out

    def verdict(self, packet_id: int, verdict: int) -> None:
        self.seq += 1
        self.sock.send(
            _msg(NFQNL_MSG_VERDICT, self.num, _attr(NFQA_VERDICT_HDR, struct.pack("!II", verdict, packet_id)), self.seq)
        )

    def close(self) -> None:
        try:
            self._config(_attr(NFQA_CFG_CMD, struct.pack("!BBH", NFQNL_CFG_CMD_UNBIND, 0, 0)))
        except OSError:
            pass
        self.sock.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--queue", type=int, default=0)
    p.add_argument("--mark", type=int, required=True, help="mark of duplicates (the NFQUEUE rule must skip it)")
    p.add_argument("--delay", type=float, default=0.04, help="seconds")
    p.add_argument("--jitter", type=float, default=0.02, help="seconds, uniform +-")
    p.add_argument("--loss", type=float, default=0.0)
    p.add_argument("--duplicate", type=float, default=0.0)
    p.add_argument("--reorder", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--maxlen", type=int, default=4096)
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    q = Queue(args.queue, args.maxlen)
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    raw.setsockopt(socket.SOL_SOCKET, SO_MARK, args.mark)
    stopping = False

    def on_signal(signum, frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    held: list[tuple[float, int, int]] = []  # (release time, order, packet id)
    n = 0
    counts = {"packets": 0, "delayed": 0, "dropped": 0, "duplicated": 0, "reordered": 0, "max_held": 0}
    print(json.dumps({"ready": True}), flush=True)
    last_report = time.monotonic()
    while not stopping:
        now = time.monotonic()
        while held and held[0][0] <= now:
            q.verdict(heapq.heappop(held)[2], NF_ACCEPT)
        timeout = 0.2 if not held else max(0.0, held[0][0] - now)
        try:
            ready, _, _ = select.select([q.sock], [], [], timeout)
        except InterruptedError:
            continue
        if ready:
            try:
                batch = q.packets()
            except OSError:  # ENOBUFS: the kernel dropped messages we were too slow for
                counts["overruns"] = counts.get("overruns", 0) + 1
                continue
            for pid, payload in batch:
                counts["packets"] += 1
                if rng.random() < args.duplicate and len(payload) >= 20:
                    try:
                        dst = socket.inet_ntoa(payload[16:20])
                        raw.sendto(fix_checksums(payload), (dst, 0))
                        counts["duplicated"] += 1
                    except OSError:
                        pass
                if rng.random() < args.loss:
                    q.verdict(pid, NF_DROP)
                    counts["dropped"] += 1
                elif rng.random() < args.reorder:
                    q.verdict(pid, NF_ACCEPT)
                    counts["reordered"] += 1
                else:
                    d = max(0.0, args.delay + rng.uniform(-args.jitter, args.jitter))
                    n += 1
                    heapq.heappush(held, (time.monotonic() + d, n, pid))
                    counts["delayed"] += 1
            counts["max_held"] = max(counts["max_held"], len(held))
        if now - last_report > 5.0:
            print(json.dumps(counts), flush=True)
            last_report = now
    while held:
        q.verdict(heapq.heappop(held)[2], NF_ACCEPT)
    q.close()
    print(json.dumps({**counts, "final": True}), flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except NfqError as exc:
        print(f"nfq: {exc}", file=sys.stderr)
        sys.exit(3)

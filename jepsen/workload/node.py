#!/usr/bin/env python3
"""The node of the fault-injection workload, written against the stdio protocol.

Usage: ``python node.py CLIENT_NAME``.  Speaks the node protocol by hand
(standard library only) because each task records which attempt of which
task ran on which client: every result carries ``rec = [tid, attempt,
client]`` next to its value ``v``.

Tasks:
  ``leaf(prev..., x, sleep)`` -- ``v = (31 * sum(prev) + x) % MOD`` after
      sleeping ``sleep`` seconds (``prev`` are the inputs of its pretasks);
  ``total(*values)``          -- ``v = sum(values) % MOD``;
  ``decoy(wave, sleep)``      -- ``v = wave`` after sleeping ``sleep`` seconds
      (the harness cancels some of them while they sleep).
"""

import json
import sys
import time

MOD = 1_000_003


def send(message):
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def main():
    client = sys.argv[1] if len(sys.argv) > 1 else "?"
    send({"type": "ready", "protocol": 1, "sdk": "none"})
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        message = json.loads(line)
        if message.get("type") == "exit":
            break
        if message.get("type") != "task":
            continue
        tid, attempt = message["id"], message["attempt"]
        name = message["name"]
        inputs = message.get("inputs", [])
        args = message.get("args", [])
        kwargs = message.get("kwargs", {})
        rec = [tid, attempt, client]
        if name == "leaf":
            time.sleep(float(kwargs.get("sleep", 0.0)))
            v = (31 * sum(inputs) + args[0]) % MOD
        elif name == "decoy":
            time.sleep(float(kwargs.get("sleep", 0.0)))
            v = args[0]
        elif name == "total":
            v = sum(inputs) % MOD
        else:
            send({"type": "error", "id": tid, "attempt": attempt, "error": f"unknown task {name}"})
            continue
        send({"type": "result", "id": tid, "attempt": attempt, "outputs": {"v": v, "rec": rec}})


if __name__ == "__main__":
    main()

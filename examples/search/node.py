#!/usr/bin/env python3
"""Proof-of-work search, the node: try every nonce of one range.

``search`` looks for a nonce in ``[start, start + count)`` such that the hex
SHA-256 of ``prefix + str(nonce)`` starts with ``difficulty`` zeros, and
returns the first one it finds (or None) with the number of hashes tried.
"""

import hashlib

from tasksprint import Node


def meets(digest, difficulty):
    """Whether a raw SHA-256 ``digest`` starts with ``difficulty`` zero hex digits."""
    full, half = divmod(difficulty, 2)
    if digest[:full] != bytes(full):
        return False
    return not half or digest[full] < 16


class SearchNode(Node):
    def search(self, prefix, start, count, difficulty):
        base = hashlib.sha256(prefix.encode("utf-8"))
        for nonce in range(start, start + count):
            h = base.copy()
            h.update(str(nonce).encode("ascii"))
            if meets(h.digest(), difficulty):
                return {"found": {"nonce": nonce, "hash": h.hexdigest(), "tried": nonce - start + 1}}
        return {"found": {"nonce": None, "hash": None, "tried": count}}


SearchNode().start()

"""Under Slurm: the allocation's nodes and cores read from SLURM_* as engines (no Slurm needed)."""

from __future__ import annotations

import pytest

from tasksprint.batch_command import slurm_counts, slurm_nodes


def test_slurm_allocations_become_engines() -> None:
    assert slurm_counts("16(x2),8") == [16, 16, 8]
    assert slurm_counts("4") == [4]
    env = {"SLURM_JOB_CPUS_PER_NODE": "16(x2),8"}
    assert slurm_nodes(env, ["a", "b", "c"]) == [("a", 16), ("b", 16), ("c", 8)]
    assert slurm_nodes({"SLURM_JOB_CPUS_PER_NODE": "4"}, ["a", "b"]) == [("a", 4), ("b", 4)]
    for bad in ("16(x", "x", "1" * 50, "-3"):
        with pytest.raises(ValueError, match="not a Slurm count"):
            slurm_counts(bad)
    with pytest.raises(ValueError, match="disagree|gives 3 nodes"):
        slurm_nodes(env, ["a"])

"""The per-fault recovery figures of jepsen/run, computed from progress samples and fault events."""

from __future__ import annotations

from jepsen.harness.checkers import per_fault_recovery
from jepsen.harness.runner import parse_args


def faults(*windows: tuple[float, float]) -> list[dict]:
    out = []
    for n, (start, stop) in enumerate(windows):
        out += [{"t": start, "event": "start", "n": n}, {"t": stop, "event": "stop", "n": n}]
    return out


def test_times_from_heal_to_first_completion_and_back_to_the_prefault_done_count() -> None:
    # (t, done, state, replica, completions, recomputed)
    progress = [
        (1.0, 10, "running", 0, 10, 0),
        (2.0, 12, "running", 0, 12, 0),  # fault starts at 2.5: 12 done before it
        (3.0, 4, "running", 0, 12, 0),  # a client declared dead: outputs lost, recomputes start
        (4.0, 5, "running", 0, 13, 1),
        (5.0, 6, "running", 0, 14, 2),  # heal at 5.0
        (5.5, 6, "running", 0, 14, 2),
        (6.0, 8, "running", 0, 15, 3),  # first new completion 1.0 s after the heal
        (7.5, 12, "running", 0, 18, 3),  # back to 12 done 2.5 s after the heal
        (9.0, 20, "finished", 0, 26, 3),
    ]
    result = per_fault_recovery(progress, faults((2.5, 5.0)), max_recovery=3.0)
    [row] = result["per_fault"]
    assert (row["prefault_done"], row["first_completion"], row["back_to_prefault"]) == (12, 1.0, 2.5)
    assert row["recomputed"] == 3 and result["recomputed"] == 3
    assert result["ok"] and result["max_back_to_prefault"] == 2.5

    # The same run against a tighter bound fails, naming the fault.
    tight = per_fault_recovery(progress, faults((2.5, 5.0)), max_recovery=2.0)
    assert not tight["ok"] and tight["too_slow"] == [0]


def test_a_fault_never_recovered_from_fails_and_one_after_the_end_counts_as_recovered() -> None:
    progress = [(1.0, 10, "running", 0, 10, 0), (3.0, 2, "running", 0, 10, 0), (8.0, 3, "running", 0, 11, 1)]
    result = per_fault_recovery(progress, faults((2.0, 4.0)), max_recovery=30.0)
    assert not result["ok"] and result["per_fault"][0]["back_to_prefault"] is None
    assert result["per_fault"][0]["first_completion"] == 4.0

    done = [(1.0, 10, "running", 0, 10, 0), (2.0, 12, "finished", 0, 12, 0)]
    assert per_fault_recovery(done, faults((1.5, 3.0)))["per_fault"][0]["note"] == "ended"


def test_recomputes_are_counted_in_the_window_of_the_fault_that_caused_them() -> None:
    progress = [
        (1.0, 5, "running", 0, 5, 0),
        (3.0, 5, "running", 0, 7, 2),
        (5.0, 6, "running", 0, 8, 2),
        (7.0, 8, "running", 0, 12, 6),
        (9.0, 9, "running", 0, 13, 6),
    ]
    rows = per_fault_recovery(progress, faults((2.0, 4.0), (6.0, 8.0)))["per_fault"]
    assert [r["recomputed"] for r in rows] == [2, 4]


def test_max_recovery_is_an_option_with_a_default_of_a_few_seconds() -> None:
    assert parse_args(["--scenario", "mixed"]).max_recovery == 5.0
    assert parse_args(["--scenario", "mixed", "--max-recovery", "3"]).max_recovery == 3.0

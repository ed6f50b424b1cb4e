"""End to end: every example in ``examples/`` through the real ``tasksprint run`` command.

Each test starts ``python -m tasksprint.cli run SCHEDULER --node NODE`` as a
subprocess (3 replicas and 2 worker clients of 2 node slots, all real processes), parses the
JSON the command prints on stdout and checks the answer independently:
word counts are recomputed here from the same generator, the nonce is
hashed again, the genetic algorithm's best genome is evaluated again and
compared with a random baseline.

Every run is bounded twice: ``--timeout`` makes ``tasksprint run`` give up
(and stop its processes) by itself, and a longer limit here interrupts it
with SIGINT, which also makes it stop everything it started.  The run's
data directory and temporary files live under the test's ``tmp_path``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import random
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"

# Seconds ``tasksprint run`` may take before it gives up by itself; each
# example needs well under a minute, the margin is for a loaded machine.
RUN_TIMEOUT = 240
# Extra seconds before the test interrupts a ``tasksprint run`` that did not stop.
GRACE = 60
LOG_TAIL_LINES = 30


def load_example_module(example: str, module: str) -> ModuleType:
    """Import ``examples/<example>/<module>.py`` under a name no other test uses."""
    path = EXAMPLES / example / f"{module}.py"
    spec = importlib.util.spec_from_file_location(f"example_{example}_{module}", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"({exc})"
    return "\n".join(text[-lines:])


def _processes_in(directory: Path) -> list[tuple[int, str]]:
    """(pid, command line) of live processes whose working directory is ``directory``."""
    found = []
    for proc_dir in Path("/proc").iterdir():
        if not proc_dir.name.isdigit() or int(proc_dir.name) == os.getpid():
            continue
        try:
            if Path(os.readlink(proc_dir / "cwd")) != directory:
                continue
            cmdline = (proc_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (proc_dir / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            found.append((int(proc_dir.name), cmdline))
    return found


class RunResult:
    def __init__(self, result: dict[str, Any], stderr: str) -> None:
        self.result = result
        self.stderr = stderr

    @property
    def values(self) -> Any:
        return self.result["values"]

    def final_progress(self) -> str:
        """The last progress line ``tasksprint run`` printed on stderr."""
        lines = [ln for ln in self.stderr.splitlines() if ln.startswith("[")]
        assert lines, f"no progress lines on stderr:\n{self.stderr}"
        return lines[-1]


def run_example(tmp_path: Path, example: str, scheduler_class: str, **env: str) -> RunResult:
    """Run one example with ``tasksprint run``; return its parsed result and stderr.

    Fails the test (with the run's stderr and the tails of its logs) when
    the command does not exit 0 or does not print one JSON document.
    """
    data = tmp_path / "run"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    # The run's own working directory: every process it starts (replicas,
    # clients, nodes) inherits it, which is how leftovers are found below.
    workdir = (tmp_path / "cwd").resolve()
    workdir.mkdir()
    directory = EXAMPLES / example
    cmd = [
        sys.executable,
        "-m",
        "tasksprint.cli",
        "run",
        f"{directory / 'scheduler.py'}:{scheduler_class}",
        "--node",
        f"python {shlex.quote(str(directory / 'node.py'))}",
        "--replicas",
        "3",
        "--clients",
        "2",
        "--slots",
        "2",
        "--timeout",
        str(RUN_TIMEOUT),
        "--data",
        str(data),
    ]
    # TMPDIR: the clients' object-store directories land in tmp_path too.
    full_env = {**os.environ, "TMPDIR": str(scratch), **env}
    proc = subprocess.Popen(
        cmd,
        cwd=workdir,
        env=full_env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # SIGINT (below) must reach Python's handler even if this test
        # runs with SIGINT ignored, as in a background job of a script.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        try:
            out, err = proc.communicate(timeout=RUN_TIMEOUT + GRACE)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)  # tasksprint run stops its cluster on Ctrl-C
            out, err = proc.communicate(timeout=GRACE)
            pytest.fail(f"tasksprint run did not stop within {RUN_TIMEOUT + GRACE}s\nstderr:\n{err}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        # Every process of the run works in ``workdir``: none may outlive it.
        stray = _processes_in(workdir)
        for pid, _ in stray:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    # Replicas and clients must be stopped by the time tasksprint run returns.
    # (A node busy with a task when its client was stopped finishes that task
    # before it sees its input close; such nodes are killed above.)
    not_nodes = [(pid, cmd) for pid, cmd in stray if "node.py" not in cmd]
    assert not not_nodes, f"processes left running after tasksprint run returned: {not_nodes}"

    if proc.returncode != 0:
        logs = "\n".join(
            f"--- {p.name} (last {LOG_TAIL_LINES} lines)\n{_tail(p, LOG_TAIL_LINES)}"
            for p in sorted(data.glob("*.log"))
        )
        pytest.fail(f"tasksprint run exited with {proc.returncode}\nstderr:\n{err}\n{logs}")
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one JSON line on stdout, got:\n{out}"
    result = json.loads(lines[0])
    assert set(result) == {"tasks", "values"}, result
    return RunResult(result, err)


# ---------------------------------------------------------------- Monte Carlo


def test_montecarlo_estimates_pi(tmp_path: Path) -> None:
    # Each sampling task samples for 5 s * scale; 1 s each still gives
    # tens of millions of points, an error far below the tolerance.
    run = run_example(tmp_path, "montecarlo", "MonteCarloCoordinator", TASKSPRINT_TIMEOUT_SCALE="0.2")
    estimate = run.values["result"]
    assert [t["values"] for t in run.result["tasks"]] == [{"result": estimate}]
    assert abs(estimate - math.pi) < 0.01, estimate
    assert "12 done" in run.final_progress()


# ------------------------------------------------------------------ word count


def test_wordcount_matches_local_count(tmp_path: Path) -> None:
    corpus = load_example_module("wordcount", "corpus")
    run = run_example(tmp_path, "wordcount", "WordCountCoordinator")
    values = run.values
    seeds = values["corpus"]["seeds"]
    words = values["corpus"]["words_per_chunk"]
    maps, reducers = values["maps"], values["reducers"]

    assert len(seeds) == maps == 8 and len(set(seeds)) == maps
    assert reducers == 4
    # The shuffle really carried several MB between map and reduce tasks.
    assert values["shuffle_bytes"] > 4_000_000, values["shuffle_bytes"]
    # The finishing task's values are the result the scheduler reports.
    assert [t["values"]["result"] for t in run.result["tasks"]] == [values["result"]]

    expected = corpus.expected_result(seeds, words, reducers, top=10)
    got = values["result"]
    assert got["total_words"] == expected["total_words"] == maps * words
    assert got["distinct_words"] == expected["distinct_words"]
    assert got["top"] == expected["top"]
    # Each reducer saw exactly the counts of its partition, from every map.
    assert got["partition_digests"] == expected["partition_digests"]
    assert f"{maps + reducers + 1} done" in run.final_progress()


def test_wordcount_corpus_is_reproducible_and_partitions_every_word() -> None:
    corpus = load_example_module("wordcount", "corpus")
    text = corpus.generate_text(7, 2000)
    assert corpus.generate_text(7, 2000) == text != corpus.generate_text(8, 2000)
    counts = corpus.count_words(text)
    assert sum(counts.values()) == 2000
    parts = corpus.split_counts(counts, 4)
    assert sum(len(p) for p in parts) == len(counts)
    assert all(corpus.partition(w, 4) == r for r, p in enumerate(parts) for w in p)
    # Another process (with another hash seed) puts every word in the same partition.
    words = sorted(counts)[:200]
    script = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import corpus; "
        "print(json.dumps([corpus.partition(w, 4) for w in json.loads(sys.argv[2])]))"
    )
    other = subprocess.run(
        [sys.executable, "-c", script, str(EXAMPLES / "wordcount"), json.dumps(words)],
        env={**os.environ, "PYTHONHASHSEED": "12345"},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(other.stdout) == [corpus.partition(w, 4) for w in words]


# ---------------------------------------------------------------------- search


def test_search_finds_a_valid_nonce_and_kills_the_rest(tmp_path: Path) -> None:
    run = run_example(tmp_path, "search", "SearchCoordinator")
    v = run.values
    nonce, difficulty = v["nonce"], v["difficulty"]
    assert isinstance(nonce, int), v
    digest = hashlib.sha256((v["prefix"] + str(nonce)).encode()).hexdigest()
    assert digest == v["hash"]
    assert digest.startswith("0" * difficulty), digest
    assert difficulty >= 5

    # The finishing task is the one that found it.
    assert [t["tid"] for t in run.result["tasks"]] == [v["found_by"]]
    assert run.result["tasks"][0]["values"]["found"]["nonce"] == nonce

    # The scheduler keeps more tasks started than the 2 x 2 node slots can
    # run, so when one finds a nonce others are still running or waiting:
    # kill_task must have reported them.
    killed = v["killed"]
    assert killed, v
    assert len(set(killed)) == len(killed)
    assert v["found_by"] not in killed
    assert all(1 <= tid <= v["tasks_started"] for tid in killed)
    # The runtime agrees: the last progress line counts them as killed.
    progress = run.final_progress()
    assert progress.startswith("[finished]")
    assert re.search(rf"\b{len(killed)} killed / {v['tasks_started']}\b", progress), progress


# --------------------------------------------------------------------- genetic


def test_genetic_beats_random_baseline(tmp_path: Path) -> None:
    landscape = load_example_module("genetic", "landscape")
    run = run_example(tmp_path, "genetic", "GeneticCoordinator")
    v = run.values
    targets, weights = v["targets"], v["weights"]
    best = v["best_genome"]
    bits = len(targets[0])
    assert len(best) == bits and set(best) <= {"0", "1"}

    # The reported fitness is the genome's real fitness.
    assert landscape.fitness(best, targets, weights) == v["best_fitness"]

    # Elitist selection: the best fitness never drops between generations.
    history = v["history"]
    assert len(history) == v["generations"] + 1
    assert history[0] == v["initial_best_fitness"]
    assert all(a <= b for a, b in zip(history, history[1:])), history

    # Better than the random generation 0, and better than the best of
    # several random populations of the same size drawn here.
    rng = random.Random(12345)
    baseline = max(
        landscape.fitness(landscape.random_genome(rng, bits), targets, weights) for _ in range(5 * v["population"])
    )
    assert v["best_fitness"] > v["initial_best_fitness"], v
    assert v["best_fitness"] > baseline, (v["best_fitness"], baseline)
    # Groups of similar genomes were formed: many at first, from random genomes.
    assert v["groups"][0] > 1

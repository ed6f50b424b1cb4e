# One place for the commands the README documents.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo lint test slurm-check soak fuzz-soak jepsen-soak bench clean

$(BIN)/tasksprint: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@# PYTHONWARNINGS=ignore: setuptools prints a boxed "Editable installation"
	@# deprecation notice for every -e install; it is about setuptools' own
	@# future, not this project, and would fill the first screen of `make demo`.
	PYTHONWARNINGS=ignore $(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(BIN)/tasksprint

demo: install
	$(BIN)/tasksprint run examples/montecarlo/scheduler.py:MonteCarloCoordinator \
		--node "python examples/montecarlo/node.py" --replicas 3 --clients 2

# The one lint gate: style, formatting, types (strict where pyproject says)
# and the import-graph contracts of docs/architecture.md.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports --cache-dir $(VENV)/.import_linter_cache

test: install lint
	@# System packages for the fault-injection and sandbox tests (installed as root).
	@if [ "$$(id -u)" = 0 ]; then sh tests/setup-system.sh; fi
	$(BIN)/python -m pytest -q -p no:cacheprovider

# tasksprint batch submitted with sbatch to a two-node Slurm the test starts on
# this machine (as root), beside disBatch on the same task file; also part of `make test`.
slurm-check: install
	@if [ "$$(id -u)" = 0 ]; then sh tests/setup-system.sh; fi
	PYTHONWARNINGS=ignore $(BIN)/pip install -q -e '.[test,bench]'
	$(BIN)/python -m pytest -v -rs -p no:cacheprovider tests/test_batch_slurm_real.py

# 100,000 simulation seeds, and 5,000 new runs of the Paxos state machine (random, not the fixed ones of `make test`).
soak: install
	TASKSPRINT_SIM_SEEDS=100000 $(BIN)/python -m pytest -q -p no:cacheprovider -m soak tests/test_simulation.py
	TASKSPRINT_HYPOTHESIS_EXPLORE=1 TASKSPRINT_HYPOTHESIS_EXAMPLES=5000 \
		$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_simulation.py::TestPaxosMachine

# The wire fuzzer of `make test` (100,000 frames) at twenty times the frames.
fuzz-soak: install
	TASKSPRINT_FUZZ_FRAMES=2000000 $(BIN)/python -m pytest -q -p no:cacheprovider tests/test_fuzz_wire.py

jepsen-soak: install
	sh jepsen/setup.sh
	$(BIN)/python jepsen/run --scenario all --time 600

bench: install
	$(BIN)/pip install -q -e '.[test,bench]'
	$(BIN)/python bench/log.py
	$(BIN)/python bench/tasks.py

clean:
	rm -rf $(VENV) build *.egg-info

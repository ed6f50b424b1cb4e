# One place for the commands the README documents.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo test soak jepsen-soak bench clean

$(BIN)/tasksprint: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(BIN)/tasksprint

demo: install
	$(BIN)/tasksprint run examples/montecarlo/scheduler.py:MonteCarloCoordinator \
		--node "python examples/montecarlo/node.py" --replicas 3 --clients 2

test: install
	@# The fault-injection tests need iptables, iproute2 and libfaketime (installed as root).
	@if [ "$$(id -u)" = 0 ]; then sh jepsen/setup.sh; fi
	$(BIN)/python -m pytest -q -p no:cacheprovider

soak: install
	TASKSPRINT_SIM_SEEDS=100000 $(BIN)/python -m pytest -q -p no:cacheprovider -m soak tests/test_simulation.py

jepsen-soak: install
	sh jepsen/setup.sh
	$(BIN)/python jepsen/run --scenario all --time 600

bench: install
	$(BIN)/pip install -q -e '.[test,bench]'
	$(BIN)/python bench/log.py
	$(BIN)/python bench/tasks.py

clean:
	rm -rf $(VENV) build *.egg-info

# One entry point for people and CI. `make demo` and `make test` work on a fresh machine with python3.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test unit lint snapshots bench bench-fleet clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(PY) -m tests.support.demo

test: setup lint
	$(PY) -m pytest -q

unit: setup
	$(PY) -m pytest -q -m "not e2e"

lint: setup
	$(VENV)/bin/ruff check controlplane tests benchmarks
	$(VENV)/bin/ruff format --check controlplane tests benchmarks
	$(VENV)/bin/mypy

# Regenerate the golden snapshots after a deliberate compiler change; review the diff.
snapshots: setup
	@for case in examples/*/; do \
		name=$$(basename $$case); \
		$(VENV)/bin/controlplane compile $$case --out snapshots/$$name > /dev/null || exit 1; \
		echo "snapshots/$$name"; \
	done

bench: setup
	$(PY) benchmarks/compile_scale.py
	$(PY) benchmarks/policy_commit.py
	$(PY) benchmarks/policy_to_enforcement.py
	$(PY) benchmarks/xds_fanout.py
	$(PY) benchmarks/revocation_latency.py

bench-fleet: setup
	$(PY) benchmarks/grpc_floor.py --size 83000 --rounds 10
	$(PY) benchmarks/grpc_floor.py --size 83000 --rounds 10 --grpc-defaults
	$(PY) benchmarks/delta_push_cost.py
	$(PY) benchmarks/fleet_sim.py --streams 1000 --workers 2 --scenario all --mode sotw
	$(PY) benchmarks/fleet_sim.py --streams 1000 --workers 2 --scenario all --mode delta
	$(PY) benchmarks/fleet_sim.py --streams 10000 --workers 4 --inflight 125 --scenario connect,policy --commits 5 --mode sotw
	$(PY) benchmarks/fleet_sim.py --streams 10000 --workers 4 --inflight 125 --scenario connect,policy --commits 5 --mode delta
	$(PY) benchmarks/sovereign_compare.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .demo

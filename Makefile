# One entry point for people and CI. `make demo` and `make test` work on a fresh machine with python3.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: prometheusrule setup demo test unit lint snapshots bench bench-fleet fuzz clean constraints image browser

# Every package at the version in constraints.txt, the one the image is built with too (Dockerfile).
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

# Rewrite constraints.txt from the working venv after a deliberate upgrade (pip install -U X there), and review the
# diff: every installed package pinned exactly, but the project itself and packages installed from a URL or a file
# (the optional fuzz extra's atheris), which no index serves. tests/test_image_constraints.py checks the result.
constraints:
	@test -x $(PY) || { echo "no venv at $(VENV): run make setup first"; exit 1; }
	{ echo "# Exact versions of every package, for make setup and the image (pip install -c). make constraints"; \
	  echo "# rewrites this file from the working venv; see docs/deploying-image.md."; \
	  $(PY) -m pip freeze --exclude-editable | grep -v -e '^#' -e ' @ '; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

# The container image (Dockerfile, docs/deploying-image.md), where a container engine is installed.
IMAGE ?= controlplane:latest
CONTAINER_ENGINE ?= docker
image:
	@command -v $(CONTAINER_ENGINE) >/dev/null || { echo "$(CONTAINER_ENGINE) not found: the image needs a container engine (CONTAINER_ENGINE=podman works too)"; exit 1; }
	$(CONTAINER_ENGINE) build --tag $(IMAGE) .

demo: setup
	$(PY) -m tests.support.demo

# Two test processes (pytest-xdist), a module per process at a time (module-scoped stacks stay in one): most of
# the e2e time is waiting on real Envoys, servers and clocks, so two overlap well on a 2-core machine.
TEST_WORKERS ?= 2
test: setup lint browser
	$(PY) -m pytest -q --durations=15 -n $(TEST_WORKERS) --dist loadfile

# Debian's headless Chromium, which tests/test_report_browser.py opens the HTML report in: installed with apt-get
# when missing and this runs as root with apt (CI); otherwise how to. That test fails under CI=true without it.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium (apt-get) for tests/test_report_browser.py"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null || exit 1; \
	  else \
	    echo "chromium not found: install it (Debian/Ubuntu: sudo apt-get install chromium) or the HTML report's"; \
	    echo "browser test is skipped (and fails under CI=true)"; \
	  fi; }

unit: setup
	$(PY) -m pytest -q -m "not e2e"

lint: setup
	$(VENV)/bin/ruff check controlplane tests benchmarks
	$(VENV)/bin/ruff format --check controlplane tests benchmarks
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-cache

# The Kubernetes PrometheusRule, written from deploy/monitoring/prometheus/alerts.yaml after an edit there.
prometheusrule: setup
	$(PY) deploy/monitoring/prometheusrule.py

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
	$(PY) benchmarks/audit_writes.py
	$(PY) benchmarks/aws_role_routes.py

bench-fleet: setup
	$(PY) benchmarks/grpc_floor.py --size 83000 --rounds 10
	$(PY) benchmarks/grpc_floor.py --size 83000 --rounds 10 --grpc-defaults
	$(PY) benchmarks/delta_push_cost.py
	$(PY) benchmarks/fleet_sim.py --streams 1000 --workers 2 --scenario all --mode sotw
	$(PY) benchmarks/fleet_sim.py --streams 1000 --workers 2 --scenario all --mode delta
	$(PY) benchmarks/fleet_sim.py --streams 10000 --workers 4 --inflight 125 --scenario connect,policy --commits 5 --mode sotw
	$(PY) benchmarks/fleet_sim.py --streams 10000 --workers 4 --inflight 125 --scenario connect,policy --commits 5 --mode delta
	$(PY) benchmarks/sovereign_compare.py

# The policy's JSON Schema for editors (README, "Policy reference"), rewritten from the loader's definitions after
# a change there; tests/test_policy_schema.py fails while the committed file is stale.
.PHONY: schema
schema: setup
	$(PY) -c 'import sys; from controlplane.model.schema import render; sys.stdout.write(render())' > schema/controlplane-policy.schema.json.new
	mv schema/controlplane-policy.schema.json.new schema/controlplane-policy.schema.json

# Long fuzz run: hypothesis profile "fuzz" (FUZZ_EXAMPLES cases per target), then atheris on each target for up to
# FUZZ_SECONDS or FUZZ_RUNS inputs. Prints cases run and crashes found per target; see docs/fuzzing.md.
FUZZ_EXAMPLES ?= 20000
FUZZ_RUNS ?= 500000
FUZZ_SECONDS ?= 120
fuzz: setup
	@status=0; \
	FUZZ_PROFILE=fuzz FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q -p no:cacheprovider tests/fuzz || status=$$?; \
	if $(PY) -c 'import atheris' 2>/dev/null || $(PY) -m pip install --quiet -e '.[fuzz]'; then \
		for target in loader webhook exchange status; do \
			$(PY) -m tests.fuzz.atheris_targets $$target --runs $(FUZZ_RUNS) --seconds $(FUZZ_SECONDS) || status=1; \
		done; \
	else echo "atheris could not be installed here: coverage-guided runs skipped"; fi; \
	exit $$status

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .demo .fuzz .hypothesis

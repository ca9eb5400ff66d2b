PYTHON ?= python3
# The pyz carries bytecode for the Python that builds it, and only that Python uses it: zipimport reads NAME.pyc
# beside NAME.py, one version per archive, and any other Python compiles the sources at every start (still runs).
# So the build uses the hosts' Python, 3.9 (Amazon Linux 2023's) where this machine has it, unless PYTHON or
# BUILD_PYTHON is given; docs/bench.md (bench-startup) has the numbers. The benches that run the built pyz run on
# that Python too, as a host would.
# `command -v` is not enough: a pyenv shim for python3.9 exists even where pyenv will not run it (exit 127).
BUILD_PYTHON ?= $(if $(filter file,$(origin PYTHON)),$(shell python3.9 -c 'import sys; print(sys.executable)' 2>/dev/null || echo $(PYTHON)),$(PYTHON))

.PHONY: all build deps test demo bench bench-fleet bench-fleet-status bench-watch bench-instant bench-startup clean settings-docs

all: build

# Always run (half a second): the archive depends on which Python builds it, not only on the sources, and
# `make build BUILD_PYTHON=...` after another build must not keep the other Python's bytecode.
build:
	$(BUILD_PYTHON) build.py

deps:
	bash .ci/install-deps

test: deps
	$(PYTHON) -m pytest -q tests

demo: deps build
	$(PYTHON) tests/demo.py

# A benchmark, not a test: K consecutive deploys under load, bluegreen against the seed-style baseline.
K ?= 20
bench: deps build
	$(BUILD_PYTHON) tests/bench/bench.py --deploys $(K)

# Also a benchmark, not in CI: K full rollouts over 3 hosts behind haproxy for each of bluegreen with the
# load-balancer hooks, bluegreen without them and the guide's ssh + deploy.sh (K defaults to 3 here).
bench-fleet: deps build
	$(BUILD_PYTHON) tests/bench/bench_fleet.py --rollouts $(if $(filter file,$(origin K)),3,$(K))

# A benchmark, not in CI: `status PROJECT --hosts h1,h2,h3` against one host's `status` over ssh, paired runs.
bench-fleet-status: deps build
	$(BUILD_PYTHON) tests/bench/bench_fleet_status.py

# A benchmark, not in CI: a release that fails real requests under load, caught by the watch window against the
# seed's flow (switch, then a manual redeploy of v1 after a 60 s detection delay); K runs each (3 here).
bench-watch: deps build
	$(BUILD_PYTHON) tests/bench/bench_watch.py --runs $(if $(filter file,$(origin K)),3,$(K))

# A benchmark, not in CI: rollback wall time through the retained container (instant) against the pull path, paired.
# RTT=MS puts the registry that many milliseconds away (a delaying proxy).
RTT ?= 0
bench-instant: deps build
	$(BUILD_PYTHON) tests/bench/bench_instant_rollback.py --rtt $(RTT)

# A benchmark, not in CI: `--version`, `--help`, `status` and a `--dry-run` deploy against `python -c pass`, paired
# runs on Python 3.9 and the newest here, each with its own bytecode, another Python's and none (it builds them).
bench-startup: deps
	$(PYTHON) tests/bench/bench_startup.py

# The env template and docs/env-reference.md, generated from the table in bluegreen/settings.py.
settings-docs:
	$(PYTHON) -m bluegreen.settings --write

clean:
	rm -rf dist .pytest_cache

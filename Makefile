PYTHON ?= python3

.PHONY: all build deps test demo bench bench-fleet bench-fleet-status bench-watch bench-instant clean settings-docs

all: build

build: dist/bluegreen.pyz

dist/bluegreen.pyz: build.py $(shell find bluegreen -name '*.py')
	$(PYTHON) build.py

deps:
	bash .ci/install-deps

test: deps
	$(PYTHON) -m pytest -q tests

demo: deps build
	$(PYTHON) tests/demo.py

# A benchmark, not a test: K consecutive deploys under load, bluegreen against the seed-style baseline.
K ?= 20
bench: deps build
	$(PYTHON) tests/bench/bench.py --deploys $(K)

# Also a benchmark, not in CI: K full rollouts over 3 hosts behind haproxy for each of bluegreen with the
# load-balancer hooks, bluegreen without them and the guide's ssh + deploy.sh (K defaults to 3 here).
bench-fleet: deps build
	$(PYTHON) tests/bench/bench_fleet.py --rollouts $(if $(filter file,$(origin K)),3,$(K))

# A benchmark, not in CI: `status PROJECT --hosts h1,h2,h3` against one host's `status` over ssh, paired runs.
bench-fleet-status: deps build
	$(PYTHON) tests/bench/bench_fleet_status.py

# A benchmark, not in CI: a release that fails real requests under load, caught by the watch window against the
# seed's flow (switch, then a manual redeploy of v1 after a 60 s detection delay); K runs each (3 here).
bench-watch: deps build
	$(PYTHON) tests/bench/bench_watch.py --runs $(if $(filter file,$(origin K)),3,$(K))

# A benchmark, not in CI: rollback wall time through the retained container (instant) against the pull path, paired.
# RTT=MS puts the registry that many milliseconds away (a delaying proxy).
RTT ?= 0
bench-instant: deps build
	$(PYTHON) tests/bench/bench_instant_rollback.py --rtt $(RTT)

# The env template and docs/env-reference.md, generated from the table in bluegreen/settings.py.
settings-docs:
	$(PYTHON) -m bluegreen.settings --write

clean:
	rm -rf dist .pytest_cache

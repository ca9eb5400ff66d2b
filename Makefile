PYTHON ?= python3

.PHONY: all build deps test demo bench clean

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

clean:
	rm -rf dist .pytest_cache

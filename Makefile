# Two commands do everything on a fresh machine:
#   make demo   runs the whole loop for about a minute and prints a summary
#   make test   runs the test suite
# `make setup` alone installs what both need; every step is skipped when already done.

PYTHON ?= python3
VENV := .venv
TRITON_VENV := .triton-venv
KAFKA_LIBS := .cache/kafka/libs
APT_UPDATED := .cache/apt-updated

.PHONY: setup demo test unit lint clean stack-down

setup: $(VENV)/.installed $(TRITON_VENV)/.installed $(KAFKA_LIBS)/.resolved redis-server

demo: setup
	$(VENV)/bin/camoe demo
	@scripts/no_leftovers.sh

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/python -m pytest
	@scripts/no_leftovers.sh

# The fast loop for contributors: lint and the unit tests, no services.
unit: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -m unit -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

stack-down:
	-$(VENV)/bin/camoe stack down

$(VENV)/.installed: pyproject.toml
	@PYTHON=$(PYTHON) scripts/require.sh python
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip uv
	$(VENV)/bin/uv pip install --python $(VENV)/bin/python -q -e '.[dev]'
	touch $@

# Triton's Python backend needs numpy < 2 where the stub runs; Feast needs numpy >= 2.
$(TRITON_VENV)/.installed: scripts/triton-runtime.txt
	@PYTHON=$(PYTHON) scripts/require.sh python
	$(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/python -m pip install -q --upgrade pip uv
	$(TRITON_VENV)/bin/uv pip install --python $(TRITON_VENV)/bin/python -q -r scripts/triton-runtime.txt
	$(TRITON_VENV)/bin/python scripts/install_triton_stub.py
	touch $@

$(KAFKA_LIBS)/.resolved: services/pom.xml
	@scripts/require.sh java maven
	mvn -q -B -f services/pom.xml dependency:copy-dependencies \
	    -DoutputDirectory=$(CURDIR)/$(KAFKA_LIBS) -DincludeScope=runtime
	touch $@

redis-server:
	@command -v redis-server >/dev/null || scripts/require.sh redis

clean:
	rm -rf $(VENV) $(TRITON_VENV) .cache out

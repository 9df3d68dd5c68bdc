# The two commands of the Quick start: `make demo` and `make test`.
# Each creates .venv on first use and installs what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint unit soak bench tools mutate clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/signalwire-exporter demo $(DEMO_FLAGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --strict exporter

# Under coverage, the processes the tests start included (see [tool.coverage] in pyproject.toml):
# one combined report at the end, failing under its floor.
test: lint tools
	rm -f .coverage .coverage.*
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/coverage run -m pytest -q; \
	status=$$?; \
	$(BIN)/coverage combine --quiet && $(BIN)/coverage report && exit $$status

# Prometheus, promtool, Alertmanager and amtool, when missing: the monitoring tests run the real
# ones. Taken from the distribution's packages without installing them (unpacked under
# .venv/tools, linked into .venv/bin): no service is installed or started.
tools: $(STAMP)
	@./scripts/ensure-tools.sh $(VENV)

unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

# The benchmark suite: a busy day (1,000,000 messages) in virtual time and the other figures,
# printed next to their targets and written to bench-results.json.
bench: $(STAMP)
	$(BIN)/python -m tests.benchmarks.bench --output bench-results.json

# The soak test alone, for as long as SOAK_SECONDS says (60 s in `make test`).
soak: $(STAMP)
	SOAK_SECONDS=$${SOAK_SECONDS:-600} $(BIN)/pytest -q -s tests/integration/test_soak.py

# Mutation testing of the counting core, each module against its own unit tests, one worker
# (docs/mutation.md). MUTATE_FLAGS: module names to run only those, --fresh to start over.
MUTATE_VENV := .venv-mutate
$(MUTATE_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(MUTATE_VENV)
	$(MUTATE_VENV)/bin/pip install --quiet --upgrade pip
	$(MUTATE_VENV)/bin/pip install --quiet -e '.[dev,mutate]'
	touch $@

mutate: $(MUTATE_VENV)/.installed
	$(MUTATE_VENV)/bin/python scripts/mutate.py $(MUTATE_FLAGS)

clean:
	rm -rf $(VENV) $(MUTATE_VENV) .pytest_cache .mypy_cache .ruff_cache .coverage .coverage.* .mutation mutants

# BeTrace: `make run` shows the shipped rules at work; `make test` runs every test.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test check bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/betrace check rules/
	$(BIN)/betrace test rules/
	$(BIN)/betrace replay --rules rules/ --format table rules/samples/incidents.otlp.jsonl

test: $(STAMP)
	$(BIN)/python -m pytest

check: $(STAMP)
	$(BIN)/betrace check rules/

bench: $(STAMP)
	$(BIN)/python bench/rules.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis

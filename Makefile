# Two entry points do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: demo test proto bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# One stamp per extra set, rebuilt whenever pyproject.toml changes.
$(VENV)/.installed-client: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[client]'
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	touch $@

demo: $(VENV)/.installed-client
	$(BIN)/maskbank demo

# The committed serving/_proto is what is tested (tests/test_protos.py fails when it is stale):
# regenerating it first, as this target did, made that check pass whatever was committed.
test: $(VENV)/.installed-test
	$(BIN)/python -m pytest

# Regenerates serving/_proto from protos/ (tests fail when the committed copy is stale).
proto: $(VENV)/.installed-test
	$(BIN)/python protos/generate.py

bench: $(VENV)/.installed-test
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) demo-registry .pytest_cache

# Two commands: `make demo` and `make test`. Each creates .venv if missing and installs the pinned project.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test venv bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/explaind demo --out demo-out

test: $(STAMP)
	$(BIN)/python -m pytest -q tests --nbmake notebooks

bench: $(STAMP)
	$(BIN)/python bench/record_overhead.py
	$(BIN)/python bench/engine.py

clean:
	rm -rf $(VENV) demo-out

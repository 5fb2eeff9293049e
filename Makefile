# The two commands of the README: `make demo` and `make test`. Both set up .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel; on a CUDA machine use e.g. `make test TORCH=torch` to take pip's default build.
TORCH ?= torch==2.13.0

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -q

# Everything but the tests marked slow (real weights fetched through registries, fault trials).
test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow"

demo: $(VENV)/.installed
	$(PY) -m minilora demo

# Opt-in, not in `make test`: against llama.cpp itself. llama-cpp-python reaches this machine only as
# source, so its own venv compiles llama.cpp (about 5 minutes on 2 cores, once).
LLAMA_VENV ?= .venv-llamacpp
$(LLAMA_VENV)/.installed:
	$(PYTHON) -m venv $(LLAMA_VENV)
	$(LLAMA_VENV)/bin/python -m pip install -q llama-cpp-python==0.3.36 numpy
	touch $@

test-llamacpp: $(VENV)/.installed $(LLAMA_VENV)/.installed
	MINILORA_LLAMACPP_PYTHON=$(LLAMA_VENV)/bin/python $(PY) -m pytest -q -s tests/test_llamacpp.py

# Opt-in, not in `make test`: LoRA's variants side by side on SmolLM2-135M (benchmarks/README.md), with
# peft's time and memory beside ours; about 40 minutes on 2 cores.
method-comparison: $(VENV)/.installed
	$(PY) benchmarks/method_comparison.py

.PHONY: install test test-fast demo test-llamacpp method-comparison

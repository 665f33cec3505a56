# The two commands of this repository (see README.md):
#   make tour   run every step in order with small settings on the hardware present, then print a summary
#   make test   run the test suite (real multi-process groups on CPU)
# Both create a virtualenv in .venv and install what they need the first time.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: tour test install clean

tour: $(VENV)/.installed
	$(PY) tools/tour.py

test: $(VENV)/.installed
	$(PY) -m pytest

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	@# Without an NVIDIA GPU, take the CPU-tested PyTorch release first (its CPU wheel is small);
	@# with one, requirements.txt's loose range picks a CUDA build. Either way the range holds.
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q "torch==2.13.0" || true; fi
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache runs

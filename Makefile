# `make demo` (the three-phase DC-AE trainer on builtin photos) and `make test` set everything up on a fresh
# machine: .venv, CPU torch where there is no CUDA,
# the project with its dev extra; then run the main job / the whole test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	if ! nvidia-smi -L >/dev/null 2>&1; then $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m dcae.demo

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) -m csrc_bench report

clean:
	rm -rf $(VENV) build *.egg-info

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

# On a CUDA GPU: the kernel benchmarks and their report. Without one nothing can be measured, so the tiny CPU
# smoke runs of the end-to-end benchmarks (csrc_bench/report.py: SMOKE_COMMANDS) check their code paths instead.
SMOKE_BENCHES := model train diffusion
bench: $(STAMP)
	@if $(PY) -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then \
		$(PY) -m csrc_bench report; \
	else \
		echo "No CUDA GPU on this machine: nothing can be measured. Running tiny CPU smoke runs instead:" \
			"they check the benchmark code paths, they are not performance figures."; \
		for name in $(SMOKE_BENCHES); do \
			echo "$(PY) -m csrc_bench $$name --smoke"; \
			$(PY) -m csrc_bench $$name --smoke || exit 1; \
		done; \
	fi

clean:
	rm -rf $(VENV) build *.egg-info

# Two commands for a newcomer: `make demo` and `make test`. Each creates .venv itself.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/rtsc demo

test: $(STAMP)
	bash scripts/system-deps.sh
	OPENBLAS_NUM_THREADS=1 $(BIN)/python -m pytest -q --durations=15

bench: $(STAMP)
	OPENBLAS_NUM_THREADS=1 $(BIN)/python benchmarks/latency.py
	OPENBLAS_NUM_THREADS=1 $(BIN)/python benchmarks/registration.py
	OPENBLAS_NUM_THREADS=1 $(BIN)/python benchmarks/glm.py
	OPENBLAS_NUM_THREADS=1 $(BIN)/python benchmarks/display.py
	OPENBLAS_NUM_THREADS=1 $(BIN)/python benchmarks/qc.py
	OPENBLAS_NUM_THREADS=1 $(BIN)/python benchmarks/intake.py
	OPENBLAS_NUM_THREADS=1 $(BIN)/python benchmarks/cord.py
	OPENBLAS_NUM_THREADS=1 $(BIN)/python benchmarks/cord_glm.py

clean:
	rm -rf $(VENV) sessions .pytest_cache

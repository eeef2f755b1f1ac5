# Two commands for a newcomer: `make demo` and `make test`. Each creates .venv itself.
# `make test` runs the whole suite (what CI calls; about 14 min on 2 cores).
# `make check` runs only the fast tests (no `slow` or `system` marker, see pyproject.toml):
# under 2 min, for the edit-test loop; it needs none of the Debian peers.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test check bench clean

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

check: $(STAMP)
	OPENBLAS_NUM_THREADS=1 $(BIN)/python -m pytest -q -m "not slow and not system"

bench: $(STAMP)
	OPENBLAS_NUM_THREADS=1 $(BIN)/python benchmarks/latency.py
	OPENBLAS_NUM_THREADS=1 $(BIN)/python benchmarks/registration.py
	OPENBLAS_NUM_THREADS=1 $(BIN)/python benchmarks/mni_registration.py
	OPENBLAS_NUM_THREADS=1 $(BIN)/python benchmarks/glm.py
	OPENBLAS_NUM_THREADS=1 $(BIN)/python benchmarks/display.py
	OPENBLAS_NUM_THREADS=1 $(BIN)/python benchmarks/qc.py
	OPENBLAS_NUM_THREADS=1 $(BIN)/python benchmarks/intake.py
	OPENBLAS_NUM_THREADS=1 $(BIN)/python benchmarks/cord.py
	OPENBLAS_NUM_THREADS=1 $(BIN)/python benchmarks/cord_glm.py

clean:
	rm -rf $(VENV) sessions .pytest_cache

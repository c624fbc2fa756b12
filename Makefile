# Two commands do all the set-up on a fresh machine (Python >= 3.10 with venv):
#   make demo   - create .venv, install contrastlab, train the demo on the embedded data
#   make test   - create .venv, install contrastlab with test tools, run the test suite
VENV ?= .venv
# Python caches each module's compiled bytecode (__pycache__/, git-ignored) even where the environment sets
# PYTHONDONTWRITEBYTECODE (some container images do): otherwise every process the suite starts (pytest workers,
# trainers, SLURM jobs) compiles contrastlab and the test modules from source again, 4-5 s per pytest worker.
unexport PYTHONDONTWRITEBYTECODE
PY := $(VENV)/bin/python
STAMP := $(VENV)/.contrastlab-installed

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/contrastlab demo

# The suite runs in up to 4 worker processes (pytest-xdist), one torch thread each; `.venv/bin/python -m pytest` runs it in one process.
# The tests marked `numerics` (float results compared with numbers recorded on other machines) run on torch's scalar
# kernels, as on a CPU with other vector units than the one that recorded them: a test that holds on one CPU's rounding
# only fails here. (`.venv/bin/python -m pytest` runs them on this CPU's own kernels.) That pass collects only the test
# files that mark tests `numerics` (tests/test_docs.py checks that it finds them all).
PYTEST := $(PY) -m pytest -n auto --maxprocesses 4 --dist worksteal
NUMERICS_FILES := $(shell grep -l 'mark\.numerics' tests/test_*.py)
test: $(STAMP)
	@$(PY) tests/step_losses.py --machine
	$(PYTEST) -m "not numerics"
	ATEN_CPU_CAPABILITY=default $(PYTEST) -m numerics $(NUMERICS_FILES)

clean:
	rm -rf $(VENV) runs

# The two commands a newcomer needs: `make lab` and `make test`. Both build .venv on first use.
#
#   make lab      build .venv if missing, then serve JupyterLab on notebooks/ (prints the URL)
#   make test     build .venv if missing, then pytest (tests/, mmlib doctests) and nbval (notebooks/)
#   make course   re-execute every notebook in place at tiny scale, refreshing committed outputs
#   make bench    run every script in benchmarks/ (they print speed and memory figures)
#
# Variables: PYTHON (interpreter that builds the venv), TORCH (the torch requirement installed
# first: torch==2.13.0 is the CPU build CI uses; e.g. TORCH="torch --index-url
# https://download.pytorch.org/whl/cu126" for a GPU), JOBS (make test: zoo entries, then test
# files, run at once; default: the number of cores), LAB_IP, LAB_PORT, LAB_ARGS.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
LAB_IP ?= 127.0.0.1
LAB_PORT ?= 8888
LAB_ARGS ?=
NOTEBOOKS := $(sort $(wildcard notebooks/*.ipynb))
# The longest notebooks first, so that the test workers finish together.
LONG_NOTEBOOKS := notebooks/07_any_to_any.ipynb notebooks/03_diffusion_decoders.ipynb notebooks/06_lora_instruction_tuning.ipynb
NBVAL := --nbval-lax --nbval-current-env --nbval-cell-timeout=900 --nbval-sanitize-with tests/nbval_sanitize.cfg
# One process per core, each on one thread: never more threads than cores (two workers of two
# threads each on two cores made make test three times slower, as OpenMP threads fight for them).
JOBS ?= $(shell nproc 2>/dev/null || echo 2)
# Jupyter refuses to run as root (containers, CI) unless told it may.
ALLOW_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root)
# Python may cache the bytecode of what it imports. With PYTHONDONTWRITEBYTECODE set (some CI
# images and containers set it) nothing is cached, and since the venv is installed --no-compile,
# every process compiles torch, transformers and diffusers from source again: 13 s instead of 6 to
# load lesson 7's model, in each of the ~25 processes and kernels of make test (measured,
# benchmarks/startup.py). Our recipes cache it: only .venv and the ignored __pycache__ folders get it.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: lab test course bench venv

venv: $(VENV)/.installed

# torch goes in first, on its own: a later `pip install -e .` then finds its range satisfied and
# never resolves a CUDA build of several GB on a CPU machine. --no-compile: Python compiles the
# modules it imports on first use; compiling every installed file up front took a minute (110 s
# against 53 s for the install, measured).
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --no-compile $(TORCH)
	$(BIN)/python -m pip install --quiet --no-compile -e ".[dev]"
	$(BIN)/python -m ipykernel install --sys-prefix --name mmlib --display-name "Python (mmlib)" > /dev/null
	touch $@

lab: venv
	@echo "JupyterLab on notebooks/ (kernel 'Python (mmlib)'); open the http://$(LAB_IP):$(LAB_PORT)/lab?token=... URL printed below. Ctrl-C stops it."
	$(BIN)/jupyter lab --no-browser --ip=$(LAB_IP) --port=$(LAB_PORT) --ServerApp.root_dir=notebooks $(ALLOW_ROOT) $(LAB_ARGS)

# A fresh, empty zoo cache for every run: each component proves it still trains from scratch.
# The zoo trains every entry first, JOBS at a time in dependency order (python -m mmlib.zoo); then
# pytest runs the tests, the doctests and the notebooks in JOBS workers, one test file or notebook
# each at a time, all loading what the zoo trained.
test: venv
	@cache=$$(mktemp -d) && echo "zoo cache for this run: $$cache" && \
	export MMLIB_CACHE=$$cache MMLIB_SCALE=tiny OMP_NUM_THREADS=1 && \
	MMLIB_PROGRESS=0 $(BIN)/python -m mmlib.zoo --jobs $(JOBS) all && \
	$(BIN)/python -m pytest -n $(JOBS) --dist loadscope $(NBVAL) $(LONG_NOTEBOOKS) \
		$(filter-out $(LONG_NOTEBOOKS),$(NOTEBOOKS)) tests --doctest-modules mmlib; \
	status=$$?; rm -rf $$cache; exit $$status

# MMLIB_PROGRESS=0: a progress bar saved in a notebook shows frozen at 0%; the lab still shows them live.
course: venv
	MMLIB_SCALE=tiny MMLIB_PROGRESS=0 $(BIN)/jupyter nbconvert --to notebook --execute --inplace \
		--ExecutePreprocessor.timeout=1800 --ExecutePreprocessor.kernel_name=python3 $(NOTEBOOKS)

bench: venv
	@for script in benchmarks/*.py; do echo "== $$script"; $(BIN)/python $$script || exit 1; done

# The two commands a newcomer needs: `make lab` and `make test`. Both build .venv on first use.
#
#   make lab      build .venv if missing, then serve JupyterLab on notebooks/ (prints the URL)
#   make test     build .venv if missing, then pytest (tests/, mmlib doctests) and nbval (notebooks/)
#   make course   re-execute every notebook in place at tiny scale, refreshing committed outputs
#   make bench    run every script in benchmarks/ (they print speed and memory figures)
#
# Variables: PYTHON (interpreter that builds the venv), TORCH (the torch requirement installed
# first: torch==2.13.0 is the CPU build CI uses; e.g. TORCH="torch --index-url
# https://download.pytorch.org/whl/cu126" for a GPU), LAB_IP, LAB_PORT, LAB_ARGS, and for make
# test AFTER_DECODERS, LATE_JOBS and LATE_THREADS (see `test`; keep LATE_JOBS x LATE_THREADS <= cores).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
LAB_IP ?= 127.0.0.1
LAB_PORT ?= 8888
LAB_ARGS ?=
NOTEBOOKS := $(sort $(wildcard notebooks/*.ipynb))
# Notebooks that need process B's entries (the decoders) run after it; all else runs while it trains.
AFTER_DECODERS ?= notebooks/03_diffusion_decoders.ipynb
EARLY_NOTEBOOKS := $(filter-out $(AFTER_DECODERS),$(NOTEBOOKS))
# Workers and threads per worker for those late notebooks: one notebook runs fastest alone on two
# threads (3.5 min instead of 5.5); with several, use LATE_JOBS=2 LATE_THREADS=1. Never more
# threads than cores: two workers of two threads each on two cores made make test three times
# slower (12.7 min instead of 3.9, measured), as OpenMP threads fight for the cores.
LATE_JOBS ?= 1
LATE_THREADS ?= 2
NBVAL := --nbval-lax --nbval-current-env --nbval-cell-timeout=900 --nbval-sanitize-with tests/nbval_sanitize.cfg
# Zoo entries make test trains before pytest, in two processes of one thread each (see `test`).
PREBUILT_A ?= clip judge audio-decoder imagebind llm stage1
PREBUILT_B ?= image-vae image-decoder video-decoder
# Jupyter refuses to run as root (containers, CI) unless told it may.
ALLOW_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root)

.PHONY: lab test course bench venv

venv: $(VENV)/.installed

# torch goes in first, on its own: a later `pip install -e .` then finds its range satisfied and
# never resolves a CUDA build of several GB on a CPU machine.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m ipykernel install --sys-prefix --name mmlib --display-name "Python (mmlib)" > /dev/null
	touch $@

lab: venv
	@echo "JupyterLab on notebooks/ (kernel 'Python (mmlib)'); open the http://$(LAB_IP):$(LAB_PORT)/lab?token=... URL printed below. Ctrl-C stops it."
	$(BIN)/jupyter lab --no-browser --ip=$(LAB_IP) --port=$(LAB_PORT) --ServerApp.root_dir=notebooks $(ALLOW_ROOT) $(LAB_ARGS)

# A fresh, empty zoo cache for every run: each component proves it still trains from scratch.
# Two processes of one thread each (python -m mmlib.zoo): A trains PREBUILT_A, then runs the tests,
# the doctests and every notebook that does not need the decoders; meanwhile B trains the
# decoders (image-decoder waits for clip, which A trains first). Then the notebooks in
# AFTER_DECODERS run. Tests and notebooks share the cache instead of each waiting on another's lock.
test: venv
	@cache=$$(mktemp -d) && echo "zoo cache for this run: $$cache" && \
	export MMLIB_CACHE=$$cache MMLIB_SCALE=tiny && \
	{ { MMLIB_PROGRESS=0 OMP_NUM_THREADS=1 $(BIN)/python -m mmlib.zoo $(PREBUILT_A) && \
	    OMP_NUM_THREADS=1 $(BIN)/python -m pytest tests --doctest-modules mmlib $(NBVAL) $(EARLY_NOTEBOOKS); } & \
	  MMLIB_PROGRESS=0 OMP_NUM_THREADS=1 $(BIN)/python -m mmlib.zoo $(PREBUILT_B); b=$$?; wait $$!; a=$$?; \
	  test $$a -eq 0 && test $$b -eq 0; } && \
	OMP_NUM_THREADS=$(LATE_THREADS) $(BIN)/python -m pytest -n $(LATE_JOBS) --dist loadscope $(NBVAL) $(AFTER_DECODERS); \
	status=$$?; rm -rf $$cache; exit $$status

# MMLIB_PROGRESS=0: a progress bar saved in a notebook shows frozen at 0%; the lab still shows them live.
course: venv
	MMLIB_SCALE=tiny MMLIB_PROGRESS=0 $(BIN)/jupyter nbconvert --to notebook --execute --inplace \
		--ExecutePreprocessor.timeout=1800 --ExecutePreprocessor.kernel_name=python3 $(NOTEBOOKS)

bench: venv
	@for script in benchmarks/*.py; do echo "== $$script"; $(BIN)/python $$script || exit 1; done

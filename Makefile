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
# test LATE_A and LATE_B (see `test`).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
LAB_IP ?= 127.0.0.1
LAB_PORT ?= 8888
LAB_ARGS ?=
NOTEBOOKS := $(sort $(wildcard notebooks/*.ipynb))
# Notebooks that need process B's entries run late: LATE_A in process A once its tests are done
# (its first cells wait for the decoders B is still training), with the doctests of LATE_DOCTESTS,
# and LATE_B in process B after its entries. Everything else runs in A while B trains. Each
# process has one thread: never more threads than cores; two workers of two threads each on two
# cores made make test three times slower (12.7 min instead of 3.9, measured), as OpenMP threads
# fight for the cores.
LATE_A ?= notebooks/03_diffusion_decoders.ipynb
LATE_B ?= notebooks/05_signal_tokens_and_output_projection.ipynb notebooks/06_lora_instruction_tuning.ipynb \
	notebooks/07_any_to_any.ipynb
EARLY_NOTEBOOKS := $(filter-out $(LATE_A) $(LATE_B),$(NOTEBOOKS))
# Doctests that generate with the decoders B trains run late, in A (the any-to-any example).
LATE_DOCTESTS := mmlib/anytoany.py
NBVAL := --nbval-lax --nbval-current-env --nbval-cell-timeout=900 --nbval-sanitize-with tests/nbval_sanitize.cfg
# Zoo entries make test trains before pytest, in two processes of one thread each (see `test`).
# Stages 2 and 3 need only the decoders' text encoders (lesson 1's), so they train in A beside the
# UNets, then lesson 6's frozen-LLM run, and lesson 7's regime (a) (from scratch, it needs nothing)
# ends A's list. The judge, ImageBind (ready before A's stage 1 asks for it) and lesson 6's full
# fine-tuning go to B, to even out the two processes' time.
PREBUILT_A ?= clip audio-decoder llm stage1 stage2 stage3 stage3-frozen all-at-once
PREBUILT_B ?= judge imagebind image-vae image-decoder video-decoder stage3-full
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
# Two processes of one thread each. A trains PREBUILT_A (python -m mmlib.zoo), then runs the
# tests, the doctests and the early notebooks, then LATE_A and the late doctests. Meanwhile B trains
# PREBUILT_B (the judge, ImageBind and the decoders; ImageBind and image-decoder wait for A's clip,
# the stage-3 full run for A's stage2), then runs LATE_B.
# Tests and notebooks share the cache instead of each waiting on another's lock.
test: venv
	@cache=$$(mktemp -d) && echo "zoo cache for this run: $$cache" && \
	export MMLIB_CACHE=$$cache MMLIB_SCALE=tiny OMP_NUM_THREADS=1 && \
	{ { MMLIB_PROGRESS=0 $(BIN)/python -m mmlib.zoo $(PREBUILT_A) && \
	    $(BIN)/python -m pytest tests --doctest-modules mmlib --ignore=$(LATE_DOCTESTS) $(NBVAL) $(EARLY_NOTEBOOKS) && \
	    $(BIN)/python -m pytest -p no:cacheprovider --doctest-modules $(LATE_DOCTESTS) $(NBVAL) $(LATE_A); } & \
	  { MMLIB_PROGRESS=0 $(BIN)/python -m mmlib.zoo $(PREBUILT_B) && \
	    $(BIN)/python -m pytest -p no:cacheprovider $(NBVAL) $(LATE_B); }; b=$$?; wait $$!; a=$$?; \
	  test $$a -eq 0 && test $$b -eq 0; }; \
	status=$$?; rm -rf $$cache; exit $$status

# MMLIB_PROGRESS=0: a progress bar saved in a notebook shows frozen at 0%; the lab still shows them live.
course: venv
	MMLIB_SCALE=tiny MMLIB_PROGRESS=0 $(BIN)/jupyter nbconvert --to notebook --execute --inplace \
		--ExecutePreprocessor.timeout=1800 --ExecutePreprocessor.kernel_name=python3 $(NOTEBOOKS)

bench: venv
	@for script in benchmarks/*.py; do echo "== $$script"; $(BIN)/python $$script || exit 1; done

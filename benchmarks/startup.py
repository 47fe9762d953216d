"""What a new Python process pays before it does anything: importing the course's libraries.

    python benchmarks/startup.py

make test starts some 25 processes (the zoo trainers, pytest, a kernel per notebook, the
multi-process tests), and each imports torch, transformers, diffusers and peft. Python caches the
bytecode it compiles them to, unless PYTHONDONTWRITEBYTECODE is set (as in some CI images) and the
venv was installed without it (pip --no-compile, as the Makefile does). Then every process compiles
them again. This script times one child process that imports what lesson 7 uses and builds the
untrained tiny model's parts, three ways, each in a fresh bytecode cache (PYTHONPYCACHEPREFIX, so
the venv's own caches are neither read nor touched):
  - with PYTHONDONTWRITEBYTECODE=1: what every process paid before the Makefile unexported it;
  - the first process that may write the cache;
  - a later process, which reads it.
"""

import os
import subprocess
import sys
import tempfile
import time

CHILD = """
from mmlib import anytoany, instruction, regimes, train
from mmlib.data import World
from mmlib.decoders import PIPELINES
from mmlib.llm import LLMConfig, build_llm
from mmlib.tokenizer import train_tokenizer
from transformers import CLIPTextModel
from diffusers import UNet3DConditionModel
build_llm(train_tokenizer(World(seed=0)), LLMConfig())
"""


def child_seconds(cache: str, write: bool) -> float:
    env = {**os.environ, "PYTHONPYCACHEPREFIX": cache, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    if not write:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", CHILD], env=env, check=True)
    return time.perf_counter() - start


def main() -> None:
    with tempfile.TemporaryDirectory() as never, tempfile.TemporaryDirectory() as cache:
        cold = child_seconds(never, write=False)
        first = child_seconds(cache, write=True)
        warm = child_seconds(cache, write=True)
    print(f"one process importing the course (seconds): {cold:.1f} compiling everything "
          f"(PYTHONDONTWRITEBYTECODE=1, every process), {first:.1f} the first one writing the cache, "
          f"{warm:.1f} every later one")


if __name__ == "__main__":
    main()

"""Renderer throughput of the generated world: scenes per second for each modality.

Run with `make bench` or `python benchmarks/render_speed.py`. Goals on a 2-core laptop CPU:
at least 5,000 images/s and 1,000 audio clips/s, so rendering never holds training up.
"""

import time

import numpy as np
import torch

from mmlib.data import SceneDataset, World, make_loader

GOALS = {"image": 5000, "audio": 1000}


def best_rate(function, count: int, repeats: int = 3) -> float:
    """Items per second of `function()` producing `count` items: the best of a few runs."""
    function()  # warm up: tables, imports, caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return count / min(times)


def main() -> None:
    torch.set_num_threads(1)  # what one DataLoader worker gets
    world = World(seed=0)
    n = 2000
    scenes = world.scenes(world.split("train", n))
    waveform = world.audio(scenes)
    jobs = {
        "scenes (attributes + jitter)": lambda: world.scenes(world.split("train", n)),
        "image": lambda: world.image(scenes),
        "depth": lambda: world.depth(scenes),
        "thermal": lambda: world.thermal(scenes),
        "imu": lambda: world.imu(scenes),
        "video (8 frames)": lambda: world.video(scenes),
        "audio (waveform)": lambda: world.audio(scenes),
        "log-mel from waveform": lambda: world.log_mel(waveform),
        "text (captions)": lambda: world.captions(scenes),
    }
    print(f"{'modality':<30} {'scenes/s':>10}  goal")
    for name, job in jobs.items():
        rate = best_rate(job, n)
        goal = GOALS.get(name.split()[0])
        verdict = "" if goal is None else f">= {goal}: {'met' if rate >= goal else 'MISSED'}"
        print(f"{name:<30} {rate:>10,.0f}  {verdict}")

    for workers in (0, 2):
        dataset = SceneDataset("train", size=8192, modalities=("image", "text", "mel"), world=world)
        loader = make_loader(dataset, batch_size=256, shuffle=True, num_workers=workers)
        start = time.perf_counter()
        count = sum(len(batch["text"]) for batch in loader)
        rate = count / (time.perf_counter() - start)
        print(f"DataLoader image+text+mel, {workers} workers: {rate:,.0f} samples/s")
    print(f"(numpy {np.__version__}, torch {torch.__version__})")


if __name__ == "__main__":
    main()

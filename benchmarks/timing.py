"""Shared by the benchmark scripts (run alone, it prints nothing): mean seconds per call."""

import time


def seconds(fn, repeat: int) -> float:
    """Mean wall-clock seconds of `fn()` over `repeat` calls, after one warm-up call."""
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat

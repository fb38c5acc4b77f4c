"""Timing shared by the PyTorch comparison scripts in this folder."""

import statistics
import time


def median_seconds(fn, runs):
    """The median wall time of `runs` calls of `fn`, after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)

"""What every benchmark here shares: one timing rule, one environment card, one JSON writer.

Timing: a benchmark's unit of work is a callable that returns only once its results are
ready (``jax.block_until_ready`` inside it); :func:`time_windows` times ``windows`` calls of
it, each a window of ``steps`` steps, and reports are medians over the windows
(:func:`median_ms` for one call, after two untimed calls: compilation and warm-up).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

__all__ = ["time_windows", "median_ms"]


def time_windows(run: Callable[[int], Any], steps: int, windows: int) -> list[float]:
    """Seconds of ``windows`` calls of ``run(steps)`` (each call ends synchronised)."""
    out = []
    for _ in range(windows):
        t0 = time.perf_counter()
        run(steps)
        out.append(time.perf_counter() - t0)
    return out


def median_ms(run: Callable[[], Any], windows: int = 5, calls: int = 3) -> float:
    """Median milliseconds per call of ``run`` over ``windows`` windows of ``calls`` calls,
    after two untimed calls (compilation and warm-up)."""
    run(), run()  # compile and warm up

    def window(n: int) -> None:
        for _ in range(n):
            run()

    return statistics.median(time_windows(window, calls, windows)) / calls * 1e3

"""Timing two runtimes fairly on a shared machine: warm-up, taking turns in blocks, min/median/max.

A timer is ``timer(n) -> [seconds] * n``. ``interleaved`` gives each side its turns; ``ort_timer``
is ONNX Runtime's; the compiled side's comes from ``graphopt.front.api.timer``.
"""

from __future__ import annotations

import statistics
import time
from typing import Any


def stats_ms(seconds: list[float]) -> dict[str, float]:
    ms = [s * 1e3 for s in seconds]
    return {
        "min_ms": round(min(ms), 4),
        "median_ms": round(statistics.median(ms), 4),
        "max_ms": round(max(ms), 4),
        "mean_ms": round(statistics.fmean(ms), 4),
    }


WARMUP_MIN_SECONDS = 1.0  # a new process's first runs are slow (thread pools, page faults, clocks)


def warm_up(run, warmup: int) -> None:
    """Call ``run`` ``warmup`` times, and on until ``WARMUP_MIN_SECONDS`` have passed (at most 1000 calls).

    With three runs of a 12 ms model, the first model of a ``bench`` run measured 40% slower than the
    same bundle timed again right after it; a second of warm-up narrows that gap (to about 25% on the
    noisy 2-core machine measured), it does not close it.
    """
    start, n = time.perf_counter(), 0
    while n < warmup or (time.perf_counter() - start < WARMUP_MIN_SECONDS and n < 1000):
        run()
        n += 1


BLOCK = 5  # timed runs per turn when graphopt and ORT take turns
# Each turn starts with untimed runs for at least this long: the other side's thread pool spins on the
# same cores for a while after its last run (ORT's PP-OCRv4 cls, 0.7 ms alone, timed 0.7 to 2.1 ms
# when one untimed run began each turn).
SETTLE_SECONDS = 0.05


def interleaved(timers: dict[str, Any], repeat: int, warmup: int) -> dict[str, list[float]]:
    """Time every ``timers[name](n) -> [seconds] * n`` for ``repeat`` runs, taking turns in blocks.

    Run one after the other, a slow minute of a shared machine lands on one side only (ORT alone
    moved 40% between two runs here); taking turns every ``BLOCK`` runs spreads it over both, so the
    ratio holds where the absolute times do not. Each turn starts with one untimed run (the other
    side's thread pool may still be spinning) and goes on for ``SETTLE_SECONDS``.
    """
    for run in timers.values():
        warm_up(lambda run=run: run(1), warmup)
    out: dict[str, list[float]] = {name: [] for name in timers}
    while any(len(v) < repeat for v in out.values()):
        for name, run in timers.items():
            n = min(BLOCK, repeat - len(out[name]))
            if n > 0:
                _settle(run)
                out[name] += run(n)
    return out


def _settle(run) -> None:
    start = time.perf_counter()
    run(1)
    while time.perf_counter() - start < SETTLE_SECONDS:
        run(1)


def ort_timer(onnx_path: str, feeds: dict, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    feeds = {k: v for k, v in feeds.items() if k in names}

    def run(n: int) -> list[float]:
        out = []
        for _ in range(n):
            t = time.perf_counter()
            sess.run(None, feeds)
            out.append(time.perf_counter() - t)
        return out

    return run

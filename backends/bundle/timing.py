"""Timing and profiling a compiled module's Relax VM (the TVM side of ``graphopt bench``)."""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from typing import Any


VM_ROW = "(VM: allocation, shape checks, calls)"


def profile_vm(vm, args: list, runs: int = 3) -> list[dict[str, Any]]:
    """Mean time per run spent in each fused function the VM calls, slowest first, with its share.

    Each call is timed from Python (``set_instrument``), which adds its own cost, and that cost lands
    on the VM's cheap builtins (PP-OCRv4 rec: ~25 ms a run "in" alloc_tensor, in a 13-23 ms run). So
    the builtins are one row: the uninstrumented run time minus the kernels' time.
    """
    totals: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    started: list[float] = []

    def instrument(func, symbol, before, ret, *rest):
        if before:
            started.append(time.perf_counter())
        else:
            totals[symbol] += time.perf_counter() - started.pop()
            calls[symbol] += 1
        return 0

    plain_runs = []
    for _ in range(runs):
        t0 = time.perf_counter()
        vm["main"](*args)
        plain_runs.append(time.perf_counter() - t0)
    plain = statistics.median(plain_runs)  # one slow run of a noisy machine made a 2.4 ms "VM" row of 0.3
    vm.set_instrument(instrument)
    try:
        for _ in range(runs):
            vm["main"](*args)
    finally:
        vm.set_instrument(lambda *a: 0)
    kernels = {k: v / runs for k, v in totals.items() if not k.startswith("vm.builtin.")}
    builtin_calls = sum(c for k, c in calls.items() if k.startswith("vm.builtin.")) // runs
    spent = sum(kernels.values())
    rest = max(0.0, plain - spent)
    total = (spent + rest) or 1.0
    rows = [{"function": k, "ms": round(v * 1e3, 4), "share": round(v / total, 4), "calls": calls[k] // runs}
            for k, v in kernels.items()]
    if builtin_calls:
        rows.append({"function": VM_ROW, "ms": round(rest * 1e3, 4), "share": round(rest / total, 4),
                     "calls": builtin_calls})
    return sorted(rows, key=lambda r: -r["ms"])


def vm_args(runner, feeds):
    import tvm

    arrays = runner.check_inputs((), feeds)
    args = [tvm.runtime.tensor(a, runner.device) for a in arrays] + list(getattr(runner, "_params", []))
    return runner.vm, args


def vm_timer(vm, args, dev):
    return lambda n: list(vm.time_evaluator("main", dev, number=1, repeat=n)(*args).results)




def runner_timer(runner, feeds):
    """``timer(n) -> [seconds] * n`` running ``runner`` (a compiled module or a loaded bundle) on ``feeds``."""
    vm, args = vm_args(runner, feeds)
    return vm_timer(vm, args, runner.device)


def runner_profile(runner, feeds, runs: int = 3) -> list[dict[str, Any]]:
    """``profile_vm`` of ``runner`` on ``feeds``: the time in each fused function, slowest first."""
    vm, args = vm_args(runner, feeds)
    return profile_vm(vm, args, runs=runs)

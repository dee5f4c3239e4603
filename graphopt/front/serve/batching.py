"""One worker thread per served model: requests queue up, run one batch at a time, results go back.

Without batching (``max_batch`` 0) each request runs alone. With batching, the model was compiled
for fixed batches (``buckets``: rows -> module, the largest ``max_batch``) on axis 0 of every input and
output: requests arriving within ``timeout_s`` of the first one are stacked up to ``max_batch`` rows,
padded with zeros to the smallest compiled batch that holds them, run once, and each request gets
back its own rows.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
import time
from collections.abc import Callable

import numpy as np


class _Job:
    __slots__ = ("arrays", "rows", "future")

    def __init__(self, arrays: dict[str, np.ndarray], rows: int) -> None:
        self.arrays, self.rows, self.future = arrays, rows, concurrent.futures.Future()


class ModelWorker:
    """``submit(arrays, rows) -> Future`` of ``{output: array}``; ``close()`` finishes the queue and stops.

    ``on_batch(rows)`` and ``on_queue(delta)`` feed metrics (batch sizes, queue depth).
    """

    def __init__(self, name: str, module, *, max_batch: int = 0, timeout_s: float = 0.0,
                 buckets: dict | None = None, on_batch: Callable[[int], None] | None = None,
                 on_queue: Callable[[int], None] | None = None) -> None:
        self.name, self.module = name, module
        self.max_batch, self.timeout_s = max_batch, timeout_s
        self.buckets = dict(sorted((buckets or {max_batch: module}).items()))
        self._on_batch = on_batch or (lambda rows: None)
        self._on_queue = on_queue or (lambda delta: None)
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name=f"graphopt-serve-{name}", daemon=True)
        self._thread.start()

    def submit(self, arrays: dict[str, np.ndarray], rows: int = 1) -> concurrent.futures.Future:
        job = _Job(arrays, rows)
        self._on_queue(1)
        self._queue.put(job)
        return job.future

    def close(self, timeout: float | None = None) -> None:
        """Run what is queued, then stop the thread."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _loop(self) -> None:
        carry = None
        while True:
            job = carry if carry is not None else self._queue.get()
            carry = None
            if job is None:
                return
            batch, rows, stop = [job], job.rows, False
            if self.max_batch:
                deadline = time.monotonic() + self.timeout_s
                while rows < self.max_batch:
                    try:
                        nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                    except queue.Empty:
                        break
                    if nxt is None:
                        stop = True
                        break
                    if rows + nxt.rows > self.max_batch:
                        carry = nxt
                        break
                    batch.append(nxt)
                    rows += nxt.rows
            self._on_queue(-len(batch))
            self._run(batch, rows)
            if stop:
                self._drain()
                return

    def _drain(self) -> None:
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                self._on_queue(-1)
                self._run([job], job.rows)

    def _run(self, batch: list[_Job], rows: int) -> None:
        jobs = [j for j in batch if j.future.set_running_or_notify_cancel()]
        if not jobs:
            return
        self._on_batch(rows)
        try:
            if not self.max_batch:
                results = [self.module(**jobs[0].arrays)]
            else:
                results = self._run_stacked(jobs)
        except BaseException as e:  # noqa: BLE001 - handed to every waiting request
            for j in jobs:
                j.future.set_exception(e)
            return
        for j, r in zip(jobs, results):
            j.future.set_result(r)

    def _run_stacked(self, jobs: list[_Job]) -> list[dict[str, np.ndarray]]:
        rows = sum(j.rows for j in jobs)
        size = next(b for b in self.buckets if b >= rows)
        stacked = {}
        for name in jobs[0].arrays:
            parts = [j.arrays[name] for j in jobs]
            pad = size - rows
            if pad:
                parts.append(np.zeros((pad, *parts[0].shape[1:]), dtype=parts[0].dtype))
            stacked[name] = np.concatenate(parts) if len(parts) > 1 else parts[0]
        out = self.buckets[size](**stacked)
        results, start = [], 0
        for j in jobs:
            results.append({k: v[start:start + j.rows] for k, v in out.items()})
            start += j.rows
        return results

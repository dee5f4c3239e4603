"""Building tuning candidates: in a worker process that stays up between batches, with a timeout.

MetaSchedule's LocalBuilder starts a new worker pool for every batch, and a worker's ``import tvm``
costs ~3.5 s on 2 cores: more than building a small task's batch. Building in the tuning process
itself has no such cost but no timeout either: LLVM can spend many minutes on one pathological
candidate (a 15-minute tuning run of PP-OCRv4 rec hung on one). So candidates are built in one
worker that lives across batches, is killed and replaced when a build passes ``timeout``, and is
recycled every ``recycle`` builds (TVM notes that its pool workers leak memory with use).
"""

from __future__ import annotations

import os
import tempfile

BUILD_TIMEOUT_S = 60  # per candidate


def build_candidate(mod, target, _params=None):
    """MetaSchedule's ``default_build`` without its ``import tvm.s_tir.tensor_intrin``.

    That import registers every tensor intrinsic TVM has (CUDA's alone take 30 s): 45 s on this
    project's 2-core machines, paid again by each new worker, where it ran into the builder's timeout
    and every candidate was recorded as a build error. Building a candidate needs no registry:
    tensorization already happened where the candidate was sampled.
    """
    from tvm.driver import build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    return build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


def build_and_export(mod, target, fcompile) -> str:
    """Build ``mod`` and write it as a shared library (with ``fcompile``: a cross compiler's)."""
    lib = build_candidate(mod, target)
    path = os.path.join(tempfile.mkdtemp(prefix="graphopt-candidate-"), "candidate.so")
    if fcompile is not None:
        lib.export_library(path, fcompile=fcompile)
    else:
        lib.export_library(path)
    return path


class CandidateBuilder:
    """``build([(mod, target), ...]) -> [(library path or None, error or None), ...]``."""

    def __init__(self, fcompile=None, *, timeout: float = BUILD_TIMEOUT_S, recycle: int = 256):
        self.fcompile, self.timeout, self.recycle = fcompile, timeout, recycle
        self._pool = None
        self._built = 0

    def _workers(self):
        from tvm.support.popen_pool import PopenPoolExecutor

        if self._pool is None or self._built >= self.recycle:
            self.close()
            self._pool = PopenPoolExecutor(max_workers=1, timeout=self.timeout)
            self._built = 0
        return self._pool

    def build(self, items) -> list[tuple[str | None, str | None]]:
        from tvm.support.popen_pool import StatusKind

        fcompile = self.fcompile
        out = []
        for res in self._workers().map_with_error_catching(
                lambda item: build_and_export(item[0], item[1], fcompile), list(items)):
            self._built += 1
            if res.status == StatusKind.COMPLETE:
                out.append((res.value, None))
            elif res.status == StatusKind.TIMEOUT:
                out.append((None, f"build timed out after {self.timeout:g} s"))
            else:
                out.append((None, f"build failed: {res.value}"))
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


def metaschedule_builder(builder: CandidateBuilder):
    """``builder`` as a MetaSchedule builder (a class made on first use: TVM is imported lazily)."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder

    @derived_object
    class _Builder(PyBuilder):
        def build(self, build_inputs):
            done = builder.build([(bi.mod, bi.target) for bi in build_inputs])
            return [BuilderResult(path, err) for path, err in done]

    return _Builder()

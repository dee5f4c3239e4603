"""Differential check: run the model in ONNX Runtime after every pass and stop at the first mismatch.

:class:`DifferentialCheckInstrument` runs the model once before the first pass (on the inputs it is
given, or on seeded random inputs of the right dtypes and shapes, dynamic dims set to 1), then after
every pass that reports ``modified`` it serializes the model, runs it again on the same inputs and
compares every output with the previous step. On a mismatch it writes ``before.onnx`` and
``after.onnx`` into ``output_dir`` (when given) and raises :class:`~graphopt.core.errors.PassError`
naming the pass, the first output that diverged and its maximum absolute error. Models with
external or over 1 GiB of weights go to ONNX Runtime as files with external data; for them only
``after.onnx`` (with ``after.onnx.data``) is written, as keeping a copy of every step would cost
the weights' size in memory.

``random_inputs`` and ``run_onnxruntime`` are the helpers it is built on; tests use them too.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from graphopt.core.errors import GraphoptError, PassError, UnsupportedError, UsageError, VerificationError

# Integer inputs are drawn from [0, _INT_HIGH) so that index-like inputs stay in range.
_INT_HIGH = 4


def _input_values(graph: ir.Graph) -> list[ir.Value]:
    """Graph inputs the user must feed (an input that is also an initializer has a default)."""
    return [v for v in graph.inputs if not v.is_initializer()]


def _concrete_shape(value: ir.Value) -> tuple[int, ...]:
    if value.shape is None:
        raise UsageError(
            f"input '{value.name}': shape unknown; pass inputs= or fix it with --input-shape"
        )
    return tuple(d if isinstance(d, int) and d >= 0 else 1 for d in value.shape)  # -1: dynamic


def random_inputs(model: ir.Model, *, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded random feeds for every graph input: right dtype, dynamic dims set to 1."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for v in _input_values(model.graph):
        if not isinstance(v.type, ir.TensorType) or v.dtype is None:
            raise UnsupportedError(f"input '{v.name}': only tensor inputs can be generated (got {v.type})")
        dtype = v.dtype.numpy()
        shape = _concrete_shape(v)
        if v.dtype == ir.DataType.BOOL:
            arr = rng.integers(0, 2, size=shape).astype(bool)
        elif v.dtype.is_floating_point():
            arr = rng.standard_normal(size=shape).astype(dtype)
        elif v.dtype.is_integer():
            arr = rng.integers(0, _INT_HIGH, size=shape).astype(dtype)
        else:
            raise UnsupportedError(f"input '{v.name}': cannot generate inputs of dtype {v.dtype}")
        feeds[v.name] = arr
    return feeds


def _serialize(model: ir.Model) -> onnx.ModelProto:
    return ir.serde.serialize_model(model)


# protobuf cannot serialize 2 GiB; above this the model goes to ORT as a file with external data.
_INLINE_LIMIT = 1 << 30


def _needs_file(model: ir.Model) -> bool:
    from graphopt.core.io import has_external_data, weight_bytes

    return has_external_data(model) or weight_bytes(model) > _INLINE_LIMIT


def run_onnxruntime(
    model: ir.Model | onnx.ModelProto | bytes, feeds: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Run ``model`` in ONNX Runtime (CPU, graph optimizations off: the graph as written)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    opts.log_severity_level = 4
    with tempfile.TemporaryDirectory(prefix="graphopt-diffcheck-") as tmp:
        if isinstance(model, ir.Model) and _needs_file(model):
            path = Path(tmp) / "model.onnx"
            ir.save(model, path, external_data="model.onnx.data")
            source: str | bytes = str(path)
        elif isinstance(model, ir.Model):
            source = _serialize(model).SerializeToString()
        elif isinstance(model, onnx.ModelProto):
            source = model.SerializeToString()
        else:
            source = model
        sess = ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        wanted = {i.name for i in sess.get_inputs()}
        run_opts = ort.RunOptions()
        run_opts.log_severity_level = 4  # failures are raised (and reported) by the caller
        results = sess.run(names, {k: v for k, v in feeds.items() if k in wanted}, run_opts)
    return dict(zip(names, results))


# onnx.reference is slow: above this, a model ORT refuses is reported instead of checked with it.
_REFERENCE_MAX_WEIGHT_BYTES = 64 << 20


def run_reference(model: ir.Model, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run ``model`` with ``onnx.reference`` (only the If branches taken are evaluated)."""
    from onnx.reference import ReferenceEvaluator

    evaluator = ReferenceEvaluator(_serialize(model))
    names = list(evaluator.output_names)
    wanted = set(evaluator.input_names)
    results = evaluator.run(None, {k: v for k, v in feeds.items() if k in wanted})
    return dict(zip(names, results))


def first_mismatch(
    before: Mapping[str, np.ndarray],
    after: Mapping[str, np.ndarray],
    *,
    rtol: float,
    atol: float,
) -> tuple[str, str] | None:
    """(output name, why) for the first output that differs, in ``before``'s order; None if all match."""
    before_names, after_names = list(before), list(after)
    if len(before_names) != len(after_names):
        return ("<outputs>", f"output count changed from {len(before_names)} to {len(after_names)}")
    for (name, a), b_name in zip(before.items(), after_names):
        b = after[b_name]
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:
            return (name, f"shape changed from {list(a.shape)} to {list(b.shape)}")
        if a.dtype != b.dtype:
            return (name, f"dtype changed from {a.dtype} to {b.dtype}")
        if a.dtype.kind in "fc":
            if not np.allclose(a, b, rtol=rtol, atol=atol, equal_nan=True):
                with np.errstate(invalid="ignore"):
                    err = float(np.nanmax(np.abs(a.astype(np.float64) - b.astype(np.float64))))
                return (name, f"max abs error {err:.3g} (rtol {rtol}, atol {atol})")
        elif not np.array_equal(a, b):
            diff = int(np.count_nonzero(a != b))
            return (name, f"{diff} of {a.size} elements differ")
    return None


class DifferentialCheckInstrument:
    """Instrument: compare ONNX Runtime outputs after every modifying pass with the step before."""

    def __init__(
        self,
        model: ir.Model,
        *,
        output_dir: str | os.PathLike | None = None,
        inputs: Mapping[str, np.ndarray] | None = None,
        rtol: float = 1e-3,
        atol: float = 1e-4,
        seed: int = 0,
    ) -> None:
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.rtol = rtol
        self.atol = atol
        self.feeds = dict(inputs) if inputs is not None else random_inputs(model, seed=seed)
        self.reference: dict[str, np.ndarray] | None = None
        self._reference_proto: onnx.ModelProto | None = None
        self.checked: list[str] = []  # passes whose result was compared
        self.runner = run_onnxruntime  # or run_reference, for a model ORT refuses at load (below)

    def before_pass(self, name: str, model: ir.Model) -> None:
        if self.reference is not None:
            return
        try:
            self.reference = run_onnxruntime(model, self.feeds)
        except GraphoptError:
            raise
        except Exception as e:
            if self._use_reference_evaluator(model):
                self._snapshot(model)
                return
            dynamic = [v.name for v in _input_values(model.graph)
                       if v.shape is not None and not all(isinstance(d, int) and d >= 0 for d in v.shape)]
            hint = (f" (dynamic dims of {', '.join(dynamic)} were set to 1: fix them with --input-shape)"
                    if dynamic else "")
            raise UnsupportedError(
                f"differential check: ONNX Runtime cannot run the input model{hint}: {_first_line(e)}"
            ) from None
        self._snapshot(model)

    def _use_reference_evaluator(self, model: ir.Model) -> bool:
        """ORT infers both branches of every If at load time, so fixed input shapes that make a branch
        the inputs never take shape-invalid (silero:vad's 8 kHz branch at 16 kHz sizes) make it refuse
        a model that is fine. Such a model, when small, is checked with ``onnx.reference`` instead,
        which evaluates only the branch taken."""
        from graphopt.core.io import weight_bytes
        from graphopt.core.shapes import strict_inference_problem

        if _needs_file(model) or weight_bytes(model) > _REFERENCE_MAX_WEIGHT_BYTES:
            return False
        if strict_inference_problem(model) is None:
            return False  # ORT failed for another reason
        try:
            self.reference = run_reference(model, self.feeds)
        except Exception:  # noqa: BLE001 - the reference cannot run it either: report ORT's error
            return False
        self.runner = run_reference
        return True

    def after_pass(self, name: str, model: ir.Model, modified: bool) -> None:
        if not modified or self.reference is None:
            return
        try:
            outputs = self.runner(model, self.feeds)
        except Exception as e:
            where = self._dump(model)
            raise PassError(
                f"pass '{name}' {_why_unrunnable(model, e)}{where}", pass_name=name
            ) from None
        self.checked.append(name)
        bad = first_mismatch(self.reference, outputs, rtol=self.rtol, atol=self.atol)
        if bad is not None:
            where = self._dump(model)
            raise PassError(
                f"pass '{name}' changed the model's results: output '{bad[0]}': {bad[1]}{where}",
                pass_name=name,
            )
        self.reference = outputs
        self._snapshot(model)

    def _snapshot(self, model: ir.Model) -> None:
        """Keep the last good model in memory for ``before.onnx`` (not for external/large weights)."""
        if self.output_dir is not None:
            self._reference_proto = None if _needs_file(model) else _serialize(model)

    def _dump(self, model: ir.Model) -> str:
        if self.output_dir is None:
            return ""
        from graphopt.core.io import atomic_write_bytes, save

        self.output_dir.mkdir(parents=True, exist_ok=True)
        written = []
        if self._reference_proto is not None:
            atomic_write_bytes(self.output_dir / "before.onnx", self._reference_proto.SerializeToString())
            written.append("before.onnx")
        if _needs_file(model):
            save(model, self.output_dir / "after.onnx", external_data="after.onnx.data")
        else:
            atomic_write_bytes(self.output_dir / "after.onnx", _serialize(model).SerializeToString())
        written.append("after.onnx")
        return f"; {'/'.join(written)} written to {self.output_dir}"


def _why_unrunnable(model: ir.Model, error: Exception) -> str:
    """The verifier's finding when the graph is broken (it names the node), else ORT's message."""
    from graphopt.core.verify import verify

    try:
        verify(model)
    except VerificationError as e:
        return f"left an invalid graph: {e}"
    return f"produced a model ONNX Runtime cannot run: {_first_line(error)}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__

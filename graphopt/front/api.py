"""graphopt's Python API. Every CLI command is one call here plus printing."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import onnx_ir as ir

from graphopt.core import io
from graphopt.core.errors import UsageError
from graphopt.core.pipeline import (
    DEFAULT_PIPELINE,
    PassContext,
    PassRecord,
    PassRegistry,
    run_pipeline,
    steps_from_names,
)

ModelLike = "ir.Model | str | os.PathLike"


def resolve_model_path(path: str | os.PathLike) -> Path:
    """A file path, or a bundled model's name such as ``light:resnet50`` or ``rapidocr:det``."""
    p = Path(path)
    if not p.exists() and ":" in str(path) and not str(path).startswith(("/", ".")):
        from graphopt.models import resolve

        return resolve(str(path))
    return p


def load(path: str | os.PathLike, *, input_shapes: dict | Sequence[str] | None = None) -> ir.Model:
    """Load an ONNX file (checked; external data stays lazy), optionally fixing input shapes.

    ``path`` may name a bundled model (``light:resnet50``, ``rapidocr:det``; see ``graphopt.models``).
    """
    model = io.load(resolve_model_path(path))
    if input_shapes:
        from graphopt.core.shapes import specialize

        specialize(model, input_shapes)
    return model


def save(model: ir.Model, path: str | os.PathLike, *, external_data: str | None = None) -> Path:
    """Save atomically; weights go to external data when needed (over 2 GB, or already external)."""
    return io.save(model, path, external_data=external_data)


def input_shapes_for(model, input_shapes=None):
    """``input_shapes``, or a bundled model's default shapes when none are given (``rapidocr:rec``
    is published with dynamic dims; compile, tune, bench and compare need them fixed)."""
    if input_shapes or isinstance(model, ir.Model) or Path(model).exists() or ":" not in str(model):
        return input_shapes
    from graphopt import models

    return models.default_input_shapes(str(model)) or input_shapes


def _as_model(model: ir.Model | str | os.PathLike, input_shapes=None) -> ir.Model:
    if isinstance(model, ir.Model):
        if input_shapes:
            from graphopt.core.shapes import specialize

            specialize(model, input_shapes)
        return model
    return load(model, input_shapes=input_shapes)


def inspect(model: ir.Model | str | os.PathLike, *, input_shapes=None) -> dict[str, Any]:
    """Opset, inputs/outputs with shapes, op histogram, parameter count and bytes, estimated FLOPs."""
    from graphopt.core.summary import summarize

    return summarize(_as_model(model, input_shapes))


@dataclasses.dataclass
class OptimizeResult:
    model: ir.Model
    modified: bool
    records: list[PassRecord]
    initial_nodes: int
    initial_parameter_bytes: int

    def report(self) -> dict[str, Any]:
        return {
            "initial": {"nodes": self.initial_nodes, "parameter_bytes": self.initial_parameter_bytes},
            "passes": [dataclasses.asdict(r) for r in self.records],
            "modified": self.modified,
        }


def optimize(
    model: ir.Model | str | os.PathLike,
    *,
    opt_level: int = 2,
    passes: Iterable[str] | None = None,
    disable: Iterable[str] = (),
    force: Iterable[str] = (),
    input_shapes: dict | Sequence[str] | None = None,
    registry: PassRegistry | None = None,
    instruments: Sequence = (),
    options: dict | None = None,
    check: bool = False,
    check_dir: str | os.PathLike | None = None,
    target_runtime: str = "onnx",
) -> OptimizeResult:
    """Run the ordered pipeline at ``opt_level`` (or exactly ``passes``) on the model.

    ``check=True`` runs the differential check: after every pass the graph runs in ONNX Runtime and
    is compared with the previous step; a mismatch stops with an error naming the pass and the
    first output that diverged (before/after graphs are written to ``check_dir``).

    ``target_runtime`` says where the result will run: ``"onnx"`` (default), any ONNX runtime, so
    standard ops only; ``"ort"``, ONNX Runtime, which adds its ``com.microsoft`` FusedConv/FusedGemm
    at -O3; ``"graphopt"``, graphopt's own lowering (graphopt-domain fused ops).
    """
    from graphopt.passes.graphopt_ops import with_target_runtime

    m = _as_model(model, input_shapes)
    registry = registry or PassRegistry.default()
    disable = frozenset(disable)
    for name in (*disable, *force, *(passes or ())):
        registry.info(name)  # unknown names are a usage error, before any work
    steps = steps_from_names(list(passes)) if passes is not None else DEFAULT_PIPELINE
    instruments = list(instruments)
    if check:
        from graphopt.core.diffcheck import DifferentialCheckInstrument

        instruments.insert(0, DifferentialCheckInstrument(m, output_dir=check_dir))
    ctx = PassContext(
        opt_level=opt_level,
        disabled=disable,
        forced=frozenset(force),
        instruments=tuple(instruments),
        options=with_target_runtime(options, target_runtime),
    )
    result = run_pipeline(m, steps, ctx, registry)
    return OptimizeResult(
        result.model, result.modified, result.records, result.initial_nodes, result.initial_parameter_bytes
    )


def quantize(
    model: ir.Model | str | os.PathLike,
    *,
    quantize: str | None = "int8",
    calibration: str | os.PathLike | None = None,
    opt_level: int = 2,
    input_shapes: dict | Sequence[str] | None = None,
    target_runtime: str = "onnx",
    **options: Any,
):
    """Optimize at ``opt_level``, then compress (``graphopt.compression.compress``): returns a ``CompressResult``
    (``.model`` and ``.report``, per layer what was done and, with a budget, which layers stayed float).

    ``quantize``: ``"int8"`` (static QDQ, needs ``calibration``: a .npz or a folder of them),
    ``"int8-dynamic"``, ``"int8-weights"``, ``"int4-weights"`` or None. ``options`` are the fields of
    ``graphopt.compression.compress.CompressOptions``: ``weights="fp16"|"bf16"``, ``method``, ``percentile``,
    ``samples``, ``activation_type``, ``per_channel``, ``exclude``, ``equalize``, ``bias_correction``,
    ``max_drop`` with ``metric`` (a name such as ``"ocr-rec"``/``"cosine"`` or a callable ``metric(run)``).
    """
    from graphopt.compression.compress import CompressOptions, compress

    try:
        opts = CompressOptions(quantize=quantize, calibration=calibration, target_runtime=target_runtime, **options)
    except TypeError as e:
        raise UsageError(f"quantize: {e}") from None
    opts.check()
    source = None if isinstance(model, ir.Model) else resolve_model_path(model)
    res = optimize(model, opt_level=opt_level, input_shapes=input_shapes, target_runtime=target_runtime)
    shapes = list(input_shapes) if isinstance(input_shapes, (list, tuple)) else None
    return compress(res.model, opts, source=source, input_shapes=shapes)


def list_passes(registry: PassRegistry | None = None) -> list[dict[str, str]]:
    registry = registry or PassRegistry.default()
    return [{"name": p.name, "source": p.source, "description": p.description} for p in registry]


# --- compiling, running, serving: the backends own the work ------------------------------------


def compile(  # noqa: A001 - mirrors `graphopt compile`
    model: ir.Model | str | os.PathLike,
    *,
    target: str = "x86",
    output: str | os.PathLike | None = None,
    opt_level: int = 2,
    input_shapes: dict | Sequence[str] | None = None,
    tuning_db: str | os.PathLike | None = None,
    schedules: bool = True,
    dim_bounds: dict[str, int] | None = None,
):
    """Optimize, lower to Relax, compile for ``target``; returns a callable module.

    ``dim_bounds``: the largest value of each dim ``input_shapes`` names (``input_ids:1,seq`` with
    ``{"seq": 256}``): those dims stay symbolic and one bundle serves every value up to the bound.

    With ``output``, the bundle directory is written there (atomically) as well: a new or empty
    directory, or a bundle graphopt wrote (anything else is refused before compiling); the result's
    ``bundle_digest`` is then the bundle's digest.
    """
    from graphopt.backends.compile import compile_model

    if output is not None:  # a destination graphopt must not replace is refused before minutes of work
        from graphopt.backends.bundle import check_destination

        check_destination(output)
    source = None if isinstance(model, ir.Model) else resolve_model_path(model)
    m = _as_model(model, input_shapes_for(model, input_shapes))
    return compile_model(
        m,
        target=target,
        output=output,
        opt_level=opt_level,
        tuning_db=tuning_db,
        schedules=schedules,
        source_path=source,
        dim_bounds=dim_bounds,
    )


def load_bundle(path: str | os.PathLike, *, verify: bool = True, digest: str | None = None):
    """Load a compiled bundle directory (sha256 of every file checked unless ``verify=False``;
    ``digest="sha256:..."`` refuses a bundle whose manifest.json hashes differently, see docs/bundles.md).

    The result is callable with numpy arrays (positional in input order, or by name) and returns
    a dict output name -> array; wrong names, dtypes or shapes raise a GraphoptError naming the input.
    """
    from graphopt.backends.bundle import load_bundle as _load

    return _load(path, verify=verify, digest=digest)


def parse_opt_level(text: str) -> int:
    t = text[2:] if text.startswith("-O") else text.lstrip("O")
    if t not in ("0", "1", "2", "3"):
        raise UsageError(f"opt level must be -O0..-O3, got {text!r}")
    return int(t)


def tune(
    model: ir.Model | str | os.PathLike,
    *,
    target: str = "x86",
    trials: int = 256,
    tuning_db: str | os.PathLike | None = None,
    time_budget_s: float | None = None,
    max_trials_per_task: int | None = None,
    rpc: str | None = None,
    opt_level: int = 2,
    input_shapes: dict | Sequence[str] | None = None,
    search_candidates: int = 24,
    progress=print,
):
    """Tune the model's fused kernels into a shared, resumable database: graphopt's schedule search
    (up to ``search_candidates`` schedules per function), then ``trials`` MetaSchedule trials.

    Functions already tuned for any model on the same target are reused, not tuned again.
    ``rpc="host:port:key"`` measures on the devices an RPC tracker hands out.
    """
    from graphopt.backends.compile import fused_module
    from graphopt.backends.targets import get_target
    from graphopt.backends.tuning import tune_module
    from graphopt.backends.tuning.tuner import require_tune_extra

    require_tune_extra(trials=trials, rpc=rpc)  # before minutes of lowering
    spec = get_target(target)
    mod = fused_module(_as_model(model, input_shapes_for(model, input_shapes)), spec, opt_level=opt_level)
    return tune_module(
        mod, spec.target, trials=trials, db_dir=tuning_db, time_budget_s=time_budget_s,
        max_trials_per_task=max_trials_per_task, rpc=rpc, fcompile=spec.export_function(),
        search_candidates=search_candidates, progress=progress,
    )

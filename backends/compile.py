"""The compile pipeline: ONNX (onnx_ir) → graphopt passes → Relax → schedules → ``tvm.compile``.

Stages, each timed (``CompiledModule.timings``) and named in errors:

1. ``check_shapes``: every graph input must have a static shape, or symbolic dims named in
   ``dim_bounds`` (``--max seq=256``: kept symbolic in Relax, bounded for memory planning and checked
   by the loader); else a ShapeError naming the dims.
2. ``optimize``: graphopt's ordered pipeline at ``opt_level`` (folds shape subgraphs to constants).
3. ``check_supported`` then ``lower``: the op table, failing early with every unsupported op listed.
4. ``bind_params``: weights become constants of the module when they are small (embedded in the
   library); above ``EMBED_LIMIT_BYTES`` they stay arguments and the bundle carries ``params.npz``.
5. ``relax``: layout ops on constants folded in numpy, library dispatch, LegalizeOps → AnnotateTIROpPattern → FoldConstant → FuseOps → FuseTIR.
6. ``tuning_db`` (optional): tuned schedules from a MetaSchedule database.
7. ``schedules``: graphopt's default schedules for everything left (``backends.schedules``); on GPU
   targets TVM's generic GPU rules then bind whatever is still unscheduled to threads.
8. ``build``: ``tvm.compile`` (dataflow lowering and memory planning, then code generation).

A user's mistake raises a :class:`~graphopt.core.errors.GraphoptError`; a failure inside TVM on a model
graphopt accepted is a bug and raises :class:`CompileStageError` naming the stage.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
from graphopt.backends.stages import apply_schedules as _apply_schedules
from graphopt.backends.stages import apply_tuning_db as _apply_tuning_db
from graphopt.backends.stages import build as _build
from graphopt.backends.stages import relax_passes as _relax_passes
from graphopt.backends.targets import TargetSpec, get_target

from graphopt.core.errors import GraphoptError, ShapeError, UnsupportedError, UsageError
from graphopt.core.io import check_external_tensors

EMBED_LIMIT_BYTES = 100 * 1024 * 1024  # weights above this go to params.npz beside the library
FRONTENDS = ("graphopt", "tvm")


class CompileStageError(RuntimeError):
    """TVM failed on a model graphopt accepted: a bug (exit code 1); the message names the stage."""

    def __init__(self, stage: str, message: str):
        super().__init__(f"stage '{stage}' failed: {message}")
        self.stage = stage


def first_error_line(e: BaseException, limit: int = 400) -> str:
    """The informative line of a (TVM) exception: its last non-empty, non-traceback line."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    noise = ("File ", "^", "[bt]", "Traceback (most recent call last)", "(... ")
    lines = [ln for ln in lines if not ln.startswith(noise)] or lines
    checks = [ln for ln in lines if "Check failed" in ln or "Error:" in ln]
    text = (checks or lines)[-1] if lines else type(e).__name__
    return text[:limit]


class _Stages:
    """Times stages and turns unexpected exceptions into CompileStageError naming the stage."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        except (GraphoptError, CompileStageError, KeyboardInterrupt):
            raise
        except Exception as e:
            raise CompileStageError(name, f"{type(e).__name__}: {first_error_line(e)}") from e
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start


@dataclasses.dataclass
class CompiledModule:
    """A compiled model, callable with numpy arrays (positional in input order, or by name).

    ``inputs``/``outputs``: ``[(name, shape, dtype)]``; ``params``: weights passed after the data
    inputs when they are not embedded (name → array, in order); ``timings``: seconds per stage.
    """

    executable: Any
    target: TargetSpec
    inputs: list[tuple[str, tuple[int, ...], str]]
    outputs: list[tuple[str, tuple[int, ...], str]]
    params: dict[str, np.ndarray]
    passes: list[str]  # the graphopt passes that changed the model, in order
    timings: dict[str, float]
    opt_level: int = 2
    source_path: str | None = None
    source_sha256: str | None = None
    schedules: bool = True
    frontend: str = "graphopt"
    tuning_db_sha256: str | None = None
    dim_bounds: dict[str, int] = dataclasses.field(default_factory=dict)  # symbolic dim -> largest value
    precision: str = "fp32"  # fp16: convs and matmuls in float16 (backends/precision.py)
    bundle_digest: str | None = None  # set by save()
    _runner: Any = dataclasses.field(default=None, repr=False)

    @property
    def input_info(self) -> dict[str, tuple[tuple[int, ...], str]]:
        return {n: (s, d) for n, s, d in self.inputs}

    @property
    def output_names(self) -> list[str]:
        return [n for n, _, _ in self.outputs]

    @property
    def embedded_params(self) -> bool:
        return not self.params

    def runner(self):
        if self._runner is None:
            if not self.target.can_run_here():
                raise UnsupportedError(
                    f"target {self.target.name}: {self.target.why_not_runnable()}; "
                    "save the bundle (-o) and run it on the device"
                )
            from graphopt.backends.bundle.loader import Runner

            self._runner = Runner(
                self.executable, self.inputs, self.outputs, list(self.params.values()), self.target.device(),
                bounds=self.dim_bounds,
            )
        return self._runner

    def __call__(self, *args: np.ndarray, **kwargs: np.ndarray) -> dict[str, np.ndarray]:
        from graphopt.backends.bundle import call_checked

        return call_checked(self.runner(), args, kwargs)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the bundle directory (atomically); returns its path. ``bundle_digest`` then holds its
        digest (``sha256:`` + the manifest's hash), which ``--expect-digest`` pins."""
        from graphopt.backends.bundle import bundle_digest, export

        path = export(self, directory)
        self.bundle_digest = bundle_digest(path)
        return path


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _data_inputs(model: ir.Model) -> list[ir.Value]:
    inits = set(model.graph.initializers)
    return [v for v in model.graph.inputs if v.name not in inits]


def check_static_shapes(model: ir.Model, dim_bounds: dict[str, int] | None = None) -> None:
    """Every data input needs a fully static shape, or symbolic dims bounded in ``dim_bounds``; the
    error names each dynamic dim."""
    bounds = dict(dim_bounds or {})
    for name, bound in bounds.items():
        if not (isinstance(bound, int) and not isinstance(bound, bool) and bound >= 1):
            raise UsageError(f"--max {name}={bound}: the bound must be a positive integer")
    used = {d.value for v in _data_inputs(model) if v.shape is not None for d in v.shape if not isinstance(d, int)}
    unused = sorted(set(bounds) - used)
    if unused:
        raise UsageError(f"--max {unused[0]}: no input has a dim named '{unused[0]}' "
                         f"(symbolic dims: {', '.join(sorted(n for n in used if n)) or 'none'})")
    problems, examples = [], []
    for v in _data_inputs(model):
        if v.shape is None:
            problems.append(f"'{v.name}' has no shape")
            examples.append(f"{v.name}:1,3,224,224")
            continue
        dyn = [f"dim {i} ({getattr(d, 'value', None) or '?'})" for i, d in enumerate(v.shape)
               if not isinstance(d, int) and getattr(d, "value", None) not in bounds]
        if dyn:
            problems.append(f"'{v.name}' {', '.join(dyn)}")
            examples.append(f"{v.name}:" + ",".join(str(d) if isinstance(d, int) else "1" for d in v.shape))
    if problems:
        raise ShapeError(
            "compiling needs static input shapes; dynamic: " + "; ".join(problems)
            + " (fix them with --input-shape, e.g. " + " ".join(f"--input-shape {e}" for e in examples)
            + ", or name a dim and bound it: --input-shape x:1,seq --max seq=512)"
        )


def _bound_symbolic_dims(mod, bounds: dict[str, int]):
    """Record each symbolic dim's bound on ``main`` (memory is then planned for the largest shapes)."""
    if not bounds:
        return mod
    main = mod["main"].with_attr("tir_var_upper_bound", {k: int(v) for k, v in bounds.items()})
    main = main.with_attr("tir_non_negative_var", list(bounds))
    mod["main"] = main
    return mod


def _optimize(model: ir.Model, opt_level: int) -> tuple[ir.Model, list[str]]:
    from graphopt.passes import default_registry
    from graphopt.passes.graphopt_ops import with_target_runtime

    from graphopt.core.pipeline import DEFAULT_PIPELINE, PassContext, run_pipeline

    # The lowering understands graphopt-domain fused ops, so fusions need not fall back to the
    # model's opset (the ONNX that `graphopt optimize` writes keeps to standard ops instead).
    options = with_target_runtime(None, "graphopt")
    result = run_pipeline(model, DEFAULT_PIPELINE, PassContext(opt_level=opt_level, options=options),
                          default_registry())
    applied = list(dict.fromkeys(r.name for r in result.records if r.modified))  # those that changed the model
    from graphopt.backends.lowering.flash_attention import fused_attention_enabled

    if opt_level == 2 and fused_attention_enabled():  # float32 attention as one CPU kernel (-O3 fuses all)
        from graphopt.passes.fuse_attention import FuseAttentionPass

        if FuseAttentionPass(target_runtime="graphopt", float32_only=True)(result.model).modified:
            applied.append("fuse_attention")
    return result.model, applied


def _lower_with_tvm_frontend(model: ir.Model):
    """TVM's own ONNX importer, in the shape of ``lowering.Lowered`` (for comparison only)."""
    from types import SimpleNamespace

    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    proto = ir.serde.serialize_model(model)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    mod = from_onnx(proto, keep_params_in_input=True, opset=opset, sanitize_input_names=False)
    mod, params = relax.frontend.detach_params(mod)
    main = mod["main"]
    num_input = int(main.attrs["num_input"]) if main.attrs and "num_input" in main.attrs else len(main.params)
    names = [p.name for p in main.params[num_input:]]
    values = [t.numpy() for t in params.get("main", [])]
    inputs = [(v.name, tuple(int(d) for d in v.shape), _np_dtype(v)) for v in _data_inputs(model)]
    outputs = [(v.name, tuple(v.shape) if v.shape is not None else (), _np_dtype(v)) for v in model.graph.outputs]
    return SimpleNamespace(mod=mod, params=dict(zip(names, values)), inputs=inputs, outputs=outputs)


def _np_dtype(v: ir.Value) -> str:
    return np.dtype(v.dtype.numpy()).name if v.dtype is not None else "float32"


def _bind_params(lowered, embed: bool):
    """Bind weights as constants when ``embed``; returns (mod, params left as arguments)."""
    from tvm import relax

    mod, params = lowered.mod, dict(lowered.params)
    if not embed or not params:
        return mod, params
    main = mod["main"]
    num_input = int(main.attrs["num_input"]) if main.attrs and "num_input" in main.attrs else len(main.params) - len(params)
    weight_vars = list(main.params[num_input:])
    if len(weight_vars) != len(params):
        raise CompileStageError("bind_params", f"main takes {len(weight_vars)} weights but lowering gave {len(params)}")
    import tvm

    binding = {var: tvm.runtime.tensor(arr) for var, arr in zip(weight_vars, params.values())}
    mod = relax.transform.BindParams("main", binding)(mod)
    from graphopt.backends.lowering.control import bind_constant_arguments

    return bind_constant_arguments(mod), {}  # weights into If-branch functions, where they fold too


def compile_model(
    model: ir.Model,
    *,
    target: str | dict | TargetSpec = "x86",
    output: str | os.PathLike | None = None,
    opt_level: int = 2,
    tuning_db: str | os.PathLike | None = None,
    schedules: bool = True,
    source_path: str | os.PathLike | None = None,
    embed_params: bool | None = None,
    frontend: str = "graphopt",
    dim_bounds: dict[str, int] | None = None,
    precision: str = "fp32",
) -> CompiledModule:
    """Optimize, lower and compile ``model`` for ``target``; with ``output``, also write the bundle.

    ``embed_params``: None = embed weights in the library when they total at most 100 MB.
    ``frontend="tvm"`` lowers with TVM's own ONNX importer instead of graphopt's op table
    (to compare the two; graphopt's passes still run first).
    ``dim_bounds``: the largest value of each symbolic input dim (``{"seq": 256}``); those dims stay
    symbolic, one library serves every value up to the bound.
    ``precision="fp16"`` (CUDA targets): convs and matmuls in float16 with float32 accumulation.
    """
    from graphopt.backends.precision import check_precision

    if frontend not in FRONTENDS:
        raise UsageError(f"frontend must be one of {', '.join(FRONTENDS)}, got {frontend!r}")
    spec = get_target(target)
    check_precision(precision, spec)
    if output is not None:
        spec.export_function()  # a missing cross compiler is reported before any work
    if tuning_db is not None:
        from graphopt.backends.tuning import database_hash, open_database

        open_database(tuning_db, create=False)  # a missing database is reported before any work
        tuning_db_sha256 = database_hash(tuning_db)
    stage = _Stages()
    bounds = dict(dim_bounds or {})
    from graphopt.backends.lowering.flash_attention import fused_attention

    with fused_attention(not spec.is_gpu):  # the fused attention kernel is CPU code
        lowered, passes = _front_end(model, stage, opt_level, frontend, bounds)
    with stage("bind_params"):
        total = sum(int(np.asarray(a).nbytes) for a in lowered.params.values())
        embed = total <= EMBED_LIMIT_BYTES if embed_params is None else embed_params
        mod, params = _bind_params(lowered, embed)
        mod = _bound_symbolic_dims(mod, bounds)
    if params and schedules and not spec.is_gpu:
        with stage("pack_weights"):  # matmul weights passed as arguments read packed, like constants
            from graphopt.backends.packed_params import pack_weight_params
            from graphopt.backends.schedules import features_of

            mod, params = pack_weight_params(mod, params, features_of(spec).lanes(32))
            from graphopt.backends.schedules.dequant_matmul import pack_dequant_params

            mod, params = pack_dequant_params(mod, params, features_of(spec).lanes(32))
    with stage("relax"):
        mod = _relax_passes(mod, spec, winograd=schedules, precision=precision)
    choices = None
    if tuning_db is not None:
        with stage("tuning_db"):
            mod, choices = _apply_tuning_db(mod, spec, tuning_db)
    if bounds and schedules and not spec.is_gpu:  # functions over a symbolic dim: rules that need no extent
        with stage("symbolic_schedules"):
            from graphopt.backends.schedules.symbolic import schedule_symbolic

            mod = schedule_symbolic(mod, spec, bounds)
    with stage("schedules"):
        mod = _apply_schedules(mod, spec, schedules, choices)
    with stage("build"):
        executable = _build(mod, spec)
    compiled = CompiledModule(
        executable=executable,
        target=spec,
        inputs=[(n, tuple(d if isinstance(d, str) else int(d) for d in s), str(dt)) for n, s, dt in lowered.inputs],
        outputs=[(n, tuple(s) if s is not None else None, str(d)) for n, s, d in lowered.outputs],
        params=dict(params),  # arrays, memory maps, PackedWeight (packed when written or run)
        passes=passes,
        timings=stage.timings,
        opt_level=opt_level,
        source_path=str(Path(source_path).resolve()) if source_path else None,  # bench may run from elsewhere
        source_sha256=sha256_file(source_path) if source_path and Path(source_path).is_file() else None,
        schedules=schedules,
        frontend=frontend,
        tuning_db_sha256=tuning_db_sha256 if tuning_db is not None else None,
        dim_bounds=bounds,
        precision=precision,
    )
    if output is not None:
        with stage("export"):
            compiled.save(output)
    return compiled


def _front_end(model: ir.Model, stage: _Stages, opt_level: int, frontend: str = "graphopt",
               dim_bounds: dict[str, int] | None = None):
    """Shapes checked, passes run, ops checked and lowered: (Lowered, names of passes that changed the model)."""
    with stage("check_shapes"):
        check_static_shapes(model, dim_bounds)
        check_external_tensors(model)  # a short or missing weights file: named here, not inside a pass
    with stage("optimize"):
        model, passes = _optimize(model, opt_level)
    if frontend == "tvm":
        with stage("lower"):
            return _lower_with_tvm_frontend(model), passes
    from graphopt.backends import lowering

    with stage("integer_ops"):  # QDQ groups to integer convs/matmuls (backends/lowering/qdq_fuse.py)
        from graphopt.backends.lowering.qdq_fuse import fuse_qdq

        fuse_qdq(model)
    with stage("check_supported"):
        lowering.check_supported(model)
    with stage("lower"):
        lowered = lowering.lower(model)
    from graphopt.backends.bundle.weights import map_external_params

    with stage("map_weights"):  # external weights as copy-on-write maps: TVM takes them without a copy
        lowered.params = map_external_params(model, lowered.params)
    return lowered, passes


def fused_module(model: ir.Model, target: str | dict | TargetSpec, *, opt_level: int = 2):
    """The fused Relax module (weights bound) that ``compile_model`` would schedule: what tuning tunes.

    Same stages as compile up to ``relax``, so a tuned task is found again, by structure, when the
    model is compiled with ``--tuning-db``.
    """
    spec = get_target(target)
    stage = _Stages()
    from graphopt.backends.lowering.flash_attention import fused_attention

    with fused_attention(not spec.is_gpu):
        lowered, _ = _front_end(model, stage, opt_level)
    with stage("bind_params"):
        mod, _ = _bind_params(lowered, embed=True)
    with stage("relax"):
        return _relax_passes(mod, spec, winograd=True)

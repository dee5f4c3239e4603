"""graphopt's Python API. Every CLI command is one call here plus printing."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import onnx_ir as ir

from graphopt.passes import default_registry
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
    from graphopt.models import model_path

    return model_path(path)


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
    registry = registry or default_registry()
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
    registry = registry or default_registry()
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
    frontend: str = "graphopt",
    precision: str = "fp32",
):
    """Optimize, lower to Relax, compile for ``target``; returns a callable module.

    ``precision="fp16"`` (CUDA targets): convs and matmuls in float16 with float32 accumulation, on
    tensor cores where the arch has them; inputs and outputs keep their types.

    ``frontend="tvm"`` lowers through TVM's own ONNX importer instead of graphopt's op table (a
    baseline for comparisons).

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
    m = _as_model(model, input_shapes if dim_bounds else input_shapes_for(model, input_shapes))
    return compile_model(
        m,
        target=target,
        output=output,
        opt_level=opt_level,
        tuning_db=tuning_db,
        schedules=schedules,
        source_path=source,
        dim_bounds=dim_bounds,
        frontend=frontend,
        precision=precision,
    )


def load_bundle(path: str | os.PathLike, *, verify: bool = True, digest: str | None = None):
    """Load a compiled bundle directory (sha256 of every file checked unless ``verify=False``;
    ``digest="sha256:..."`` refuses a bundle whose manifest.json hashes differently, see docs/bundles.md).

    The result is callable with numpy arrays (positional in input order, or by name) and returns
    a dict output name -> array; wrong names, dtypes or shapes raise a GraphoptError naming the input.
    """
    from graphopt.backends.bundle import load_bundle as _load

    return _load(path, verify=verify, digest=digest)


def generate(
    model: str | os.PathLike,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    *,
    against: str | None = None,
    dim_bounds: dict[str, int] | None = None,
    target: str = "x86",
    threads: int | None = None,
    keep_logits: bool = False,
    warmup: bool = True,
) -> dict[str, Any]:
    """Greedy decoding with a KV-cache decoder (``graphopt generate``; loop: ``graphopt.front.generate``).

    ``model``: a bundle compiled with symbolic sequence and cache dims (``--max seq=N --max past=N``) or
    a decode bundle (``--input-shape input_ids:1,1 --max past=N``: the prompt goes in one token per
    call), or an ONNX decoder (a file, ``gen:gpt2``) compiled here (``generate.compile_plan``: without
    ``dim_bounds``, the sequence dim bounded by the prompt, one prefill call, and ``past`` by what the
    request needs). The caches stay on the device from step to step (``generate.device_step``).
    ``against="ort"`` runs the same loop on the ONNX (the bundle's recorded source) in ONNX Runtime in
    this run. ``warmup`` runs two tokens first, untimed. Returns
    ``{"model", "source", "compile_s", "graphopt": Trace, "ort": Trace | None}``.
    """
    import dataclasses
    import time

    from graphopt.front import generate as gen

    if against not in (None, "ort"):
        raise UsageError(f"--against {against}: expected 'ort'")
    compile_s = None
    if Path(model).is_dir() and (Path(model) / "manifest.json").is_file():
        from graphopt.front.bench import _model_source

        module = load_bundle(model)
        source, _ = _model_source(str(model), [])
        bounds = dict(module.manifest.get("dim_bounds") or {})
    else:
        import onnx

        source = str(resolve_model_path(model))
        graph = onnx.load(source, load_external_data=False).graph
        inits = {t.name for t in graph.initializer}
        rows = [(i.name, [d.dim_param or (d.dim_value if d.HasField("dim_value") else None)
                          for d in i.type.tensor_type.shape.dim],
                 onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type).name)
                for i in graph.input if i.name not in inits]
        lay = gen.decoder_layout(rows, [o.name for o in graph.output], source)
        shapes, bounds = gen.compile_plan(lay, list(prompt_ids), max_new_tokens, dim_bounds, source)
        gen.check_request(dataclasses.replace(lay, seq_dim=lay.seq_dim if shapes is None else 1),
                          list(prompt_ids), max_new_tokens, bounds, str(model))  # before minutes of compiling
        t0 = time.perf_counter()
        module = compile(source, target=target, input_shapes=shapes, dim_bounds=bounds)
        compile_s, bounds = time.perf_counter() - t0, dict(module.dim_bounds)
    layout = gen.decoder_layout(module.inputs, [n for n, _, _ in module.outputs], str(model))
    logits_shape = next(s for n, s, _ in module.outputs if n == layout.logits)
    vocab = logits_shape[-1] if logits_shape and isinstance(logits_shape[-1], int) else None
    layout = dataclasses.replace(layout, vocab=vocab)
    gen.check_request(layout, list(prompt_ids), max_new_tokens, bounds, str(model))
    import tvm

    runner = module.runner if hasattr(module.runner, "vm") else module.runner()  # a bundle's, or compiled
    steps = {"graphopt": (gen.device_step(runner, lambda a: tvm.runtime.tensor(a, runner.device)), layout)}
    if against == "ort":
        if source is None:
            raise UsageError(f"{model}: --against ort needs the bundle's source ONNX, which is missing or changed")
        steps["ort"] = gen.ort_decoder(source, threads or int(os.environ.get("TVM_NUM_THREADS", 0)) or None)
    result: dict[str, Any] = {"model": str(model), "source": source, "compile_s": compile_s, "ort": None}
    for name, (step, lay) in steps.items():
        if warmup:
            gen.greedy(step, lay, prompt_ids, min(2, max_new_tokens))
        result[name] = gen.greedy(step, lay, prompt_ids, max_new_tokens, keep_logits=keep_logits)
    return result


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


def tuning_summary(model: ir.Model, *, target: str, opt_level: int, tuning_db: str | os.PathLike) -> dict[str, Any]:
    """What the database holds for this model's fused functions (functions, searched, candidates, trials)."""
    from graphopt.backends.compile import fused_module
    from graphopt.backends.targets import get_target
    from graphopt.backends.tuning import model_summary

    spec = get_target(target)
    return model_summary(fused_module(model, spec, opt_level=opt_level), spec.target, str(tuning_db))


# ---- timing a compiled module (graphopt bench, the device checks) ----

def timer(runner, feeds: dict):
    """``timer(n) -> [seconds] * n``: ``n`` timed runs of a compiled module's or bundle's ``runner``."""
    from graphopt.backends.bundle.timing import runner_timer

    return runner_timer(runner, feeds)


def profile(runner, feeds: dict, *, runs: int = 3) -> list[dict[str, Any]]:
    """Time spent in each fused function per run, slowest first (``function``, ``ms``, ``share``, ``calls``)."""
    from graphopt.backends.bundle.timing import runner_profile

    return runner_profile(runner, feeds, runs=runs)


def schedule_report() -> dict[str, str]:
    """function -> schedule rule, for the last compile in this process."""
    from graphopt.backends import schedules

    return schedules.last_report()


# ---- targets and bundles ----

def targets() -> list[dict[str, Any]]:
    """Every target preset: name, what it assumes, its TVM target, cross compiler, whether it runs here."""
    from graphopt.backends.targets import ASSUMES, PRESETS, emulate

    def runs_here(spec) -> str:
        if spec.kind == "cuda":
            return "yes" if spec.can_run_here() else "no (no CUDA GPU visible)"
        if spec.can_run_here():
            return "yes"
        return "under qemu" if emulate.needs_emulation(spec.features.get("arch", "")) else "no"

    rows = []
    for name, make in PRESETS.items():
        spec = make()
        rows.append({"name": name, "assumes": ASSUMES.get(name, ""), "target": spec.config,
                     "cross_compiler": spec.cross_compiler, "runs_here": runs_here(spec)})
    return rows


def check_target(target: str) -> None:
    """Raise a UsageError naming ``target`` unless it is a preset or a TVM target graphopt can build for."""
    from graphopt.backends.targets import get_target

    get_target(target)


def emulated_target(target: str) -> bool:
    """Whether code for ``target`` runs on this host only under qemu (aarch64 on x86)."""
    from graphopt.backends.targets import emulate, get_target

    return emulate.needs_emulation(get_target(target).features.get("arch", ""))


def coverage(model: ir.Model | str | os.PathLike, *, target: str = "x86", input_shapes=None) -> dict[str, Any]:
    """Which of the model's ops graphopt lowers for ``target``, and how (see ``graphopt inspect --coverage``)."""
    from graphopt.backends.lowering import coverage as _coverage

    return _coverage(_as_model(model, input_shapes), target=target)


def check_digests(paths: Sequence[str], digests: Sequence[str]) -> None:
    """``--expect-digest``: one ``sha256:HEX`` per bundle directory among ``paths``, in order, each matching."""
    from graphopt.backends.bundle import check_digests as _check

    _check(paths, digests)


def package(bundle: str | os.PathLike, output: str | os.PathLike, *, digest: str | None = None) -> dict[str, Any]:
    """One ``.tar.gz`` for a device: library, params, manifest and the standalone loader."""
    from graphopt.backends.bundle.package import package as _package

    return _package(bundle, output, digest=digest)


def is_emulated_bundle(bundle: str | os.PathLike) -> bool:
    """Whether ``bundle`` is built for another architecture that this host runs under qemu."""
    from graphopt.backends.targets.emulated_bundle import is_emulated

    return is_emulated(bundle)


def run_emulated(bundle: str | os.PathLike, inputs: dict, *, verify: bool = True, digest: str | None = None) -> dict:
    """Run an aarch64 bundle on this x86 host: its standalone loader under qemu, in a cached aarch64 Python."""
    from graphopt.backends.targets.emulated_bundle import run_bundle

    return run_bundle(bundle, inputs, verify=verify, digest=digest)


def bench_emulated(bundle: str | os.PathLike, *, repeat: int, warmup: int, threads: int | None,
                   digest: str | None = None) -> dict[str, Any]:
    """Time an aarch64 bundle under qemu (not a device time), with the kernels that use NEON and dot products."""
    import json

    from graphopt.backends.targets import neon
    from graphopt.backends.targets.emulated_bundle import NOTE, bench_bundle

    timed = bench_bundle(bundle, repeat=repeat, warmup=warmup, threads=threads, digest=digest)
    with open(os.path.join(bundle, "manifest.json")) as f:
        manifest = json.load(f)
    timed["kernels"] = neon.kernel_report(os.path.join(bundle, manifest["library"]))
    timed["target"] = manifest["target"]["name"]
    timed["note"] = NOTE
    return timed


# ---- what conformance needs to feed a compiled module ----

def held_input(array, dtype: str):
    """``array`` as the compiled module holds ``dtype`` (float8/int4 and other types as bit patterns)."""
    from graphopt.backends.lowering.helpers import as_held

    return as_held(array, dtype)


def bit_pattern_dtypes() -> frozenset[str]:
    """The dtypes a compiled module holds as bit patterns (outputs come back as uint8 of the same bits)."""
    from graphopt.backends.lowering.helpers import BIT_PATTERN_DTYPES

    return frozenset(BIT_PATTERN_DTYPES)


def compile_errors():
    """``(CompileStageError, first_error_line)``: the error TVM's build stages raise and its one-line summary."""
    from graphopt.backends.compile import CompileStageError, first_error_line

    return CompileStageError, first_error_line


def runtime_version() -> str:
    """The TVM runtime's version (bundles and caches record it)."""
    import tvm

    return tvm.__version__

"""The ONNX node conformance cases through graphopt's whole compiler, in parallel worker processes.

Each case (``onnx.backend.test.case.node.collect_testcases()``) goes: load into onnx_ir → input
shapes fixed from the case's data → -O2 passes → lower → compile for x86 → run, and every output is
compared with the case's expected output (rtol 1e-3, atol 1e-4; NaN matches NaN). ONNX Runtime runs
the same case for comparison. Workers are separate processes, each case under a timeout; a worker
that hangs or crashes is replaced and the case is reported as ``timeout`` / ``crash``.
"""

from __future__ import annotations

import collections
import dataclasses
import fnmatch
import multiprocessing as mp
import os
import time
from collections.abc import Callable
from multiprocessing.connection import wait

import numpy as np

RTOL, ATOL = 1e-3, 1e-4
# Half-precision outputs are compared at two units in the last place of their format, not at fp32's
# tolerance: the expected values were computed in fp32 and rounded once, and any other (equally valid)
# order of operations rounds differently by an ulp. float16 has 10 mantissa bits, bfloat16 7.
LOOSER = {"float16": (2 * 2.0**-10, 2 * 2.0**-10), "bfloat16": (2 * 2.0**-7, 2 * 2.0**-7)}
STATUSES = ("passed", "unsupported", "rejected", "compile_error", "run_error", "mismatch", "timeout", "crash")


@dataclasses.dataclass
class CaseResult:
    name: str
    op: str
    status: str  # one of STATUSES
    reason: str = ""
    seconds: float = 0.0
    ort_passed: bool | None = None


@dataclasses.dataclass
class ConformanceReport:
    results: list[CaseResult]
    seconds: float
    jobs: int

    @property
    def passed(self) -> int:
        return sum(r.status == "passed" for r in self.results)

    @property
    def failed(self) -> int:
        return len(self.results) - self.passed

    @property
    def ort_passed(self) -> int:
        return sum(bool(r.ort_passed) for r in self.results)

    def counts(self) -> dict[str, int]:
        c = collections.Counter(r.status for r in self.results)
        return {s: c[s] for s in STATUSES if c[s]}

    def failures_by_op(self) -> dict[tuple[str, str], list[CaseResult]]:
        groups: dict[tuple[str, str], list[CaseResult]] = collections.defaultdict(list)
        for r in self.results:
            if r.status != "passed":
                groups[(r.op, r.status)].append(r)
        return dict(sorted(groups.items()))

    def to_json(self) -> dict:
        return {
            "total": len(self.results),
            "passed": self.passed,
            "failed": self.failed,
            "onnxruntime_passed": self.ort_passed,
            "counts": self.counts(),
            "seconds": round(self.seconds, 1),
            "jobs": self.jobs,
            "rtol": RTOL,
            "atol": ATOL,
            "cases": [dataclasses.asdict(r) for r in self.results],
        }


def _all_cases() -> dict:
    import warnings

    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return {c.name: c for c in collect_testcases()}


def select(names: list[str], pattern: str | None) -> list[str]:
    """Names matching any comma-separated ``pattern`` part: a glob when it has ``*?[``, else a substring."""
    if not pattern:
        return list(names)
    parts = [p.strip() for p in pattern.split(",") if p.strip()]

    def match(name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) if any(ch in p for ch in "*?[") else p in name for p in parts)

    return [n for n in names if match(n)]


def case_op(case) -> str:
    """The op a case tests: its only node's op, else the longest ONNX op name the test name starts with."""
    ops = {n.op_type for n in case.model.graph.node}
    if len(ops) == 1:
        return ops.pop()
    name = case.name.removeprefix("test_").replace("_", "").lower()
    known = _op_names() | ops
    matches = [op for op in known if name.startswith(op.lower())]
    return max(matches, key=len) if matches else (sorted(ops)[0] if ops else "?")


def _op_names() -> set[str]:
    import onnx

    return {s.name for s in onnx.defs.get_all_schemas()}


# Inputs that decide output shapes (op -> input positions). A static-shape compiler needs their
# values at compile time, as it needs the input dims: with ``freeze=True`` a case's values for them
# are made initializers, the way ``--input-shape`` fixes dims. Data inputs are never frozen.
SHAPE_INPUTS: dict[str, tuple[int, ...]] = {
    "Reshape": (1,), "Expand": (1,), "Tile": (1,), "Slice": (1, 2, 3, 4), "Unsqueeze": (1,), "Squeeze": (1,),
    "TopK": (1,), "Pad": (1, 3), "Resize": (1, 2, 3), "Upsample": (1,), "Split": (1,), "Trilu": (1,),
    "ConstantOfShape": (0,), "Range": (0, 1, 2), "OneHot": (1,), "CenterCropPad": (1, 2), "Col2Im": (1, 2, 3),
    "CumSum": (1,), "CumProd": (1,), "MaxUnpool": (2,), "AffineGrid": (1,), "DFT": (1, 2), "STFT": (1, 3),
    "BlackmanWindow": (0,), "HannWindow": (0,), "HammingWindow": (0,), "MelWeightMatrix": (0, 1, 2, 3, 4),
    "EyeLike": (), "Compress": (1,), "NonMaxSuppression": (2, 3, 4),
}


def shape_input_names(model) -> set[str]:
    """Graph inputs (of the main graph) consumed at a shape-deciding position of some node."""
    names = set()
    for node in model.graph.node:
        positions = SHAPE_INPUTS.get(node.op_type, (1,) if node.op_type.startswith("Reduce") else ())
        names.update(node.input[i] for i in positions if i < len(node.input) and node.input[i])
    return names & {i.name for i in model.graph.input}


# --- one case, in a worker -----------------------------------------------------------------------


def _close(actual, expected) -> str | None:
    """None when equal within tolerance, else a short description of the difference."""
    exp = np.asarray(expected)
    act = np.asarray(actual)
    if exp.shape != act.shape:
        return f"shape {act.shape}, expected {exp.shape}"
    if exp.dtype.kind in "OUS":
        return None if np.array_equal(act.astype(exp.dtype), exp) else "values differ"
    if exp.dtype.kind in "biu" or exp.dtype == bool:
        return None if np.array_equal(act, exp) else f"{int(np.sum(act != exp))} of {exp.size} elements differ"
    rtol, atol = LOOSER.get(exp.dtype.name, (RTOL, ATOL))
    e, a = exp.astype(np.float64), act.astype(np.float64)
    ok = np.isclose(a, e, rtol=rtol, atol=atol, equal_nan=True)
    if ok.all():
        return None
    nan_mismatch = int(np.sum(np.isnan(a) != np.isnan(e)))
    with np.errstate(invalid="ignore"):
        diff = np.nanmax(np.abs(np.where(ok, 0, a - e)))
    detail = f"max abs diff {diff:.3g}" + (f", {nan_mismatch} NaN where a number was expected or back" if nan_mismatch else "")
    return f"{int((~ok).sum())} of {exp.size} elements differ ({detail})"


def _plain(arrays) -> bool:
    return all(isinstance(a, (np.ndarray, np.generic)) for a in arrays)


def _arrays(values) -> list:
    """A data set's values as numpy; TensorProtos carry the dtypes numpy lacks (bfloat16, float8,
    int4, ...) and become ml_dtypes arrays. Sequences, optionals and maps stay as they are."""
    import onnx

    return [onnx.numpy_helper.to_array(v) if isinstance(v, onnx.TensorProto) else v for v in values]


def _run_ort(case) -> bool | None:
    try:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.log_severity_level = 3
        sess = ort.InferenceSession(case.model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]
        for inputs, expected in case.data_sets:
            outs = sess.run(None, {n: np.asarray(a) for n, a in zip(names, inputs)})
            if len(outs) != len(expected) or any(_close(a, e) for a, e in zip(outs, expected)):
                return False
        return True
    except Exception:
        return False


def run_case(case, *, opt_level: int = 2, frontend: str = "graphopt", target="x86", freeze: bool = True) -> tuple[str, str]:
    """(status, reason) for one case through the compiler (``freeze``: see ``SHAPE_INPUTS``)."""
    import onnx_ir as ir

    from graphopt.core.errors import GraphoptError, UnsupportedError

    from graphopt.front import api

    CompileStageError, first_error_line = api.compile_errors()
    bit_patterns = api.bit_pattern_dtypes()
    data_sets = [(_arrays(i), _arrays(o)) for i, o in case.data_sets]
    if not all(_plain(i) and _plain(o) for i, o in data_sets):
        return "unsupported", "sequence/optional/map inputs or outputs"
    compiled_by_shapes: dict = {}
    for inputs, expected in data_sets:
        inputs = [np.asarray(a) for a in inputs]  # some cases give numpy scalars
        graph_inputs = [i.name for i in case.model.graph.input]
        frozen = shape_input_names(case.model) if freeze else set()
        key = tuple((tuple(a.shape), a.tobytes() if n in frozen else b"") for n, a in zip(graph_inputs, inputs))
        feeds = [a for n, a in zip(graph_inputs, inputs) if n not in frozen]
        try:
            compiled = compiled_by_shapes.get(key)
            if compiled is None:
                model = ir.serde.deserialize_model(case.model)
                for v, a in zip(list(model.graph.inputs), inputs):
                    v.shape = ir.Shape(a.shape)
                    if v.name in frozen:
                        v.const_value = ir.tensor(a, name=v.name)
                        model.graph.inputs.remove(v)
                        model.graph.register_initializer(v)
                compiled = api.compile(model, target=target, opt_level=opt_level, frontend=frontend)
                compiled_by_shapes[key] = compiled
        except UnsupportedError as e:
            return "unsupported", first_error_line(e)
        except GraphoptError as e:
            return "rejected", f"{type(e).__name__}: {first_error_line(e)}"
        except CompileStageError as e:
            return "compile_error", str(e)[:400]
        except Exception as e:
            return "compile_error", f"{type(e).__name__}: {first_error_line(e)}"
        try:
            outputs = compiled(*[api.held_input(a, dtype) for a, (_n, _s, dtype) in zip(feeds, compiled.inputs)])
        except Exception as e:
            return "run_error", f"{type(e).__name__}: {first_error_line(e)}"
        for (name, value), exp in zip(outputs.items(), expected):
            if exp.dtype.name in bit_patterns and value.dtype == np.uint8:
                value = value.view(exp.dtype)  # held as bit patterns
            problem = _close(value, exp)
            if problem:
                return "mismatch", f"output '{name}': {problem}"
        if len(outputs) != len(expected):
            return "mismatch", f"{len(outputs)} outputs, expected {len(expected)}"
    return "passed", ""


def _worker(conn, options: dict) -> None:
    os.environ["TVM_NUM_THREADS"] = "1"
    os.environ["OMP_NUM_THREADS"] = "1"
    if options.get("quiet", True):  # TVM's C++ warnings go straight to fd 2
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
    conn.send(("ready", None))
    while True:
        case = conn.recv()  # the TestCase itself: workers never collect the cases (10 s each)
        if case is None:
            return
        name = case.name
        start = time.perf_counter()
        ort_ok = _run_ort(case) if options.get("ort", True) else None
        try:
            status, reason = run_case(case, opt_level=options["opt_level"], frontend=options["frontend"],
                                      freeze=options.get("freeze", True))
        except Exception as e:  # a bug in the harness or the compiler: report, keep going
            status, reason = "compile_error", f"{type(e).__name__}: {str(e)[:300]}"
        conn.send(("done", CaseResult(name, case_op(case), status, reason, time.perf_counter() - start, ort_ok)))


# --- the parent: a pool of replaceable workers -----------------------------------------------------


class _Slot:
    def __init__(self, ctx, options: dict) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, options), daemon=True)
        self.proc.start()
        child.close()
        self.ready = False
        self.case: str | None = None
        self.deadline = 0.0

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5)
        self.conn.close()


def run_conformance(
    pattern: str | None = None,
    *,
    names: list[str] | None = None,
    jobs: int | None = None,
    timeout: float = 120.0,
    opt_level: int = 2,
    frontend: str = "graphopt",
    ort: bool = True,
    freeze: bool = True,
    progress: Callable[[CaseResult, int, int], None] | None = None,
) -> ConformanceReport:
    """Run the cases named ``names``, or whose names match ``pattern`` (see ``select``), in ``jobs``
    worker processes (default: the CPU cores this process may use)."""
    from graphopt.core.errors import UsageError

    start = time.perf_counter()
    cases = _all_cases()
    if names is not None:
        unknown = [n for n in names if n not in cases]
        if unknown:
            raise UsageError(f"unknown conformance case(s): {', '.join(unknown)}")
        names = list(dict.fromkeys(names))
    else:
        names = select(sorted(cases), pattern)
    if not names:
        raise UsageError(f"-k {pattern!r} matches no conformance case")
    ops = {n: case_op(cases[n]) for n in names}
    jobs = max(1, min(jobs or len(os.sched_getaffinity(0)), len(names)))
    options = {"opt_level": opt_level, "frontend": frontend, "ort": ort, "freeze": freeze}
    ctx = mp.get_context("spawn")
    todo = collections.deque(names)
    results: dict[str, CaseResult] = {}
    slots = [_Slot(ctx, options) for _ in range(jobs)]
    try:
        while len(results) < len(names):
            for i, s in enumerate(slots):
                if s.ready and s.case is None and todo:
                    s.case = todo.popleft()
                    s.deadline = time.monotonic() + timeout
                    s.conn.send(cases[s.case])
            busy = [s.deadline for s in slots if s.case is not None]
            wait_for = max(0.0, min(busy) - time.monotonic()) if busy else None
            ready = wait([s.conn for s in slots], timeout=wait_for)
            for i, s in enumerate(slots):
                lost = None
                if s.conn in ready:
                    try:
                        kind, payload = s.conn.recv()
                    except (EOFError, OSError):
                        lost = ("crash", "the worker process died (signal or abort in native code)")
                    else:
                        if kind == "ready":
                            s.ready = True
                        else:
                            results[payload.name] = payload
                            s.case = None
                            if progress:
                                progress(payload, len(results), len(names))
                elif s.case is not None and time.monotonic() > s.deadline:
                    lost = ("timeout", f"no result within {timeout:g} s")
                if lost is not None:
                    if s.case is not None:
                        r = CaseResult(s.case, ops[s.case], lost[0], lost[1], timeout if lost[0] == "timeout" else 0.0)
                        results[s.case] = r
                        if progress:
                            progress(r, len(results), len(names))
                    elif not s.ready:
                        raise RuntimeError("a conformance worker died while starting")
                    s.kill()
                    slots[i] = _Slot(ctx, options)
    finally:
        for s in slots:
            try:
                s.conn.send(None)
            except (OSError, BrokenPipeError):
                pass
            s.proc.join(2)
            s.kill()
    return ConformanceReport([results[n] for n in names], time.perf_counter() - start, jobs)

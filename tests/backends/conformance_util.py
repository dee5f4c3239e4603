"""Run ONNX's node conformance cases through graphopt's lowering and report pass/fail per op.

In tests:  ``from conformance_util import select_cases, run_case``.
From the shell (each case in a worker process; a crash costs one case, not the run)::

    python3 tests/backends/conformance_util.py --ops Add,Sub,Relu [--json out.json] [--jobs 2]
    python3 tests/backends/conformance_util.py --family elementwise,tensor,reduce
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

RTOL, ATOL = 1e-3, 1e-4


@functools.lru_cache(maxsize=1)
def all_cases() -> tuple:
    """ONNX's node conformance cases, cached on disk per onnx version (collecting them costs ~5 s of CPU)."""
    import os
    import pickle
    import warnings

    import onnx
    from onnx.backend.test.case.node import collect_testcases

    cache = Path(os.environ.get("GRAPHOPT_CACHE", Path.home() / ".cache" / "graphopt"))
    path = cache / f"onnx-node-cases-{onnx.__version__}.pkl"
    try:
        return pickle.loads(path.read_bytes())
    except Exception:  # noqa: BLE001 - no cache yet, or an unreadable one: collect again
        pass
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        cases = tuple(collect_testcases())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(pickle.dumps(cases))
        tmp.replace(path)
    except Exception:  # noqa: BLE001 - a cache is optional
        pass
    return cases


def _graph_ops(graph) -> set[str]:
    ops = set()
    for node in graph.node:
        ops.add(node.op_type)
        for attr in node.attribute:
            if attr.g.node:
                ops |= _graph_ops(attr.g)
            for g in attr.graphs:
                ops |= _graph_ops(g)
    return ops


def case_ops(case) -> set[str]:
    """Every op type in the case's graph (subgraphs included)."""
    return _graph_ops(case.model.graph)


def _snake(op: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z][a-z])", "_", op).lower()


@functools.lru_cache(maxsize=1)
def _onnx_ops() -> tuple[str, ...]:
    import onnx

    return tuple(sorted({s.name for s in onnx.defs.get_all_schemas_with_history() if s.domain == ""}))


def primary_op(case) -> str:
    """The op a case tests: the ONNX op its name starts with (longest match), else its only op."""
    key = case.name[len("test_"):].replace("_", "").lower()
    matches = [op for op in _onnx_ops() if key.startswith(op.lower())]
    if matches:
        return max(matches, key=len)
    nodes = [n.op_type for n in case.model.graph.node]
    return nodes[-1] if nodes else "?"


def select_cases(ops) -> list:
    """The cases whose primary op is in ``ops`` (their other ops may belong to any family)."""
    ops = set(ops)
    return [case for case in all_cases() if primary_op(case) in ops]


def _compare(expected: np.ndarray, got: np.ndarray, rtol: float, atol: float) -> str | None:
    expected = np.asarray(expected)
    if expected.dtype.kind in "OSU":
        return "string outputs"
    if expected.dtype.name in ("int4", "uint4", "int2", "uint2"):  # held unpacked in 8 bits
        got = got.astype(expected.dtype)
    if expected.dtype.name in ("float4_e2m1fn", "float8_e8m0fnu") and got.dtype == np.uint8:  # bit patterns
        got = got.view(expected.dtype)
    if got.shape != expected.shape:
        return f"shape {got.shape} != expected {expected.shape}"
    if got.dtype != expected.dtype:
        return f"dtype {got.dtype} != expected {expected.dtype}"
    if expected.dtype.kind in "biu":
        return None if np.array_equal(got, expected) else "values differ"
    e = expected.astype(np.float64)
    g = got.astype(np.float64)
    ok = np.isclose(g, e, rtol=rtol, atol=atol, equal_nan=True)
    if not ok.all():
        err = np.max(np.abs(np.where(ok, 0, g - e)))
        return f"values differ ({(~ok).sum()}/{ok.size} elements, max abs err {err:.3g})"
    return None


def _frozen_model(proto, values: dict[str, np.ndarray]):
    """A copy of the model where the named graph inputs are initializers holding ``values``."""
    import onnx

    model = onnx.ModelProto()
    model.CopyFrom(proto)
    keep = [i for i in model.graph.input if i.name not in values]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    model.graph.initializer.extend(onnx.numpy_helper.from_array(np.asarray(v), n) for n, v in values.items())
    return model


def _lower_case(proto, feed: dict[str, np.ndarray], frozen: list[str]):
    """Lower the case, turning graph inputs the lowering needs constant into initializers (AOT semantics)."""
    import onnx_ir as ir

    from graphopt.backends.lowering.context import ConstantInputRequired
    from graphopt.backends.lowering.convert import lower

    while True:
        model = _frozen_model(proto, {n: feed[n] for n in frozen}) if frozen else proto
        try:
            return lower(ir.serde.deserialize_model(model))
        except ConstantInputRequired as exc:
            new = [n for n in _input_ancestors(proto.graph, exc.value_name) if n in feed and n not in frozen]
            if not new:
                raise
            frozen.extend(new)


def _input_ancestors(graph, name: str) -> list[str]:
    """The value itself when it is a graph input, else the integer/bool or scalar graph inputs whose
    values it is computed from (not through Shape/Size)."""
    if any(i.name == name for i in graph.input):
        return [name]
    producers = {o: n for n in graph.node for o in n.output}
    ints = {2, 3, 4, 5, 6, 7, 9, 12, 13}  # (U)INT8/16/32/64 and BOOL
    inputs = {
        i.name for i in graph.input
        if i.type.tensor_type.elem_type in ints
        or (i.type.tensor_type.HasField("shape") and len(i.type.tensor_type.shape.dim) == 0)
    }
    seen, todo, found = set(), [name], []
    while todo:
        v = todo.pop()
        if v in seen or not v:
            continue
        seen.add(v)
        if v in inputs:
            found.append(v)
        elif v in producers and producers[v].op_type not in ("Shape", "Size"):
            todo.extend(producers[v].input)
    return found


def run_case(case) -> tuple[bool, str, list[str]]:
    """(passed, reason, frozen inputs) for one conformance case, run on each of its data sets.

    Inputs that set a shape, axis or count (Reshape's shape, Slice's starts, TopK's K...) must be
    compile-time constants for graphopt; such inputs are frozen to the data set's values (listed in
    the third item) and the case is compiled once per data set.
    """
    from graphopt.backends.lowering.testing import _to_numpy, _to_tensor, compile_lowered

    init = {i.name for i in case.model.graph.initializer}
    names = [i.name for i in case.model.graph.input if i.name not in init]
    rtol, atol = max(RTOL, case.rtol), max(ATOL, case.atol)
    frozen: list[str] = []
    vm = lowered = None
    for inputs, outputs in case.data_sets:
        inputs, outputs = [_np(v) for v in inputs], [_np(v) for v in outputs]
        feed = dict(zip(names, inputs))
        if vm is None or frozen:
            try:
                lowered = _lower_case(case.model, feed, frozen)
                vm = compile_lowered(lowered)
            except Exception as exc:  # noqa: BLE001 - a report, not a handler
                return False, f"{type(exc).__name__}: {_first_line(exc)}", frozen
        try:
            args = [_to_tensor(feed[n], d) for n, _s, d in lowered.inputs]
            args += [_to_tensor(a, a.dtype.name) for a in lowered.params.values()]
            got = _to_numpy(vm["main"](*args))
        except Exception as exc:  # noqa: BLE001
            return False, f"run: {type(exc).__name__}: {_first_line(exc)}", frozen
        if len(got) != len(outputs):
            return False, f"{len(got)} outputs, expected {len(outputs)}", frozen
        for k, (exp, g) in enumerate(zip(outputs, got)):
            why = _compare(exp, g, rtol, atol)
            if why:
                return False, f"output {k}: {why}", frozen
    return True, "", frozen


def _np(value):
    """Data-set values are arrays, numpy scalars, or TensorProtos (for dtypes numpy lacks)."""
    import onnx

    if isinstance(value, onnx.TensorProto):
        return onnx.numpy_helper.to_array(value)
    return np.asarray(value)


def _first_line(exc: Exception) -> str:
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else "")[:200]


# ------------------------------------------------------------------------- command line


def _worker(names: list[str]) -> None:
    by_name = {c.name: c for c in all_cases()}
    for name in names:
        t0 = time.time()
        ok, why, frozen = run_case(by_name[name])
        print(json.dumps({"name": name, "ok": ok, "why": why, "frozen": frozen, "s": round(time.time() - t0, 2)}),
              flush=True)


def sweep(cases: list, timeout: float = 120.0) -> dict[str, dict]:
    """Run cases in a worker process (restarted after a crash or a hang); {name: result}."""
    results: dict[str, dict] = {}
    todo = [c.name for c in cases]
    while todo:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", ",".join(todo)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        try:
            for line in proc.stdout:
                if line.startswith("{"):
                    r = json.loads(line)
                    results[r["name"]] = r
        finally:
            proc.wait()
        todo = [n for n in todo if n not in results]
        if todo:  # the worker died on todo[0]
            results[todo[0]] = {"name": todo[0], "ok": False, "why": f"worker crashed (rc {proc.returncode})"}
            todo = todo[1:]
    return results


def report(cases: list, results: dict[str, dict]) -> dict:
    by_op: dict[str, Counter] = defaultdict(Counter)
    for c in cases:
        by_op[primary_op(c)]["pass" if results[c.name]["ok"] else "fail"] += 1
    passed = sum(1 for c in cases if results[c.name]["ok"])
    return {
        "total": len(cases),
        "passed": passed,
        "passed_with_frozen_inputs": sum(1 for c in cases if results[c.name]["ok"] and results[c.name].get("frozen")),
        "failed": len(cases) - passed,
        "by_op": {op: dict(v) for op, v in sorted(by_op.items())},
        "failures": {n: r["why"] for n, r in sorted(results.items()) if not r["ok"]},
    }


def family_ops(families: list[str]) -> set[str]:
    import importlib

    ops = set()
    for fam in families:
        mod = importlib.import_module(f"graphopt.backends.lowering.{fam}")
        ops |= {r.op for r in mod.RULES}
    return ops


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", default="", help="comma-separated op types")
    ap.add_argument("--family", default="", help="comma-separated lowering modules (elementwise,tensor,...)")
    ap.add_argument("--match", default="", help="only cases whose name contains this")
    ap.add_argument("--json", default="", help="write the full report here")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        _worker(args.worker.split(","))
        return 0
    ops = {o for o in args.ops.split(",") if o}
    if args.family:
        ops |= family_ops(args.family.split(","))
    cases = [c for c in select_cases(ops) if args.match in c.name]
    t0 = time.time()
    results = sweep(cases)
    rep = report(cases, results)
    rep["seconds"] = round(time.time() - t0, 1)
    for name, why in rep["failures"].items():
        print(f"FAIL {name}: {why}")
    for op, v in rep["by_op"].items():
        print(f"{op:24s} pass {v.get('pass', 0):3d} fail {v.get('fail', 0):3d}")
    print(f"total {rep['total']} passed {rep['passed']} (of which {rep['passed_with_frozen_inputs']} with "
          f"shape-like inputs frozen) failed {rep['failed']} in {rep['seconds']} s")
    if args.json:
        Path(args.json).write_text(json.dumps(rep, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())


# ------------------------------------------------------------------------- tests against ONNX Runtime


def make_model(nodes, inputs, outputs, initializers=(), opset: int = 18):
    """A ModelProto from node protos and (name, elem_type, shape) inputs/outputs (shape None: unknown)."""
    from onnx import helper, numpy_helper

    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        [helper.make_tensor_value_info(n, t, s) for n, t, s in outputs],
        initializer=[numpy_helper.from_array(np.asarray(v), n) for n, v in dict(initializers).items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def check_against_ort(model, feeds: dict, rtol: float = RTOL, atol: float = ATOL) -> dict:
    """Run ``model`` with ONNX Runtime and through graphopt's lowering; assert equal outputs; return ours."""
    import onnxruntime as ort

    from graphopt.backends.lowering.testing import run_lowered

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    want = dict(zip(names, sess.run(None, feeds)))
    got = run_lowered(model, feeds)
    assert set(got) == set(want), (sorted(got), sorted(want))
    for name in names:
        why = _compare(want[name], got[name], rtol, atol)
        assert why is None, f"output {name}: {why}"
    return got

"""Models with large external weights round-trip (load -> optimize -O0 -> save) in bounded memory,
with every weight byte preserved.

The model is built with onnx_ir directly: weights are streamed into the data file chunk by chunk and
referenced as ``ir.ExternalTensor``, so building it never holds the weights in memory. The round trip
runs in a child process that reports its peak RSS (``resource.getrusage``). Weights are compared
chunk-wise, tensor by tensor, without ONNX Runtime.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

COLS = 1024
CHUNK_ROWS = 4096  # 16 MiB of float32 per generated chunk


def build_external_model(directory: Path, total_bytes: int, n_tensors: int) -> tuple[Path, int]:
    """Write ``n_tensors`` float32 weights of ``total_bytes`` in all to ``weights.bin`` and a model
    using them (``y_i = Add(x, W_i)``) to ``model.onnx``; returns (model path, weight bytes)."""
    rows = total_bytes // n_tensors // (4 * COLS)
    data_path = directory / "weights.bin"
    x = ir.val("x", ir.DataType.FLOAT, ir.Shape([1, COLS]))
    nodes, outputs, initializers = [], [], []
    offset = 0
    with open(data_path, "wb") as f:
        for i in range(n_tensors):
            rng = np.random.default_rng(i)
            for start in range(0, rows, CHUNK_ROWS):
                n = min(CHUNK_ROWS, rows - start)
                f.write(rng.standard_normal((n, COLS), dtype=np.float32).tobytes())
            nbytes = rows * COLS * 4
            tensor = ir.ExternalTensor(
                "weights.bin", offset, nbytes, ir.DataType.FLOAT, shape=ir.Shape([rows, COLS]),
                name=f"W{i}", base_dir=directory,
            )
            offset += nbytes
            w = ir.val(f"W{i}", ir.DataType.FLOAT, ir.Shape([rows, COLS]), const_value=tensor)
            initializers.append(w)
            y = ir.val(f"y{i}", ir.DataType.FLOAT, ir.Shape([rows, COLS]))
            nodes.append(ir.node("Add", [x, w], outputs=[y], name=f"add{i}"))
            outputs.append(y)
    graph = ir.Graph([x], outputs, nodes=nodes, initializers=initializers, opset_imports={"": 17}, name="big")
    model = ir.Model(graph, ir_version=9, producer_name="graphopt-tests")
    path = directory / "model.onnx"
    ir.save(model, path)  # external tensors keep their location: nothing is copied
    return path, offset


_CHILD = textwrap.dedent("""
    import json, resource, sys
    import graphopt

    def peak_kib():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    baseline = peak_kib()
    model = graphopt.load(sys.argv[1])
    result = graphopt.optimize(model, opt_level=0)
    graphopt.save(result.model, sys.argv[2])
    print(json.dumps({"baseline_kib": baseline, "peak_kib": peak_kib()}))
""")


def _tensor_locations(model_path: Path) -> dict[str, tuple[Path, int, int]]:
    proto = onnx.load(str(model_path), load_external_data=False)
    out = {}
    for t in proto.graph.initializer:
        assert t.data_location == onnx.TensorProto.EXTERNAL, f"{t.name} is not external"
        info = {e.key: e.value for e in t.external_data}
        out[t.name] = (model_path.parent / info["location"], int(info.get("offset", 0)), int(info["length"]))
    return out


def _same_bytes(a: tuple[Path, int, int], b: tuple[Path, int, int], chunk: int = 1 << 24) -> bool:
    (pa, oa, la), (pb, ob, lb) = a, b
    if la != lb:
        return False
    with open(pa, "rb") as fa, open(pb, "rb") as fb:
        fa.seek(oa)
        fb.seek(ob)
        left = la
        while left:
            n = min(chunk, left)
            if fa.read(n) != fb.read(n):
                return False
            left -= n
    return True


def round_trip_and_check(tmp_path: Path, total_bytes: int, n_tensors: int) -> dict:
    src_dir, out_dir = tmp_path / "src", tmp_path / "out"
    src_dir.mkdir()
    out_dir.mkdir()
    src, weight_bytes = build_external_model(src_dir, total_bytes, n_tensors)
    src_data_size = (src_dir / "weights.bin").stat().st_size
    out = out_dir / "model.o0.onnx"
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(src), str(out)],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    before, after = _tensor_locations(src), _tensor_locations(out)
    assert set(after) == set(before)
    for name in before:
        assert _same_bytes(before[name], after[name]), f"weight {name} changed in the round trip"
    assert (src_dir / "weights.bin").stat().st_size == src_data_size
    stats.update(weight_bytes=weight_bytes,
                 peak_bytes=stats["peak_kib"] * 1024, growth_bytes=(stats["peak_kib"] - stats["baseline_kib"]) * 1024)
    print(f"\n{weight_bytes / 2**20:.0f} MiB of external weights: peak RSS {stats['peak_bytes'] / 2**20:.0f} MiB "
          f"(imports {stats['baseline_kib'] / 1024:.0f} MiB, growth {stats['growth_bytes'] / 2**20:.0f} MiB)")
    return stats


def test_external_weights_round_trip_small(tmp_path):
    stats = round_trip_and_check(tmp_path, total_bytes=48 * 2**20, n_tensors=6)
    # the interpreter and its imports are most of a small process: bound what the model adds
    assert stats["growth_bytes"] < 1.5 * stats["weight_bytes"]


@pytest.mark.slow
def test_three_gb_of_external_weights_round_trip(tmp_path):
    stats = round_trip_and_check(tmp_path, total_bytes=3 * 2**30, n_tensors=12)
    assert stats["weight_bytes"] >= 3 * 2**30 - 12 * 4 * COLS
    assert stats["peak_bytes"] < 1.5 * stats["weight_bytes"]


# --- compile and run with external weights: one copy of the weights in each process ----------------

ALIGN = 4096  # weights start on a page in the external file, as large exporters write them


def build_matmul_chain(directory: Path, layers: int, width: int) -> tuple[Path, int]:
    """``y = tanh(... tanh(x @ W0) ... @ W{layers-1})`` with ``x`` ``[1, width]`` and every ``W_i``
    ``[width, width]`` float32 (scaled 1/sqrt(width), so activations stay in range) in one external
    file ``weights.bin``, written a block of rows at a time; returns (model path, weight bytes)."""
    directory.mkdir(parents=True, exist_ok=True)
    x = ir.val("x", ir.DataType.FLOAT, ir.Shape([1, width]))
    nodes, initializers, current, offset = [], [], x, 0
    scale = np.float32(1 / np.sqrt(width))
    with open(directory / "weights.bin", "wb") as f:
        for i in range(layers):
            f.write(b"\0" * (-offset % ALIGN))
            offset += -offset % ALIGN
            rng = np.random.default_rng(100 + i)
            for start in range(0, width, CHUNK_ROWS):
                rows = min(CHUNK_ROWS, width - start)
                f.write((rng.standard_normal((rows, width), dtype=np.float32) * scale).tobytes())
            nbytes = width * width * 4
            tensor = ir.ExternalTensor("weights.bin", offset, nbytes, ir.DataType.FLOAT,
                                       shape=ir.Shape([width, width]), name=f"W{i}", base_dir=directory)
            offset += nbytes
            w = ir.val(f"W{i}", ir.DataType.FLOAT, ir.Shape([width, width]), const_value=tensor)
            initializers.append(w)
            m = ir.val(f"m{i}", ir.DataType.FLOAT, ir.Shape([1, width]))
            y = ir.val(f"y{i}", ir.DataType.FLOAT, ir.Shape([1, width]))
            nodes += [ir.node("MatMul", [current, w], outputs=[m], name=f"matmul{i}"),
                      ir.node("Tanh", [m], outputs=[y], name=f"tanh{i}")]
            current = y
    graph = ir.Graph([x], [current], nodes=nodes, initializers=initializers, opset_imports={"": 17}, name="chain")
    path = directory / "model.onnx"
    ir.save(ir.Model(graph, ir_version=9, producer_name="graphopt-tests"), path)
    return path, layers * width * width * 4


# A CLI command in a child process, which then prints its own peak RSS: the parent's RUSAGE_CHILDREN
# would be the largest of all its children so far.
_CLI_CHILD = textwrap.dedent("""
    import json, resource, sys, time
    from graphopt.front.cli import main

    start = time.perf_counter()
    code = main(sys.argv[1:])
    print(json.dumps({"code": code, "seconds": time.perf_counter() - start,
                      "peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
""")

# ONNX Runtime on the same inputs, in its own process (it holds its own copy of the weights).
_ORT_CHILD = textwrap.dedent("""
    import sys, time
    import numpy as np
    import onnxruntime as ort

    sess = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
    with np.load(sys.argv[2]) as data:
        feeds = {k: data[k] for k in data.files}
    outputs = sess.run(None, feeds)
    times = []
    for _ in range(int(sys.argv[4])):
        start = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - start)
    np.savez(sys.argv[3], **{o.name: v for o, v in zip(sess.get_outputs(), outputs)})
    print(min(times) * 1000 if times else 0.0)
""")


def cli_in_child(*argv) -> dict:
    proc = subprocess.run([sys.executable, "-c", _CLI_CHILD, *map(str, argv)], capture_output=True, text=True,
                          timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    stats = json.loads(lines[-1])
    assert stats["code"] == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    stats["stdout"] = "\n".join(lines[:-1])
    return stats


def ort_in_child(model: Path, inputs: Path, out: Path, repeat: int = 0) -> float:
    proc = subprocess.run([sys.executable, "-c", _ORT_CHILD, str(model), str(inputs), str(out), str(repeat)],
                          capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return float(proc.stdout.strip().splitlines()[-1])


def compile_run_against_ort(tmp_path: Path, model: str | Path, feeds: dict, weight_bytes: int,
                            rtol: float = 1e-3, atol: float = 1e-4) -> dict:
    """Compile (``graphopt compile``) and run (``graphopt run``) ``model`` in two child processes, each
    reporting its peak RSS, and compare the outputs with ONNX Runtime's."""
    bundle, inputs = tmp_path / "bundle", tmp_path / "in.npz"
    np.savez(inputs, **feeds)
    compiled = cli_in_child("compile", model, "-o", bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["params"]["file"] == "params.npz", "weights over 100 MB must stay out of the library"
    ran = cli_in_child("run", bundle, "--inputs", inputs, "-o", tmp_path / "out.npz")
    report = ran["stdout"].strip().splitlines()[-1]
    assert "memory-mapped, 0 MiB copied" in report, report
    source = manifest["source"]["path"]
    ort_in_child(Path(source), inputs, tmp_path / "ort.npz")
    with np.load(tmp_path / "out.npz") as got, np.load(tmp_path / "ort.npz") as want:
        assert set(got.files) == set(want.files)
        for name in want.files:
            np.testing.assert_allclose(got[name], want[name], rtol=rtol, atol=atol, err_msg=name)
    stats = {"weight_bytes": weight_bytes, "compile_s": compiled["seconds"], "compile_peak": compiled["peak_bytes"],
             "run_peak": ran["peak_bytes"], "run_report": report}
    gib = 2**30
    print(f"\n{weight_bytes / gib:.2f} GiB of weights: compile {compiled['seconds']:.0f} s, peak RSS "
          f"{compiled['peak_bytes'] / gib:.2f} GiB ({compiled['peak_bytes'] / weight_bytes:.2f}x); run peak RSS "
          f"{ran['peak_bytes'] / gib:.2f} GiB ({ran['peak_bytes'] / weight_bytes:.2f}x); {report}")
    return stats


@pytest.mark.slow
def test_two_gb_matmul_chain_compiles_and_runs_with_one_copy(tmp_path):
    """2.2 GB of external weights: compile and run each hold at most 1.3x the weights, outputs match ORT."""
    model, weight_bytes = build_matmul_chain(tmp_path / "src", layers=33, width=4096)
    assert weight_bytes > 2.1e9
    x = np.random.default_rng(0).standard_normal((1, 4096), dtype=np.float32)
    stats = compile_run_against_ort(tmp_path, model, {"x": x}, weight_bytes)
    assert stats["compile_peak"] <= 1.3 * weight_bytes
    assert stats["run_peak"] <= 1.3 * weight_bytes


@pytest.mark.slow
def test_gpt2_large_compiles_and_runs_with_one_copy(tmp_path):
    """gen:gpt2-large (774M parameters, 3.1 GB of external weights), one decode step at past=127 (the
    catalogue's shapes): compile and run each hold at most 1.3x the weights; logits and the cache match
    ORT. Prints the figures, and graphopt's latency against ORT's (each in its own process)."""
    from graphopt.core import io
    from graphopt.models import resolve
    from graphopt.models.inputs import random_inputs

    source = resolve("gen:gpt2-large")
    weight_bytes = io.weight_bytes(io.load(source, check=False))
    assert weight_bytes > 3e9
    feeds = random_inputs("gen:gpt2-large")
    stats = compile_run_against_ort(tmp_path, "gen:gpt2-large", feeds, weight_bytes, rtol=1e-3, atol=1e-3)
    assert stats["compile_peak"] <= 1.3 * weight_bytes
    assert stats["run_peak"] <= 1.3 * weight_bytes
    cli_in_child("bench", tmp_path / "bundle", "--against", "none", "--repeat", "5", "--warmup", "1",
                 "--json", tmp_path / "bench.json")
    (row,) = json.loads((tmp_path / "bench.json").read_text())
    assert row["weights_copied_mb"] == 0 and row["peak_rss_mb"] * 2**20 <= 1.3 * weight_bytes
    ort_ms = ort_in_child(source, tmp_path / "in.npz", tmp_path / "ort2.npz", repeat=5)
    print(f"gen:gpt2-large decode step: graphopt min {row['graphopt']['min_ms']:.1f} ms (bench: load {row['load_s']} s, "
          f"peak RSS {row['peak_rss_mb']:.0f} MiB), ORT min {ort_ms:.1f} ms, ratio {row['graphopt']['min_ms'] / ort_ms:.2f}")

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

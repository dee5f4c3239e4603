"""A symbolic sequence length through compile: ``--input-shape x:1,seq --max seq=N``, one bundle for
every length up to N, checked against ONNX Runtime; lengths over the bound refused with one line."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.front import api
from graphopt.core.errors import GraphoptError, ShapeError, UsageError

F = TensorProto.FLOAT
BOUND = 64

# Real text for the sentence encoder: prefixes of it give sentences of every length up to 256 tokens.
TEXT = (
    "The Amazon rainforest covers much of the Amazon basin of South America. The basin spans seven million "
    "square kilometres, of which five and a half million are covered by the rainforest. The region includes "
    "territory belonging to nine nations, and the majority of the forest lies within Brazil, followed by Peru "
    "and Colombia. States or departments in four nations contain Amazonas in their names. The rainforest "
    "represents over half of the planet's remaining rainforests and comprises the largest and most biodiverse "
    "tract of tropical rainforest in the world, with an estimated three hundred and ninety billion individual "
    "trees divided into sixteen thousand species. Deforestation is the conversion of forested areas to "
    "non-forested areas; the main sources of deforestation in the Amazon are human settlement and development "
    "of the land. Scientists warn that further loss of forest could push the region past a tipping point, "
    "after which large parts would turn into dry savanna, releasing vast amounts of carbon into the atmosphere "
    "and changing rainfall patterns far beyond South America."
)


def _attention_model() -> onnx.ModelProto:
    """x [1, seq, 16], mask [1, seq]: a weight matmul (packed path), masked self-attention, sum over seq."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((16, 32)).astype(np.float32) * 0.3, "w")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Transpose", ["h"], ["ht"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["h", "ht"], ["s"]),
        helper.make_node("Unsqueeze", ["mask", "ax1"], ["m3"]),
        helper.make_node("Add", ["s", "m3"], ["sm"]),
        helper.make_node("Softmax", ["sm"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "h"], ["c"]),
        helper.make_node("ReduceSum", ["c", "ax1"], ["y"], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "attn",
        [helper.make_tensor_value_info("x", F, [1, "seq", 16]), helper.make_tensor_value_info("mask", F, [1, "seq"])],
        [helper.make_tensor_value_info("y", F, [1, 32])],
        [w, numpy_helper.from_array(np.array([1], np.int64), "ax1")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def attn_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("sym") / "attn.onnx"
    onnx.save(_attention_model(), str(path))
    return path


@pytest.fixture(scope="module")
def attn_bundle(attn_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("symb") / "bundle"
    compiled = api.compile(str(attn_path), input_shapes=["x:1,seq,16", "mask:1,seq"], dim_bounds={"seq": BOUND},
                           output=out)
    return compiled, out


def _feeds(n: int, rng) -> dict[str, np.ndarray]:
    mask = np.zeros((1, n), np.float32)
    mask[:, max(1, n - n // 4):] = -1e4  # the last quarter masked out
    return {"x": rng.standard_normal((1, n, 16)).astype(np.float32), "mask": mask}


def test_one_bundle_serves_every_length(attn_path, attn_bundle):
    compiled, out = attn_bundle
    assert compiled.inputs == [("x", (1, "seq", 16), "float32"), ("mask", (1, "seq"), "float32")]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dim_bounds"] == {"seq": BOUND}
    assert manifest["inputs"][0]["shape"] == [1, "seq", 16]
    sess = ort.InferenceSession(str(attn_path), providers=["CPUExecutionProvider"])
    bundle = api.load_bundle(out)
    rng = np.random.default_rng(1)
    for n in (1, 7, 8, 9, 33, BOUND):
        feeds = _feeds(n, rng)
        want = sess.run(None, feeds)[0]
        np.testing.assert_allclose(compiled(**feeds)["y"], want, rtol=1e-4, atol=1e-5, err_msg=f"seq={n}")
        np.testing.assert_allclose(bundle(**feeds)["y"], want, rtol=1e-4, atol=1e-5, err_msg=f"seq={n}")


def test_lengths_the_bundle_refuses(attn_bundle, tmp_path):
    compiled, out = attn_bundle
    rng = np.random.default_rng(2)
    with pytest.raises(GraphoptError, match=r"input 'x': dim 1 \(seq\) is 65, the bundle serves seq from 0 to 64"):
        compiled(**_feeds(BOUND + 1, rng))
    feeds = _feeds(10, rng)
    feeds["mask"] = feeds["mask"][:, :9]
    with pytest.raises(GraphoptError, match=r"input 'mask': dim 1 \(seq\) is 9, but input 'x' has seq=10"):
        compiled(**feeds)
    inputs = tmp_path / "in.npz"
    np.savez(inputs, **_feeds(BOUND + 1, rng))
    proc = subprocess.run([sys.executable, "-m", "graphopt.front.cli", "run", str(out), "--inputs", str(inputs),
                           "-o", str(tmp_path / "o.npz")], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "dim 1 (seq) is 65" in lines[0] and "0 to 64" in lines[0]


def test_bad_symbolic_options(attn_path):
    with pytest.raises(ShapeError, match=r"'x' dim 1 \(seq\).*--max seq=512"):
        api.compile(str(attn_path), input_shapes=["x:1,seq,16", "mask:1,seq"])
    with pytest.raises(UsageError, match="--max len: no input has a dim named 'len'"):
        api.compile(str(attn_path), input_shapes=["x:1,seq,16", "mask:1,seq"], dim_bounds={"seq": 8, "len": 8})
    with pytest.raises(ShapeError, match="dim 2 is declared 16, it cannot be the symbolic 'd'"):
        api.load(str(attn_path), input_shapes=["x:1,seq,d"])
    with pytest.raises(ShapeError, match="'seq', already fixed to"):
        api.load(str(attn_path), input_shapes=["x:1,seq,16", "mask:1,len"])
    from graphopt.front.commands.compile_cmd import parse_dim_bounds

    assert parse_dim_bounds(["seq=256", "batch=8"]) == {"seq": 256, "batch": 8}
    for bad in (["seq"], ["seq=0"], ["1x=3"], ["seq=2", "seq=3"]):
        with pytest.raises(UsageError, match="--max"):
            parse_dim_bounds(bad)


def test_cli_compile_max(attn_path, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "graphopt.front.cli", "compile", str(attn_path), "--input-shape", "x:1,seq,16",
                           "--input-shape", "mask:1,seq", "--max", "seq=abc", "-o", str(tmp_path / "b")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "--max seq=abc" in proc.stderr


def test_minilm_symbolic_matches_ort_on_real_sentences(tmp_path):
    """all-MiniLM-L6-v2, one bundle with a symbolic sequence length (bound 256), real sentences of
    5 to 256 tokens: cosine >= 0.9999 against ONNX Runtime on the same graph."""
    from graphopt import models
    from graphopt.models import minilm

    tok = minilm.tokenizer()
    compiled = api.compile("minilm:l6", input_shapes=["input_ids:1,seq", "attention_mask:1,seq"],
                           dim_bounds={"seq": minilm.MAX_SEQ})
    sess = ort.InferenceSession(str(models.resolve("minilm:l6")), providers=["CPUExecutionProvider"])
    words = (TEXT + " " + TEXT).split()
    seen = set()
    for n_words in (3, 10, 25, 60, 100, 170, len(words)):
        ids, mask = tok.batch([" ".join(words[:n_words])])
        seen.add(ids.shape[1])
        want = sess.run(None, {"input_ids": ids, "attention_mask": mask})[0][0]
        got = compiled(input_ids=ids, attention_mask=mask)["sentence_embedding"][0]
        cos = float(got @ want / np.linalg.norm(got) / np.linalg.norm(want))
        assert cos >= 0.9999, (ids.shape, cos)
    assert min(seen) <= 5 + 2 and max(seen) == minilm.MAX_SEQ and len(seen) == 7


def test_large_at_the_bound_small_at_run_time_runs_serial():
    """A nest that is parallel at the bound also gets a serial version, taken when the run-time work is
    small (a thread-pool launch costs more than a decode step's bias or GELU)."""
    from tvm import te, tirx

    from graphopt.backends.schedules.features import CPUFeatures
    from graphopt.backends.schedules.symbolic import PARALLEL_MIN, schedule_function

    seq = tirx.Var("seq", "int64")
    x = te.placeholder((1, seq, 3072), name="x")
    y = te.compute(x.shape, lambda *i: te.max(x(*i), tirx.const(0.0, "float32")), name="relu")
    func = te.create_prim_func([x, y])
    scheduled, _ = schedule_function(func, CPUFeatures(vector_bits=512, cores=2), {"seq": 512})
    body = scheduled.body.block.body
    assert isinstance(body, tirx.IfThenElse) and f">= T.int64({PARALLEL_MIN})" in str(body.condition)
    assert "T.parallel" in tvm_script(body.then_case) and "T.parallel" not in tvm_script(body.else_case)
    small, _ = schedule_function(func, CPUFeatures(vector_bits=512, cores=2), {"seq": 8})  # small at the bound
    assert not isinstance(small.body.block.body, tirx.IfThenElse)


def tvm_script(stmt) -> str:
    import tvm

    return tvm.tirx.PrimFunc([], stmt).script()


def test_serial_and_parallel_versions_of_one_nest_build(tmp_path):
    # a reshape and a transpose over a cache dim bounded at 2048: large at the bound (a parallel version)
    # and small at run time (a serial one), both in one function; they shared the loop variables of the
    # function they were scheduled from, and the simplifier failed binding one variable to two ranges
    nodes = [helper.make_node("Reshape", ["a", "shape"], ["r"]), helper.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 1]),
             helper.make_node("Relu", ["t"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("a", F, [1, 4, "past", 64])],
                              [helper.make_tensor_value_info("y", F, [4, 64, "past"])],
                              [numpy_helper.from_array(np.array([4, -1, 64], np.int64), "shape")])
    path = tmp_path / "cache_transpose.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    compiled = api.compile(str(path), input_shapes=["a:1,4,past,64"], dim_bounds={"past": 2048})
    rng = np.random.default_rng(0)
    for n in (3, 2000):
        a = rng.standard_normal((1, 4, n, 64)).astype(np.float32)
        np.testing.assert_array_equal(compiled(a=a)["y"], np.maximum(a.reshape(4, n, 64).transpose(0, 2, 1), 0))

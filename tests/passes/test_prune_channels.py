"""Channel pruning: dependency groups through BN, depthwise convs, residual Adds, Concat, Slice, Resize,
Flatten and Gemm, checked in ONNX Runtime. Channels made dead on purpose (zero weights and bias) are
the ones removed, and then the pruned model computes exactly what the original did."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.compression.compress import copy_model, ort_run
from graphopt.core.errors import UsageError
from graphopt.passes.channel_groups import ChannelGroups
from graphopt.passes.prune_channels import PruneChannelsPass
from graphopt.core.summary import summarize
from graphopt.core.verify import verify

DEAD = {"A": [1, 5], "B": [0, 7], "C": [2]}  # group -> channels with zero weights and bias


def prune_model(seed: int = 0, dead: bool = True) -> ir.Model:
    """x[1,4,8,8] -> c1 -> BN -> Relu -> dw -> c2 (+ c3(x) residual) -> Relu -> Concat(., relu(c1)) ->
    {c4, Slice[0:12] -> c5} -> Add -> Resize x2 -> Mul [1,6,1,1] -> GAP -> Flatten -> Gemm -> y[1,5].
    Groups: A = c1 (through BN, Relu, dw), B = c2 + c3 (tied by the Add), C = c4 + c5 (tied)."""
    rng = np.random.default_rng(seed)

    def w(*shape):
        return (rng.standard_normal(shape) * 0.5).astype(np.float32)

    t = {"W1": w(8, 4, 3, 3), "b1": w(8), "Wd": w(8, 1, 3, 3), "bd": w(8), "W2": w(8, 8, 1, 1), "b2": w(8),
         "W3": w(8, 4, 1, 1), "b3": w(8), "W4": w(6, 16, 1, 1), "b4": w(6), "W5": w(6, 12, 1, 1), "b5": w(6),
         "Wg": w(6, 5), "bg": w(5), "s": w(1, 6, 1, 1),
         "bn_scale": np.abs(w(8)) + 0.5, "bn_bias": w(8), "bn_mean": w(8), "bn_var": np.abs(w(8)) + 0.5,
         "scales": np.array([1, 1, 2, 2], np.float32), "starts": np.array([0], np.int64),
         "ends": np.array([12], np.int64), "axes": np.array([1], np.int64)}
    if dead:
        for name in ("W1", "b1", "Wd", "bd", "bn_bias", "bn_mean"):
            t[name][DEAD["A"]] = 0
        for name in ("W2", "b2", "W3", "b3"):
            t[name][DEAD["B"]] = 0
        for name in ("W4", "b4", "W5", "b5"):
            t[name][DEAD["C"]] = 0
    n = helper.make_node
    nodes = [
        n("Conv", ["x", "W1", "b1"], ["c1"], name="c1", pads=[1, 1, 1, 1]),
        n("BatchNormalization", ["c1", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["bn"], name="bn"),
        n("Relu", ["bn"], ["a1"], name="relu1"),
        n("Conv", ["a1", "Wd", "bd"], ["dw"], name="dw", group=8, pads=[1, 1, 1, 1]),
        n("Conv", ["dw", "W2", "b2"], ["y2"], name="c2"),
        n("Conv", ["x", "W3", "b3"], ["y3"], name="c3"),
        n("Add", ["y2", "y3"], ["res"], name="add"),
        n("Relu", ["res"], ["r"], name="relu2"),
        n("Concat", ["r", "a1"], ["cat"], name="cat", axis=1),
        n("Conv", ["cat", "W4", "b4"], ["y4"], name="c4"),
        n("Slice", ["cat", "starts", "ends", "axes"], ["sl"], name="slice"),
        n("Conv", ["sl", "W5", "b5"], ["y5"], name="c5"),
        n("Add", ["y4", "y5"], ["s45"], name="add2"),
        n("Resize", ["s45", "", "scales"], ["up"], name="resize", mode="nearest"),
        n("Mul", ["up", "s"], ["m"], name="mul"),
        n("GlobalAveragePool", ["m"], ["gap"], name="gap"),
        n("Flatten", ["gap"], ["flat"], name="flatten"),
        n("Gemm", ["flat", "Wg", "bg"], ["y"], name="gemm"),
    ]
    graph = helper.make_graph(nodes, "groups", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])],
                              [numpy_helper.from_array(a, k) for k, a in t.items()])
    proto = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]),
                                              strict_mode=True)
    return ir.serde.deserialize_model(proto)


def feeds(count: int, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, 4, 8, 8)).astype(np.float32)} for _ in range(count)]


def _weight(model: ir.Model, node: str, index: int = 1) -> np.ndarray:
    return next(n for n in model.graph if n.name == node).inputs[index].const_value.numpy()


def test_groups_follow_bn_depthwise_residual_concat_slice_and_outputs():
    cg = ChannelGroups(prune_model())
    groups = {tuple(g.layers): g for g in cg.roots()}
    assert set(groups) == {("c1",), ("c2", "c3"), ("c4", "c5"), ("gemm",)}
    assert groups[("gemm",)].blocked == ["y is a graph output"]
    assert not any(g.blocked for k, g in groups.items() if k != ("gemm",))
    cat = next(v for v in cg.layouts if v.name == "cat")
    a, b = cg.find(cg.groups[0].gid), cg.find(1)
    assert [cg.find(s[0]) for s in cg.layouts[cat].segments] == [b, a]  # r (c2+c3) then a1 (c1)


def test_dead_channels_are_the_ones_removed_and_outputs_are_unchanged():
    model = prune_model()
    original = copy_model(model)
    p = PruneChannelsPass(0.25, multiple=1, data=feeds(3))
    assert p(model).modified
    verify(model)
    keep = {g: [c for c in range(8 if g != "C" else 6) if c not in d] for g, d in DEAD.items()}
    assert p.kept["c1"]["out"].tolist() == keep["A"]
    assert p.kept["c2"]["out"].tolist() == p.kept["c3"]["out"].tolist() == keep["B"]
    assert p.kept["c4"]["out"].tolist() == p.kept["c5"]["out"].tolist() == keep["C"]
    # Concat offsets: c4 reads B's kept channels, then A's kept ones shifted by 8
    assert p.kept["c4"]["in"].tolist() == keep["B"] + [8 + c for c in keep["A"]]
    assert _weight(model, "c4").shape == (5, 12, 1, 1)
    # Slice[0:12] of the concat: B's 6 kept channels and A's channels 0..3 minus the dead 1 -> 9
    assert _weight(model, "c5").shape == (5, 9, 1, 1)
    dw = next(n for n in model.graph if n.name == "dw")
    assert dw.attributes.get_int("group") == 6 and _weight(model, "dw").shape == (6, 1, 3, 3)
    assert _weight(model, "bn").shape == (6,) and _weight(model, "mul").shape == (1, 5, 1, 1)
    assert _weight(model, "gemm").shape == (5, 5)
    before, after = ort_run(original), ort_run(model)
    for f in feeds(4, seed=9):
        np.testing.assert_allclose(after(f)["y"], before(f)["y"], rtol=1e-4, atol=1e-5)
    assert summarize(model)["flops"] < 0.75 * summarize(original)["flops"]


def test_weight_norm_importance_prunes_tied_producers_together():
    model = prune_model(seed=3, dead=False)
    p = PruneChannelsPass(0.5, multiple=2)
    p(model)
    verify(model)
    assert len(p.kept["c1"]["out"]) == 4 and len(p.kept["c2"]["out"]) == 4
    np.testing.assert_array_equal(p.kept["c2"]["out"], p.kept["c3"]["out"])
    out = ort_run(model)(feeds(1)[0])["y"]
    assert out.shape == (1, 5) and np.isfinite(out).all()
    rows = {r["group"]: r for r in p.rows}
    assert rows["gemm"]["kept"] == 5 and rows["gemm"]["blocked"] == "y is a graph output"
    assert rows["c1"]["channels"] == 8 and rows["c1"]["kept"] == 4


def test_exclusions_and_layer_ratios():
    model = prune_model(dead=False)
    p = PruneChannelsPass(0.5, multiple=1, exclude=["c3"], overrides={"c4": 0.0, "c1": 0.25})
    p(model)
    assert "out" not in p.kept["c2"] and "c3" not in p.kept  # c3 excluded: its tied group B stays whole
    assert len(p.kept["c1"]["out"]) == 6 and "out" not in p.kept.get("c4", {})
    rows = {r["group"]: r for r in p.rows}
    assert rows["c2"]["blocked"] == "c3 excluded" and rows["c4"]["kept"] == 6
    ort_run(model)(feeds(1)[0])


def test_unknown_reshape_blocks_its_group():
    w = np.ones((4, 2, 1, 1), np.float32)
    text = """<ir_version: 8, opset_import: ["" : 13]>
    g (float[1, 2, 3, 3] x) => (float[1, 3] y) {
        c = Conv <group: int = 1> (x, w)
        r = Reshape (c, shape)
        y = MatMul (r, wm)
    }"""
    proto = onnx.parser.parse_model(text)
    proto.graph.initializer.extend([numpy_helper.from_array(w, "w"),
                                    numpy_helper.from_array(np.array([1, 36], np.int64), "shape"),
                                    numpy_helper.from_array(np.ones((36, 3), np.float32), "wm")])
    model = ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(proto))
    p = PruneChannelsPass(0.5)
    assert not p(model).modified
    assert p.rows[0]["blocked"].startswith("Reshape")


def test_kept_widths_stay_multiples_of_the_vector_block():
    p = PruneChannelsPass(0.2)  # multiple 16: graphopt's blocked layout on AVX-512
    assert [p._keep_count(n, 0.2) for n in (240, 480, 128, 64, 60, 10)] == [192, 384, 112, 64, 48, 8]
    assert PruneChannelsPass(0.2, multiple=8)._keep_count(128, 0.2) == 104
    from graphopt.compression.pruning import parse_spec

    assert parse_spec("channels:0.2:m8:l1").multiple == 8 and parse_spec("channels:0.2").multiple == 16
    with pytest.raises(UsageError, match="unknown option 'm0'"):
        parse_spec("channels:0.2:m0")


@pytest.mark.parametrize("kwargs, message", [
    ({"ratio": 1.0}, "outside [0, 1)"),
    ({"ratio": -0.1}, "outside [0, 1)"),
    ({"ratio": 0.3, "overrides": {"nosuch": 0.1}}, "layer nosuch is not a node"),
    ({"ratio": 0.3, "exclude": ["nosuch"]}, "--exclude nosuch"),
    ({"ratio": 0.3, "norm": "l3"}, "norm"),
])
def test_bad_input(kwargs, message):
    model = prune_model()
    with pytest.raises(UsageError, match=message.replace("[", r"\[").replace(")", r"\)")):
        PruneChannelsPass(kwargs.pop("ratio"), **kwargs)(model)


@pytest.mark.slow
def test_light_resnet50_at_30_percent():
    """Residual groups: a valid model whose FLOPs drop at least 25% (about a minute on 2 cores)."""
    from graphopt.front import api

    res = api.optimize("light:resnet50")
    model = res.model
    before = summarize(model)["flops"]
    x = {"gpu_0/data_0": np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)}
    p = PruneChannelsPass(0.3)
    p(model)
    verify(model)
    assert summarize(model)["flops"] <= 0.75 * before
    out = next(iter(ort_run(model)(x).values()))
    assert out.shape == (1, 1000) and np.isfinite(out).all()
    assert any(len(r["layers"]) > 2 and r["kept"] < r["channels"] for r in p.rows)  # residual groups pruned

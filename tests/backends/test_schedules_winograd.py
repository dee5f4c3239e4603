"""Winograd 3x3 convs: numerics against ONNX Runtime, which convs the rewrite takes, and the compile hook."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.backends.schedules import winograd
from graphopt.backends.schedules.testing import Built, host_target, ort_run

# (N, C, H, W, O, pad, epilogue, tile)
CASES = [
    (1, 32, 14, 14, 32, 1, "relu", 2),
    (1, 32, 14, 14, 32, 1, "relu", 4),
    (2, 32, 17, 18, 48, 0, "bias", 4),  # batch 2, odd sizes (15x16 out), no padding: partial edge tiles
    (1, 40, 16, 19, 32, 1, "none", 2),  # channels not a lane multiple, no bias
    (1, 32, 15, 15, 40, 1, "relu", 4),  # output channels not a lane multiple: scalar output transform
]


def conv_model(convs, n, c, h, w, rng, epi="relu"):
    """A chain of Conv (+ bias, + relu); ``convs``: [(O, kernel, stride, pad, dilation, groups)]."""
    nodes, inits, cur, ch = [], [], "x", c
    for i, (o, k, s, p, d, g) in enumerate(convs):
        wt = (rng.standard_normal((o, ch // g, k, k)) / np.sqrt(k * k * ch // g)).astype(np.float32)
        inits.append(numpy_helper.from_array(wt, f"w{i}"))
        ins = [cur, f"w{i}"]
        if epi != "none":
            inits.append(numpy_helper.from_array(rng.standard_normal(o).astype(np.float32), f"b{i}"))
            ins.append(f"b{i}")
        nodes.append(helper.make_node("Conv", ins, [f"c{i}"], pads=[p] * 4, strides=[s, s], dilations=[d, d], group=g))
        cur, ch = f"c{i}", o
        if epi == "relu":
            nodes.append(helper.make_node("Relu", [cur], [f"r{i}"]))
            cur = f"r{i}"
    nodes.append(helper.make_node("Identity", [cur], ["y"]))
    graph = helper.make_graph(nodes, "convs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, c, h, w])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def build_winograd(model, shapes, tile=None):
    """TVM's ONNX importer → the Winograd rewrite → the compile pipeline's Relax passes → default schedules."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    from graphopt.backends.schedules import apply_default_schedules
    from graphopt.backends.schedules.features import as_target

    target = host_target()
    mod = winograd.rewrite_winograd(from_onnx(model, shapes, keep_params_in_input=False), tile, force=True)
    seq = tvm.transform.Sequential([
        relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant(),
        relax.transform.FuseOps(), relax.transform.FuseTIR(), relax.transform.DeadCodeElimination(),
    ])
    with as_target(target):
        mod = seq(mod)
    report: dict = {}
    mod = apply_default_schedules(mod, target, report=report)
    ex = tvm.compile(mod, target=as_target(target))
    return Built(relax.VirtualMachine(ex, tvm.cpu()), report, list(shapes))


@pytest.mark.parametrize("case", CASES, ids=[f"wino{i}" for i in range(len(CASES))])
def test_winograd_matches_ort(case):
    n, c, h, w, o, pad, epi, tile = case
    rng = np.random.default_rng(0)
    model = conv_model([(o, 3, 1, pad, 1, 1)], n, c, h, w, rng, epi)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    built = build_winograd(model, {"x": x.shape}, tile)
    assert "winograd" in built.report.values(), built.report
    got, want = built({"x": x})[0], ort_run(model, {"x": x})[0]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
    # the precision Winograd gives up stays far inside that tolerance on unit-scale data
    assert np.abs(got - want).max() < 2e-4


def test_weight_transform_is_exact_in_float64():
    """Aᵀ[(G w Gᵀ) ⊙ (Bᵀ d B)]A equals the 3x3 correlation of one tile, for both tile sizes."""
    rng = np.random.default_rng(1)
    for m in (2, 4):
        a, b, _ = winograd.transform_matrices(m)
        w = rng.standard_normal((1, 1, 3, 3))
        d = rng.standard_normal((m + 2, m + 2))
        u = winograd.weight_transform(w, m)[:, :, 0, 0]
        y = a.T @ (u * (b.T @ d @ b)) @ a
        direct = np.array([[np.sum(d[i:i + 3, j:j + 3] * w[0, 0]) for j in range(m)] for i in range(m)])
        np.testing.assert_allclose(y, direct, rtol=1e-9, atol=1e-9)


def _rewritten(model, shape):
    """The Winograd functions the default rewrite (cost model on) makes of ``model``."""
    from tvm.relax.frontend.onnx import from_onnx

    mod = winograd.rewrite_winograd(from_onnx(model, {"x": shape}, keep_params_in_input=False))
    return sorted(gv.name_hint for gv, _ in mod.functions_items() if gv.name_hint.startswith("winograd"))


def test_rewrite_takes_only_eligible_convs(monkeypatch):
    monkeypatch.delenv("GRAPHOPT_WINOGRAD", raising=False)
    rng = np.random.default_rng(2)
    shape = (1, 64, 28, 28)
    ineligible = [
        (64, 3, 2, 1, 1, 1),  # stride 2
        (64, 1, 1, 0, 1, 1),  # 1x1
        (64, 3, 1, 1, 1, 2),  # grouped
        (64, 3, 1, 2, 2, 1),  # dilated
        (32, 3, 1, 1, 1, 1),  # too few output channels (cost model)
    ]
    for conv in ineligible:
        assert _rewritten(conv_model([conv], *shape, rng), shape) == [], conv
    # 64 channels on a 7x7 map: too little work for the transforms to pay (cost model)
    assert _rewritten(conv_model([(64, 3, 1, 1, 1, 1)], 1, 64, 7, 7, rng), (1, 64, 7, 7)) == []
    two = conv_model([(64, 3, 1, 1, 1, 1), (64, 1, 1, 0, 1, 1), (96, 3, 1, 1, 1, 1)], *shape, rng)
    assert len(_rewritten(two, shape)) == 2


def test_weight_is_transformed_at_compile_time():
    """The call passes the transformed constant [a, a, C, O]; no weight work is left in the module."""
    from tvm.relax.frontend.onnx import from_onnx

    rng = np.random.default_rng(3)
    model = conv_model([(48, 3, 1, 1, 1, 1)], 1, 32, 16, 16, rng, "none")
    mod = winograd.rewrite_winograd(from_onnx(model, {"x": (1, 32, 16, 16)}, keep_params_in_input=False), 4, force=True)
    import tvm
    from tvm import relax

    assert "R.nn.conv2d" not in mod["main"].script()
    consts = []
    relax.analysis.post_order_visit(
        mod["main"], lambda e: consts.append(e.value.numpy()) if isinstance(e, tvm.ir.expr.Constant) and hasattr(e.value, "numpy") else None)
    packed = [c for c in consts if c.shape == (6, 6, 32, 48)]
    assert len(packed) == 1
    w = numpy_helper.to_array(model.graph.initializer[0])
    np.testing.assert_allclose(packed[0], winograd.weight_transform(w, 4), rtol=1e-6)


def test_disabled_by_environment(monkeypatch):
    rng = np.random.default_rng(4)
    model = conv_model([(64, 3, 1, 1, 1, 1)], 1, 64, 28, 28, rng)
    from tvm.relax.frontend.onnx import from_onnx

    mod = from_onnx(model, {"x": (1, 64, 28, 28)}, keep_params_in_input=False)
    monkeypatch.setenv("GRAPHOPT_WINOGRAD", "0")
    assert winograd.rewrite_winograd(mod) is mod
    monkeypatch.setenv("GRAPHOPT_WINOGRAD", "1")
    assert winograd.rewrite_winograd(mod) is not mod


def test_compile_model_uses_winograd_and_matches_ort(monkeypatch):
    """Through graphopt's own compile pipeline (the hook in _relax_passes): a 2-conv block with relu."""
    from graphopt.backends.compile import compile_model
    from graphopt.backends.schedules import last_report

    monkeypatch.delenv("GRAPHOPT_WINOGRAD", raising=False)
    monkeypatch.setenv("GRAPHOPT_AMX", "0")  # on AMX hosts these convs would run on AMX tiles instead
    rng = np.random.default_rng(5)
    model = conv_model([(64, 3, 1, 1, 1, 1), (64, 3, 1, 1, 1, 1)], 1, 64, 28, 28, rng)
    x = rng.standard_normal((1, 64, 28, 28)).astype(np.float32)
    compiled = compile_model(ir.serde.deserialize_model(model), target=host_target())
    # both convs call one Winograd function (same shapes, weights passed as constants), on blocked
    # data: the rest is the layout's conversion at the model's input and output
    report = last_report()
    assert [r for r in report.values() if r != "generic"] == ["winograd"], report
    assert all("layout_transform" in f for f, r in report.items() if r == "generic"), report
    got = compiled(x=x)
    np.testing.assert_allclose(next(iter(got.values())), ort_run(model, {"x": x})[0], rtol=1e-3, atol=1e-3)

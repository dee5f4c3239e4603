"""FuseAttentionPass: Softmax(Q·Kᵀ·scale [+ mask])·V becomes one Attention node."""

from __future__ import annotations

import onnx_ir as ir
import pytest

from graph_testing import apply_and_compare, model_from_text, ops
from graphopt.passes.fuse_attention import FuseAttentionPass

SHAPES = "float[1,2,6,4] q, float[1,2,6,4] k, float[1,2,6,4] v, float[1,1,6,6] mask"


def _model(opset: int, *, scale_on="scores", mask=True, perm="[0, 1, 3, 2]", k_shape=None):
    k_decl = k_shape or "float[1,2,6,4] k"
    qk = {"q": "qs = Mul(q, c) \n s0 = MatMul(qs, kt)",
          "both": "qs = Mul(q, c) \n ks = Mul(kt, c) \n s0 = MatMul(qs, ks)",  # PyTorch's sqrt(scale) on each
          "scores": "s = MatMul(q, kt) \n s0 = Div(s, c)"}[scale_on]
    add = "s1 = Add(s0, mask)" if mask else ""
    body = f"""kt = Transpose<perm = {perm}>(k) \n c = Constant<value = float {{2.0}}>() \n {qk} \n {add}
               p = Softmax<axis = -1>({"s1" if mask else "s0"}) \n o = MatMul(p, v) \n y = Relu(o)"""
    inputs = SHAPES.replace("float[1,2,6,4] k", k_decl)
    return model_from_text(f'<ir_version: 10, opset_import: ["" : {opset}]>\n'
                           f"g ({inputs}) => (float[1,2,6,4] y) {{ {body} }}")


@pytest.mark.parametrize("scale_on", ["q", "both", "scores"])
@pytest.mark.parametrize("mask", [True, False])
def test_graphopt_attention(scale_on, mask):
    model = _model(17, scale_on=scale_on, mask=mask)
    result = apply_and_compare(FuseAttentionPass(target_runtime="graphopt"), model, rtol=1e-5, atol=1e-5)
    assert result.modified
    counts = ops(result.model)
    assert counts["Attention"] == 1 and counts["Softmax"] == 0 and counts["MatMul"] == 0
    node = next(n for n in result.model.graph if n.op_type == "Attention")
    assert node.domain == "graphopt"
    assert abs(node.attributes.get_float("scale") - {"q": 2.0, "both": 4.0, "scores": 0.5}[scale_on]) < 1e-7
    assert len(node.inputs) == (4 if mask else 3)
    assert counts["Add"] == 0 and counts["Mul"] + counts["Div"] == 0


def test_other_key_layout_keeps_one_transpose():
    # K stored as [1, 6, 2, 4] (seq before heads): Kᵀ = Transpose(k, [0, 2, 3, 1])
    model = _model(17, perm="[0, 2, 3, 1]", k_shape="float[1,6,2,4] k")
    result = apply_and_compare(FuseAttentionPass(target_runtime="graphopt"), model, rtol=1e-5, atol=1e-5)
    assert result.modified and ops(result.model)["Transpose"] == 1 and ops(result.model)["Attention"] == 1


def test_standard_attention_at_opset_23():
    model = _model(23)
    result = apply_and_compare(FuseAttentionPass(), model, rtol=1e-4, atol=1e-5)
    assert result.modified
    assert next(n for n in result.model.graph if n.op_type == "Attention").domain == ""


def test_onnx_target_below_23_does_not_fire():
    model = _model(17)
    result = FuseAttentionPass()(model)
    assert not result.modified and ops(result.model)["Softmax"] == 1


def test_softmax_over_another_axis_does_not_fire():
    model = _model(17)
    softmax = next(n for n in model.graph if n.op_type == "Softmax")
    softmax.attributes["axis"] = ir.AttrInt64("axis", 2)
    result = apply_and_compare(FuseAttentionPass(target_runtime="graphopt"), model)
    assert not result.modified and ops(result.model)["Softmax"] == 1


def test_probabilities_used_twice_do_not_fire():
    model = model_from_text(
        '<ir_version: 10, opset_import: ["" : 17]>\n'
        f"""g ({SHAPES}) => (float[1,2,6,4] y, float[1,2,6,1] extra) {{
            kt = Transpose<perm = [0, 1, 3, 2]>(k) \n s = MatMul(q, kt) \n p = Softmax<axis = -1>(s)
            y = MatMul(p, v) \n r = Constant<value = int64[1] {{3}}>() \n extra = ReduceSum(p, r)
        }}""")
    result = apply_and_compare(FuseAttentionPass(target_runtime="graphopt"), model)
    assert not result.modified and ops(result.model)["MatMul"] == 2


def test_rank_3_at_opset_23_uses_graphopt_domain_or_nothing():
    text = ('<ir_version: 10, opset_import: ["" : 23]>\n'
            """g (float[2,6,4] q, float[2,6,4] k, float[2,6,4] v) => (float[2,6,4] y) {
                kt = Transpose<perm = [0, 2, 1]>(k) \n s = MatMul(q, kt) \n p = Softmax<axis = -1>(s)
                y = MatMul(p, v)
            }""")
    assert not FuseAttentionPass()(model_from_text(text)).modified
    result = apply_and_compare(FuseAttentionPass(target_runtime="graphopt"), model_from_text(text))
    assert result.modified
    assert next(n for n in result.model.graph if n.op_type == "Attention").domain == "graphopt"


def test_float32_only_leaves_other_dtypes():
    model = _model(17)
    assert FuseAttentionPass(target_runtime="graphopt", float32_only=True)(model).modified
    half = model_from_text('<ir_version: 10, opset_import: ["" : 17]>\n'
                           "g (float16[1,2,6,4] q, float16[1,2,6,4] k, float16[1,2,6,4] v) => (float16[1,2,6,4] y) {"
                           " kt = Transpose<perm = [0, 1, 3, 2]>(k) \n s = MatMul(q, kt) \n p = Softmax<axis = -1>(s)"
                           " \n y = MatMul(p, v) }")
    assert not FuseAttentionPass(target_runtime="graphopt", float32_only=True)(half).modified
    assert FuseAttentionPass(target_runtime="graphopt")(half).modified

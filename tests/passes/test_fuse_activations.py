"""FuseActivationsPass: Gelu (erf, tanh), HardSwish and Mish chains become one op, exactly."""

from __future__ import annotations

import numpy as np
import pytest

from graph_testing import apply_and_compare, model_from_text, ops
from graphopt.passes.fuse_activations import FuseActivationsPass
from graphopt.passes.graphopt_ops import expand_graphopt_ops

C = "Constant<value = float {{{}}}>()"
CHAINS = {
    "gelu_erf": ("Gelu", f"""s = {C.format(1.4142135)} \n d = Div(x, s) \n e = Erf(d) \n one = {C.format(1.0)}
                  p = Add(e, one) \n m = Mul(x, p) \n h = {C.format(0.5)} \n a = Mul(m, h)"""),
    "gelu_erf_half_first": ("Gelu", f"""s = {C.format(0.70710677)} \n d = Mul(x, s) \n e = Erf(d) \n one = {C.format(1.0)}
                  p = Add(one, e) \n h = {C.format(0.5)} \n xh = Mul(h, x) \n a = Mul(xh, p)"""),
    "gelu_tanh": ("Gelu", f"""three = {C.format(3.0)} \n c = Pow(x, three) \n k = {C.format(0.044715)} \n kc = Mul(c, k)
                  i = Add(x, kc) \n r = {C.format(0.7978846)} \n ri = Mul(r, i) \n t = Tanh(ri) \n one = {C.format(1.0)}
                  p = Add(t, one) \n m = Mul(x, p) \n two = {C.format(2.0)} \n a = Div(m, two)"""),
    "hardswish_clip": ("HardSwish", f"""three = {C.format(3.0)} \n s = Add(x, three) \n lo = {C.format(0.0)} \n hi = {C.format(6.0)}
                  c = Clip(s, lo, hi) \n m = Mul(x, c) \n six = {C.format(6.0)} \n a = Div(m, six)"""),
    "hardswish_hsig": ("HardSwish", "h = HardSigmoid<alpha = 0.16666667, beta = 0.5>(x) \n a = Mul(h, x)"),
    "mish": ("Mish", "s = Softplus(x) \n t = Tanh(s) \n a = Mul(x, t)"),
}


def _model(body: str, opset: int):
    return model_from_text(f'<ir_version: 10, opset_import: ["" : {opset}]>\n'
                           f"g (float[2,3,16] x) => (float[2,3,16] y) {{ {body} \n y = Neg(a) }}")


@pytest.mark.parametrize("name", sorted(CHAINS))
def test_fuses_to_standard_op_upgrading_the_opset(name):
    op, body = CHAINS[name]
    model = _model(body, 13)
    result = apply_and_compare(FuseActivationsPass(), model, rtol=1e-5, atol=1e-5)
    assert result.modified
    assert dict(ops(result.model)) == {op: 1, "Neg": 1}
    node = next(n for n in result.model.graph if n.op_type == op)
    assert node.domain == ""
    assert result.model.opset_imports[""] >= {"Gelu": 20, "HardSwish": 14, "Mish": 18}[op]
    if op == "Gelu":
        expected = "tanh" if "tanh" in name else "none"
        assert node.attributes.get_string("approximate", "none") == expected


@pytest.mark.parametrize("name", ["gelu_erf", "gelu_tanh", "hardswish_clip", "mish"])
def test_graphopt_domain_when_target_is_graphopt(name):
    op, body = CHAINS[name]
    model = _model(body, 13)
    result = apply_and_compare(FuseActivationsPass(target_runtime="graphopt"), model, rtol=1e-5, atol=1e-5)
    fused = [n for n in result.model.graph if n.op_type == op]
    needs_graphopt = {"Gelu": 20, "HardSwish": 14, "Mish": 18}[op] > 13
    assert len(fused) == 1 and fused[0].domain == ("graphopt" if needs_graphopt else "")
    if needs_graphopt:
        assert result.model.opset_imports["graphopt"] == 1
        assert result.model.opset_imports[""] == 13
        assert not any(n.domain == "graphopt" for n in expand_graphopt_ops(result.model).graph)


def test_no_fusion_for_onnx_when_the_opset_cannot_be_raised():
    # opset 10 models are not upgraded: with target_runtime="onnx" the chain must stay
    op, body = CHAINS["mish"]
    model = _model(body, 10)
    result = FuseActivationsPass()(model)
    assert not result.modified and ops(result.model)["Softplus"] == 1


NEGATIVE = {
    "wrong constant": f"""three = {C.format(3.0)} \n s = Add(x, three) \n lo = {C.format(0.0)} \n hi = {C.format(6.0)}
                  c = Clip(s, lo, hi) \n m = Mul(x, c) \n five = {C.format(5.0)} \n a = Div(m, five)""",
    "hard sigmoid of paddle SE": "h = HardSigmoid<alpha = 0.2, beta = 0.5>(x) \n a = Mul(h, x)",
    "intermediate used twice": "s = Softplus(x) \n t = Tanh(s) \n m = Mul(x, t) \n a = Add(m, t)",
    "different x": "s = Softplus(x) \n t = Tanh(s) \n r = Relu(x) \n a = Mul(r, t)",
}


@pytest.mark.parametrize("case", sorted(NEGATIVE))
def test_does_not_fire(case):
    model = _model(NEGATIVE[case], 20)
    before = ops(model)
    result = apply_and_compare(FuseActivationsPass(), model)
    assert not result.modified and ops(result.model) == before


def test_exact_on_wide_range():
    op, body = CHAINS["gelu_erf"]
    model = _model(body, 20)
    x = np.linspace(-12, 12, 96, dtype=np.float32).reshape(2, 3, 16)
    result = apply_and_compare(FuseActivationsPass(), model, feeds={"x": x}, rtol=1e-5, atol=1e-6)
    assert result.modified


def test_inside_a_model_function_the_function_opset_decides():
    text = """<ir_version: 10, opset_import: ["" : 18, "local" : 1]>
    g (float[2,3,16] x) => (float[2,3,16] y) { y = local.MishF(x) }
    <domain: "local", opset_import: ["" : 17]>
    MishF (a) => (b) { s = Softplus(a) \n t = Tanh(s) \n b = Mul(a, t) }"""
    plain = model_from_text(text)
    assert not FuseActivationsPass()(plain).modified  # Mish needs opset 18 inside the function too
    model = model_from_text(text)
    result = apply_and_compare(FuseActivationsPass(target_runtime="graphopt"), model)
    function = next(iter(result.model.functions.values()))
    assert [n.op_type for n in function] == ["Mish"] and function.opset_imports["graphopt"] == 1

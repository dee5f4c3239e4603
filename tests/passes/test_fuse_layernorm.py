"""FuseLayerNormPass: the decomposed layer norm becomes LayerNormalization, exactly."""

from __future__ import annotations

import numpy as np
import pytest

from graph_testing import RNG, apply_and_compare, model_from_text, ops
from graphopt.passes.fuse_layernorm import FuseLayerNormPass


def _model(opset: int, *, square="Pow", affine=True, axes="[-1]", mean2_axes=None, shape="2,5,8"):
    sq = "two = Constant<value = float {2.0}>() \n q = Pow(d, two)" if square == "Pow" else "q = Mul(d, d)"
    tail = "n1 = Mul(n, g) \n a = Add(n1, b)" if affine else "a = Identity(n)"
    m2 = mean2_axes or axes
    body = f"""m = ReduceMean<axes = {axes}>(x) \n d = Sub(x, m) \n {sq}
               v = ReduceMean<axes = {m2}>(q) \n e = Constant<value = float {{1e-5}}>() \n ve = Add(v, e)
               s = Sqrt(ve) \n n = Div(d, s) \n {tail} \n y = Relu(a)"""
    return model_from_text(
        f'<ir_version: 10, opset_import: ["" : {opset}]>\n'
        f"g (float[{shape}] x) => (float[{shape}] y) {{ {body} }}",
        g=RNG.standard_normal(8).astype(np.float32), b=RNG.standard_normal((1, 1, 8)).astype(np.float32),
    )


@pytest.mark.parametrize("square", ["Pow", "Mul"])
@pytest.mark.parametrize("affine", [True, False])
def test_fuses_and_raises_opset_12_to_17(square, affine):
    model = _model(12, square=square, affine=affine)
    result = apply_and_compare(FuseLayerNormPass(), model, rtol=1e-5, atol=1e-5)
    assert result.modified
    expected = {"LayerNormalization": 1, "Relu": 1}
    assert dict(ops(result.model)) == (expected if affine else {**expected, "Identity": 1})
    assert result.model.opset_imports[""] == 17
    ln = next(n for n in result.model.graph if n.op_type == "LayerNormalization")
    assert ln.attributes.get_int("axis") == 2
    assert abs(ln.attributes.get_float("epsilon") - 1e-5) < 1e-12


def test_two_trailing_axes():
    model = _model(13, axes="[1, 2]", affine=False)
    result = apply_and_compare(FuseLayerNormPass(), model, rtol=1e-5, atol=1e-5)
    assert result.modified
    assert next(n for n in result.model.graph if n.op_type == "LayerNormalization").attributes.get_int("axis") == 1


def test_graphopt_domain_below_17():
    model = _model(12)
    result = apply_and_compare(FuseLayerNormPass(target_runtime="graphopt"), model, rtol=1e-5, atol=1e-5)
    ln = next(n for n in result.model.graph if n.op_type == "LayerNormalization")
    assert ln.domain == "graphopt" and result.model.opset_imports[""] == 12


@pytest.mark.parametrize("kwargs", [{"axes": "[1]"}, {"axes": "[-1]", "mean2_axes": "[1, 2]"}])
def test_wrong_axes_do_not_fire(kwargs):
    model = _model(17, **kwargs)
    before = ops(model)
    result = apply_and_compare(FuseLayerNormPass(), model)
    assert not result.modified and ops(result.model) == before


def test_onnx_target_below_11_is_left_alone():
    model = _model(10)
    result = FuseLayerNormPass()(model)
    assert not result.modified and ops(result.model)["ReduceMean"] == 2

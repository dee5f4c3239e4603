"""FuseConvActivationPass: Conv[+Add]+activation and Gemm+activation become ONNX Runtime's FusedConv/FusedGemm."""

from __future__ import annotations

import numpy as np
import pytest
from graph_testing import RNG, apply_and_compare, model_from_text, ops
import graphopt
from graphopt.core.errors import UsageError
from graphopt.passes.fuse_conv_activation import FuseConvActivationPass

W = {"w": RNG.standard_normal((8, 3, 3, 3)).astype(np.float32), "b": RNG.standard_normal(8).astype(np.float32),
     "w2": RNG.standard_normal((8, 8, 3, 3)).astype(np.float32),
     "g": RNG.standard_normal((10, 8 * 4 * 4)).astype(np.float32), "gb": RNG.standard_normal(10).astype(np.float32)}
HEAD = '<ir_version: 8, opset_import: ["" : 13]>\n'


def _ort():
    return FuseConvActivationPass(target_runtime="ort")


def _model(body: str, out: str = "float[1,8,8,8] y", inputs: str = "float[1,3,8,8] x", **extra):
    return model_from_text(HEAD + f"g ({inputs}) => ({out}) {{ {body} }}", **{**W, **extra})


def test_alexnet_like_chain():
    body = """c = Conv<pads = [1, 1, 1, 1]>(x, w, b) \n r = Relu(c) \n p = MaxPool<kernel_shape = [2, 2], strides = [2, 2]>(r)
              s = Constant<value = int64[2] {1, 128}>() \n f = Reshape(p, s)
              m = Gemm<transB = 1>(f, g, gb) \n y = Relu(m)"""
    model = _model(body, out="float[1,10] y")
    result = apply_and_compare(_ort(), model)
    assert result.modified
    assert dict(ops(result.model)) == {"FusedConv": 1, "MaxPool": 1, "Constant": 1, "Reshape": 1, "FusedGemm": 1}
    gemm = next(n for n in result.model.graph if n.op_type == "FusedGemm")
    assert gemm.domain == "com.microsoft" and gemm.attributes["transB"].value == 1
    assert result.model.opset_imports["com.microsoft"] == 1


@pytest.mark.parametrize("add", ["Add(c2, x1)", "Add(x1, c2)", "Sum(c2, x1)"])
def test_residual_add_then_relu(add):
    body = f"""c1 = Conv<pads = [1, 1, 1, 1]>(x, w, b) \n x1 = Relu(c1)
               c2 = Conv<pads = [1, 1, 1, 1]>(x1, w2) \n s = {add} \n y = Relu(s)"""
    result = apply_and_compare(_ort(), _model(body))
    assert dict(ops(result.model)) == {"FusedConv": 2}
    second = [n for n in result.model.graph][1]
    assert len(second.inputs) == 4 and second.inputs[2] is None  # no bias, Z as the fourth input


@pytest.mark.parametrize("act,params", [
    ("LeakyRelu<alpha = 0.2>(c)", [0.2]),
    ("HardSigmoid<alpha = 0.3, beta = 0.6>(c)", [0.3, 0.6]),
    ("Clip(c, lo, hi)", [0.0, 6.0]),
    ("Sigmoid(c)", None),
])
def test_activation_parameters(act, params):
    body = f"""lo = Constant<value = float {{0.0}}>() \n hi = Constant<value = float {{6.0}}>()
               c = Conv<pads = [1, 1, 1, 1]>(x, w, b) \n y = {act}"""
    result = apply_and_compare(_ort(), _model(body))
    node = next(n for n in result.model.graph if n.op_type == "FusedConv")
    got = node.attributes.get("activation_params")
    assert (list(got.value) if got else None) == (pytest.approx(params) if params else None)


def test_activation_after_a_concat_of_convs():
    body = """c1 = Conv<pads = [1, 1, 1, 1]>(x, w, b) \n c2 = Conv(x, w1) \n k = Concat<axis = 1>(c1, c2)
              y = Relu(k)"""
    model = _model(body, out="float[1,16,8,8] y", w1=RNG.standard_normal((8, 3, 1, 1)).astype(np.float32))
    result = apply_and_compare(_ort(), model)
    assert dict(ops(result.model)) == {"FusedConv": 2, "Concat": 1}
    assert result.model.graph.outputs[0].producer().op_type == "Concat"


NEGATIVE = {
    "concat of one conv twice": "c1 = Conv<pads = [1, 1, 1, 1]>(x, w, b) \n cc = Concat<axis = 1>(c1, c1) \n y = Relu(cc)",
    "conv output used twice": "c = Conv<pads = [1, 1, 1, 1]>(x, w, b) \n r = Relu(c) \n y = Add(r, c)",
    "clip bound not constant": "c = Conv<pads = [1, 1, 1, 1]>(x, w, b) \n lo = ReduceMin<keepdims = 0>(x) \n y = Clip(c, lo)",
    "activation FusedConv lacks": "c = Conv<pads = [1, 1, 1, 1]>(x, w, b) \n y = Softsign(c)",
    "Z broadcast, not the conv's shape": "c = Conv<pads = [1, 1, 1, 1]>(x, w, b) \n z = Relu(zz) \n s = Add(c, z) \n y = Relu(s)",
    "constant Z (a bias)": "c = Conv<pads = [1, 1, 1, 1]>(x, w, b) \n s = Add(c, k) \n y = Relu(s)",
}


@pytest.mark.parametrize("case", sorted(NEGATIVE))
def test_does_not_fire(case):
    inputs = "float[1,3,8,8] x, float[1,8,1,1] zz" if "broadcast" in case else "float[1,3,8,8] x"
    out = "float[1,16,8,8] y" if "concat" in case else "float[1,8,8,8] y"
    model = _model(NEGATIVE[case], inputs=inputs, out=out, k=RNG.standard_normal((1, 8, 8, 8)).astype(np.float32))
    before = dict(ops(model))
    result = apply_and_compare(_ort(), model)
    assert not result.modified and dict(ops(result.model)) == before


def test_gemm_with_hard_sigmoid_stays():
    body = "m = Gemm<transB = 1>(f, g, gb) \n y = HardSigmoid(m)"
    model = _model(body, out="float[1,10] y", inputs="float[1,128] f")
    assert not _ort()(model).modified


@pytest.mark.parametrize("runtime", ["onnx", "graphopt"])
def test_only_for_onnx_runtime(runtime):
    model = _model("c = Conv<pads = [1, 1, 1, 1]>(x, w, b) \n y = Relu(c)")
    result = FuseConvActivationPass(target_runtime=runtime)(model)
    assert not result.modified and ops(result.model)["Relu"] == 1


def test_bad_target_runtime():
    with pytest.raises(UsageError, match="pass 'fuse_conv_activation': target_runtime must be one of onnx, ort, graphopt"):
        FuseConvActivationPass(target_runtime="tensorrt")
    model = _model("c = Conv<pads = [1, 1, 1, 1]>(x, w, b) \n y = Relu(c)")
    with pytest.raises(UsageError, match="optimize: target_runtime must be one of onnx, ort, graphopt, got 'tensorrt'"):
        graphopt.optimize(model, opt_level=3, target_runtime="tensorrt")

"""FuseBiasPass: Conv+Add(per-channel constant) into the Conv bias; rank-2 MatMul+Add into Gemm."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from graph_testing import RNG, apply_and_compare, model_from_text, ops
from graphopt.passes.fuse_bias import FuseBiasPass

HEADER = '<ir_version: 10, opset_import: ["" : 17]>\n'


def _w(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("bias_shape", [(4, 1, 1), (1, 4, 1, 1), (1,)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_conv_add_folds_into_bias(bias_shape, with_bias):
    conv_inputs = "x, w, b" if with_bias else "x, w"
    model = model_from_text(
        HEADER + f"""g (float[1,3,8,8] x) => (float[1,4,8,8] y) {{
            c = Conv<pads = [1, 1, 1, 1]>({conv_inputs})
            y = Add(c, k)
        }}""",
        w=_w(4, 3, 3, 3), b=_w(4), k=_w(*bias_shape),
    )
    result = apply_and_compare(FuseBiasPass(), model, rtol=1e-5, atol=1e-5)
    assert result.modified
    assert dict(ops(result.model)) == {"Conv": 1}
    assert result.model.graph.outputs[0].name == "y"


def test_conv_add_that_is_not_per_channel_stays():
    model = model_from_text(
        HEADER + """g (float[1,3,8,8] x) => (float[1,4,8,8] y) {
            c = Conv<pads = [1, 1, 1, 1]>(x, w)
            y = Add(c, k)
        }""",
        w=_w(4, 3, 3, 3), k=_w(8),  # broadcasts along W, not per channel
    )
    p = FuseBiasPass()
    result = apply_and_compare(p, model)
    assert not result.modified and ops(result.model)["Add"] == 1
    assert "not one value per output channel" in p.skipped[0]


def test_matmul_add_becomes_gemm_for_rank_2():
    model = model_from_text(HEADER + "g (float[5,6] x) => (float[5,3] y) { m = MatMul(x, w) \n y = Add(b, m) }",
                            w=_w(6, 3), b=_w(3))
    result = apply_and_compare(FuseBiasPass(), model)
    assert result.modified and dict(ops(result.model)) == {"Gemm": 1}


def test_matmul_add_rank_3_or_nonconstant_weight_stays():
    model = model_from_text(
        HEADER + """g (float[2,5,6] x, float[5,6] x2, float[6,3] wv) => (float[2,5,3] y, float[5,3] z) {
            m = MatMul(x, w)
            y = Add(m, b)
            m2 = MatMul(x2, wv)
            z = Add(m2, b)
        }""",
        w=_w(6, 3), b=_w(3),
    )
    result = apply_and_compare(FuseBiasPass(), model)
    assert not result.modified and ops(result.model)["MatMul"] == 2 and ops(result.model)["Gemm"] == 0


def test_conv_output_used_twice_stays():
    model = model_from_text(
        HEADER + """g (float[1,3,8,8] x) => (float[1,4,8,8] y) {
            c = Conv<pads = [1, 1, 1, 1]>(x, w)
            a = Add(c, k)
            y = Mul(a, c)
        }""",
        w=_w(4, 3, 3, 3), k=_w(4, 1, 1),
    )
    result = apply_and_compare(FuseBiasPass(), model)
    assert not result.modified


def test_conv_mul_add_chain_folds_into_the_conv():
    model = model_from_text(
        HEADER + """g (float[1,3,8,8] x) => (float[1,4,8,8] y) {
            c = Conv<pads = [1, 1, 1, 1]>(x, w, b)
            m = Mul(c, s)
            a = Add(m, k)
            y = Relu(a)
        }""",
        w=_w(4, 3, 3, 3), b=_w(4), s=_w(1, 4, 1, 1), k=_w(4, 1, 1),
    )
    result = apply_and_compare(FuseBiasPass(), model, rtol=1e-5, atol=1e-5)
    assert result.modified and dict(ops(result.model)) == {"Conv": 1, "Relu": 1}


def test_batchnorm_mul_add_fold_into_its_parameters():
    model = model_from_text(
        HEADER + """g (float[1,4,5,5] x) => (float[1,4,5,5] y) {
            n = BatchNormalization(x, g, b, m, v)
            s1 = Mul(n, s)
            a = Add(s1, k)
            y = Relu(a)
        }""",
        g=_w(4), b=_w(4), m=_w(4), v=np.abs(_w(4)) + 0.5, s=_w(4, 1, 1), k=_w(1, 4, 1, 1),
    )
    result = apply_and_compare(FuseBiasPass(), model, rtol=1e-5, atol=1e-5)
    assert result.modified and dict(ops(result.model)) == {"BatchNormalization": 1, "Relu": 1}


def test_mul_that_is_not_per_channel_stays():
    model = model_from_text(
        HEADER + """g (float[1,4,5,5] x) => (float[1,4,5,5] y) {
            n = BatchNormalization(x, g, b, m, v)
            y = Mul(n, s)
        }""",
        g=_w(4), b=_w(4), m=_w(4), v=np.abs(_w(4)) + 0.5, s=_w(5, 1),
    )
    result = apply_and_compare(FuseBiasPass(), model)
    assert not result.modified and ops(result.model)["Mul"] == 1


def test_weight_made_by_constant_of_shape_counts_as_constant():
    # old exports (the onnx "light" models) build weights with ConstantOfShape of a constant shape
    model = model_from_text(
        HEADER + """g (float[1,3,8,8] x) => (float[1,4,8,8] y) {
            shape = Constant<value = int64[4] {4, 3, 3, 3}>()
            w = ConstantOfShape<value = float[1] {0.25}>(shape)
            c = Conv<pads = [1, 1, 1, 1]>(x, w)
            y = Mul(c, s)
        }""",
        s=_w(1, 4, 1, 1),
    )
    result = apply_and_compare(FuseBiasPass(), model)
    assert result.modified and dict(ops(result.model)) == {"Conv": 1}


def test_minus_one_dims_from_exporters_make_the_rule_not_fire():
    """rapidocr:cls records -1 for its dynamic batch: a MatMul input [-1, 6] is not static, no crash."""
    model = model_from_text(HEADER + "g (float[5,6] x) => (float[5,3] y) { m = MatMul(x, w) \n y = Add(m, b) }",
                            w=_w(6, 3), b=_w(3))
    model.graph.inputs[0].shape = ir.Shape([-1, 6])
    p = FuseBiasPass()
    result = p(model)
    assert not result.modified and ops(result.model)["MatMul"] == 1
    assert "static rank-2" in p.skipped[0]

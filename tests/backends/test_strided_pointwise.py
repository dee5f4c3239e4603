"""Strided 1x1 convs as a strided slice and a stride-1 conv (``strided_pointwise.py``): the rewrite on
Relax, its reasons for leaving a conv alone, the slice kept in the blocked layout, and numerics
against ONNX Runtime through the whole compile pipeline."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm import relax

from graphopt.backends.compile import compile_model
from graphopt.backends.constants import fold_layout_of_constants
from graphopt.backends.schedules import blocked
from graphopt.backends.schedules.strided_pointwise import rewrite_strided_pointwise, why_not
from graphopt.backends.schedules.testing import ort_run

_SLICE = tvm.ir.Op.get("relax.strided_slice")
_CONV = tvm.ir.Op.get("relax.nn.conv2d")


def _model(xs, o, k=1, strides=(2, 2), pads=(0, 0, 0, 0), before=0, seed=0):
    """``before`` > 0: a 3x3 conv of that many channels first (a chain the blocked layout takes)."""
    rng = np.random.default_rng(seed)
    inits, nodes, x, c = [], [], "x", xs[1]
    if before:
        inits.append(numpy_helper.from_array(rng.standard_normal((before, c, 3, 3)).astype(np.float32) / 8, "w0"))
        nodes += [helper.make_node("Conv", ["x", "w0"], ["h"], pads=[1] * 4), helper.make_node("Relu", ["h"], ["h1"])]
        x, c = "h1", before
    inits += [numpy_helper.from_array(rng.standard_normal((o, c, k, k)).astype(np.float32) / 8, "w"),
              numpy_helper.from_array(rng.standard_normal(o).astype(np.float32), "b")]
    nodes.append(helper.make_node("Conv", [x, "w", "b"], ["y"], strides=list(strides), pads=list(pads)))
    graph = helper.make_graph(nodes, "sp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(xs))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _relax(model):
    from graphopt.backends.lowering import lower

    return lower(ir.from_proto(model)).mod


def _calls(mod, op):
    found = []
    relax.analysis.post_order_visit(mod["main"], lambda e: found.append(e) if isinstance(e, relax.Call)
                                    and isinstance(e.op, tvm.ir.Op) and e.op.same_as(op) else None)
    return found


@pytest.mark.parametrize("xs,strides", [((2, 8, 9, 7), (2, 2)), ((1, 6, 14, 14), (2, 1))])
def test_strided_pointwise_conv_takes_its_pixels_first(xs, strides):
    """Odd sizes included: the slice keeps pixel 0, s, 2s, ... as the strided conv reads them."""
    model = _model(xs, 12, strides=strides)
    mod = rewrite_strided_pointwise(_relax(model))
    assert len(_calls(mod, _SLICE)) == 1
    assert [int(s) for s in _calls(mod, _CONV)[0].attrs.strides] == [1, 1]
    x = np.random.default_rng(1).standard_normal(xs).astype(np.float32)
    got = compile_model(ir.from_proto(model))(x=x)["y"]
    np.testing.assert_allclose(got, ort_run(model, {"x": x})[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("k,strides,pads,reason", [
    (1, (1, 1), (0, 0, 0, 0), "stride 1"),
    (1, (2, 2), (1, 1, 1, 1), "padded"),
    (3, (2, 2), (0, 0, 0, 0), "kernel is not 1x1"),
])
def test_why_not_names_the_reason(k, strides, pads, reason):
    mod = _relax(_model((1, 8, 10, 10), 8, k=k, strides=strides, pads=pads))
    (conv,) = _calls(mod, _CONV)
    assert why_not(conv) == reason
    assert not _calls(rewrite_strided_pointwise(mod), _SLICE)


def test_slice_stays_in_the_blocked_layout():
    """Between two blocked convs the slice reads and writes NCHW16c: no conversion to NCHW and back."""
    model = _model((1, 16, 12, 10), 32, before=32, seed=2)
    mod = rewrite_strided_pointwise(fold_layout_of_constants(blocked.to_blocked_layout(_relax(model), 16, min_convs=1)))
    (sliced,) = _calls(mod, _SLICE)
    assert [int(d) for d in sliced.ty.shape] == [1, 2, 6, 5, 16]
    ranks = [len(c.ty.shape) for c in _calls(mod, tvm.ir.Op.get("relax.layout_transform"))]
    assert sorted(r for r in ranks if r != 6) == [4, 5]  # the output's and the input's (6-D: weight parameters)
    x = np.random.default_rng(3).standard_normal((1, 16, 12, 10)).astype(np.float32)
    got = compile_model(ir.from_proto(model))(x=x)["y"]
    np.testing.assert_allclose(got, ort_run(model, {"x": x})[0], rtol=1e-4, atol=1e-4)

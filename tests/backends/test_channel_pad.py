"""Zero output channels up to the channel block (``channel_pad.py``): the rewrite, its reasons for
leaving a conv alone, and a model whose classifier conv (1000 channels) no longer keeps it NCHW,
against ONNX Runtime through the whole compile pipeline."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm import relax

from graphopt.backends.compile import compile_model
from graphopt.backends.schedules import blocked, last_report
from graphopt.backends.schedules.channel_pad import pad_output_channels, why_not
from graphopt.backends.schedules.testing import ort_run

_CONV = tvm.ir.Op.get("relax.nn.conv2d")


def _model(c, outs, seed=0):
    """A 3x3 conv of ``c`` channels, then 1x1 convs to each of ``outs`` channels in a chain, relu each."""
    rng = np.random.default_rng(seed)
    inits, nodes, x = [], [], "x"
    for i, (ci, o, k) in enumerate(zip([c, c, *outs], [c, *outs], [3, *[1] * len(outs)])):
        inits += [numpy_helper.from_array((rng.standard_normal((o, ci, k, k)) / np.sqrt(ci * k * k)).astype(np.float32), f"w{i}"),
                  numpy_helper.from_array(rng.standard_normal(o).astype(np.float32), f"b{i}")]
        nodes += [helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], pads=[k // 2] * 4),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
        x = f"r{i}"
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["y"]))
    graph = helper.make_graph(nodes, "pad", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 9, 7])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _relax(model):
    from graphopt.backends.compile import _bind_params
    from graphopt.backends.lowering import lower

    return _bind_params(lower(ir.from_proto(model)), embed=True)[0]


def _convs(mod):
    return blocked._convs(mod)


def test_output_channels_pad_to_the_multiple_and_the_real_ones_are_sliced():
    mod = pad_output_channels(_relax(_model(64, [1000])), 32)
    assert sorted(int(c.args[1].ty.shape[0]) for c in _convs(mod)) == [64, 1024]
    assert "R.strided_slice(" in mod["main"].script(show_meta=False)


@pytest.mark.parametrize("outs,reason", [
    ([64], "64 output channels are a multiple of 32 already"),
    ([48], "48 output channels pad to a multiple of 32 with too many zeros"),
    ([40, 1000], "40 input channels are not a multiple of 32: the conv is not blocked either way"),
])
def test_why_not_names_the_reason(outs, reason):
    mod = _relax(_model(32, outs))
    conv = next(c for c in _convs(mod) if int(c.args[1].ty.shape[0]) == outs[-1])
    assert why_not(conv, _bound(mod, conv.args[1]), 32) == reason
    assert sorted(int(c.args[1].ty.shape[0]) for c in _convs(pad_output_channels(mod, 32))) == \
        sorted(int(c.args[1].ty.shape[0]) for c in _convs(mod))


def _bound(mod, var):
    """The constant ``var`` is bound to in ``mod``'s main function (weights are bound constants)."""
    found = {}
    relax.analysis.post_order_visit(mod["main"], lambda e: found.update({e.var: e.value})
                                    if isinstance(e, relax.VarBinding) else None)
    return found.get(var, var)


def test_classifier_conv_no_longer_keeps_the_model_nchw():
    model = _model(64, [64, 1000], seed=1)
    x = np.random.default_rng(2).standard_normal((1, 64, 9, 7)).astype(np.float32)
    got = compile_model(ir.serde.deserialize_model(model))(x=x)["y"]
    rules = last_report()
    assert "conv2d" not in rules.values(), rules  # every conv blocked (or AMX)
    assert any("strided_slice" in name for name in rules), rules
    np.testing.assert_allclose(got, ort_run(model, {"x": x})[0], rtol=1e-4, atol=1e-4)

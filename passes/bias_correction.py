"""Bias correction for a QDQ model: remove the mean error that weight quantization adds to each
layer's output, measured on calibration data.

For every quantized layer (Conv, ConvTranspose, Gemm with an int32 bias behind a DequantizeLinear)
a float "shadow" of the layer reads the same dequantized input with the original float weight and
bias. One pass over the data gives, per output channel, the mean of ``y_int8 - y_shadow``: the
layer's own error (upstream errors are in both). The bias becomes ``b - mean error``, re-quantized
to int32 with its own scale. Layers without a quantized bias are left alone.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphopt.passes import quant_utils as qu
from graphopt.passes.rewrite_utils import const_array

CHANNEL_AXIS = {"Conv": 1, "ConvTranspose": 1, "Gemm": -1}


def _int32_bias(node: ir.Node) -> ir.Node | None:
    """The DequantizeLinear that gives ``node`` its int32 bias, or None."""
    if len(node.inputs) < 3 or node.inputs[2] is None:
        return None
    dq = node.inputs[2].producer()
    if dq is None or dq.op_type != "DequantizeLinear" or dq.inputs[0].dtype != ir.DataType.INT32:
        return None
    return dq


class BiasCorrectionPass(ir.passes.InPlacePass):
    """Shift each quantized layer's int32 bias by its mean output error on the calibration data."""

    def __init__(self, float_model: ir.Model, data, *, show: bool = False):
        super().__init__()
        self.float_layers = {n.name: n for n in float_model.graph if n.op_type in CHANNEL_AXIS and n.name}
        self.data = data
        self.show = show
        self.corrections: dict[str, float] = {}  # layer -> largest |shift| relative to its bias scale

    def _targets(self, model: ir.Model) -> list[tuple[ir.Node, ir.Node, ir.Node]]:
        out = []
        for node in model.graph:
            f = self.float_layers.get(node.name)
            dq = _int32_bias(node) if f is not None and node.op_type == f.op_type else None
            if dq is not None and const_array(f.inputs[1]) is not None and const_array(f.inputs[2]) is not None:
                out.append((node, f, dq))
        return out

    def _with_shadows(self, model: ir.Model, targets) -> tuple[ir.Model, list[tuple[str, str]]]:
        """A copy of ``model`` where each target layer has a float twin; returns (copy, [(y, twin y)])."""
        copy = ir.serde.deserialize_model(ir.serde.serialize_model(model))
        nodes = {n.name: n for n in copy.graph}
        pairs = []
        for node, f, _ in targets:
            q = nodes[node.name]
            consts = []
            for i, suffix in ((1, "w"), (2, "b")):
                arr = const_array(f.inputs[i])
                v = ir.Value(name=f"{node.name}__shadow_{suffix}", const_value=ir.tensor(arr),
                             shape=ir.Shape(arr.shape), type=ir.TensorType(ir.DataType.FLOAT))
                copy.graph.register_initializer(v)
                consts.append(v)
            twin = ir.node(q.op_type, [q.inputs[0], *consts], {a.name: a for a in q.attributes.values()},
                           name=f"{node.name}__shadow")
            twin.outputs[0].name = f"{node.name}__shadow_out"
            twin.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
            copy.graph.insert_after(q, twin)
            pairs.append((q.outputs[0].name, twin.outputs[0].name))
        return copy, pairs

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from graphopt.compression.calibration import run_outputs

        targets = self._targets(model)
        if not targets:
            return ir.passes.PassResult(model, modified=False)
        shadowed, pairs = self._with_shadows(model, targets)
        sums: list[np.ndarray | None] = [None] * len(pairs)
        counts = [0] * len(pairs)
        names = [n for pair in pairs for n in pair]
        for values in run_outputs(shadowed, names, self.data, show=self.show, desc="bias correction"):
            for k, ((node, _, _), (y, twin)) in enumerate(zip(targets, pairs)):
                diff = (values[y] - values[twin]).astype(np.float64)
                axis = CHANNEL_AXIS[node.op_type] % diff.ndim
                per_channel = np.moveaxis(diff, axis, 0).reshape(diff.shape[axis], -1)
                sums[k] = per_channel.sum(axis=1) + (0 if sums[k] is None else sums[k])
                counts[k] += per_channel.shape[1]
        for k, (node, f, dq) in enumerate(targets):
            err = sums[k] / max(counts[k], 1)
            scale = const_array(dq.inputs[1]).astype(np.float64)
            bias = const_array(f.inputs[2]).astype(np.float64) - err
            q = qu.quantize_bias(bias, scale)
            old = dq.inputs[0]
            new = ir.Value(name=old.name, const_value=ir.tensor(q, name=old.name), shape=ir.Shape(q.shape),
                           type=ir.TensorType(ir.DataType.INT32))
            model.graph.initializers.pop(old.name)
            model.graph.register_initializer(new)
            dq.replace_input_with(0, new)
            self.corrections[node.name] = float(np.abs(err / np.broadcast_to(scale, err.shape)).max())
        return ir.passes.PassResult(model, modified=True)

"""AdaRound-style rounding for the int8 weights of a QDQ model: each weight is rounded up or down, not
to nearest, so that the layer's output on calibration data stays closest to the float (teacher) model's.

For every quantized layer (Conv with group 1, Gemm, MatMul whose weight is an int8 constant behind a
DequantizeLinear) the rows ``x`` are the layer's input as the *quantized* model computes it (so the
rounding also absorbs the error of the layers before it) and the targets are the teacher's output of
the same layer, less the layer's bias. With ``A = sum x x^T``, ``B = sum x y^T`` and ``yy = sum y^2``
(Conv rows are im2col patches, ``max_rows`` random positions a sample) the error of weights ``W``
is ``(tr(W^T A W) - 2 tr(W^T B) + yy) / yy``.

Layers are rounded in graph order, ``step`` at a time (1: each sees the learned rounding of the
layers before it; a larger step runs the model fewer times).

The integer weight is ``floor(w / s + zp) + h`` with ``h`` in [0, 1] a rectified sigmoid of a free
variable (AdaRound, Nagel et al. 2020). Adam minimizes the error plus a regularizer that pushes every
``h`` to 0 or 1 (its exponent annealed from 20 to 2 after a warm-up); ``h`` is then rounded. A layer
keeps round-to-nearest when the learned rounding does not lower its error, so no layer gets worse
on the calibration data. ``errors`` reports, per layer, the relative error with round-to-nearest and
with the rounding kept.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphopt.passes.reconstruct import NormalSums, _conv_params, sample_rows
from graphopt.passes.rewrite_utils import const_array

ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch (AdaRound's values)


def _dq_weight(node: ir.Node) -> ir.Node | None:
    """The DequantizeLinear holding ``node``'s int8 constant weight, or None."""
    if len(node.inputs) < 2 or node.inputs[1] is None:
        return None
    dq = node.inputs[1].producer()
    if dq is None or dq.op_type != "DequantizeLinear" or const_array(dq.inputs[0]) is None:
        return None
    return dq if dq.inputs[0].dtype == ir.DataType.INT8 else None


class _Layer(NormalSums):
    """One quantized layer: its weights as a [K, O] matrix in integer units, and the sums of its rows."""

    def __init__(self, node: ir.Node, dq: ir.Node, float_node: ir.Node):
        super().__init__()
        self.node, self.dq = node, dq
        self.op = node.op_type
        self.trans_b = self.op == "Gemm" and node.attributes.get_int("transB", 0)
        q = const_array(dq.inputs[0])
        self.q_shape = q.shape
        out_axis = 0 if self.op == "Conv" or self.trans_b else 1
        scale = np.asarray(const_array(dq.inputs[1]), np.float64)
        zp = const_array(dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2] is not None else np.zeros_like(scale)
        n_out = q.shape[out_axis]
        self.scale = np.broadcast_to(scale.reshape(-1), (n_out,)).astype(np.float64)
        self.zp = np.broadcast_to(np.asarray(zp, np.float64).reshape(-1), (n_out,))
        w = np.asarray(const_array(float_node.inputs[1]), np.float64)
        self.t = self._matrix(w) / self.scale + self.zp  # the exact weight in integer units, [K, O]
        bias = const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
        if bias is None and len(node.inputs) > 2 and node.inputs[2] is not None:  # int32 bias behind a DQ
            bdq = node.inputs[2].producer()
            if bdq is not None and bdq.op_type == "DequantizeLinear":
                bias = const_array(bdq.inputs[0]).astype(np.float64) * np.asarray(const_array(bdq.inputs[1]), np.float64)
        self.bias = np.zeros(n_out) if bias is None else np.asarray(bias, np.float64).reshape(-1)

    def _matrix(self, w: np.ndarray) -> np.ndarray:
        if self.op == "Conv":
            return w.reshape(w.shape[0], -1).T
        return w.T if self.trans_b else w

    def _unmatrix(self, m: np.ndarray) -> np.ndarray:
        if self.op == "Conv":
            return m.T.reshape(self.q_shape)
        return m.T if self.trans_b else m

    def add_sample(self, x: np.ndarray, y: np.ndarray, rng: np.random.Generator, max_rows: int) -> None:
        """One sample's rows, the layer's bias taken off the targets."""
        x, y = sample_rows(self.node, self.q_shape[2:4], x, y, rng, max_rows)
        self.add(x.astype(np.float64), y.astype(np.float64) - self.bias)

    def error_q(self, q: np.ndarray) -> float:
        """The relative error of integer weights ``q`` [K, O]."""
        return self.error((q - self.zp) * self.scale)

    def learn(self, iterations: int, lr: float, reg: float, warmup: float) -> np.ndarray:
        """The integer weights [K, O] with learned rounding (round-to-nearest when that is better)."""
        floor = np.floor(self.t)
        nearest = np.clip(np.round(self.t), -128, 127)
        fixed = (floor >= 127) | (floor < -128)  # at the edge of the int8 range: no choice to make
        r = np.clip(self.t - floor, 0.0, 1.0)
        p = np.clip((r - GAMMA) / (ZETA - GAMMA), 1e-4, 1 - 1e-4)
        v = np.log(p / (1 - p))  # so that h(v) starts at the exact remainder
        m1, m2 = np.zeros_like(v), np.zeros_like(v)
        a = self.A / self.yy
        b = self.B / self.yy
        scale = self.scale
        base = self.error_q(nearest)
        lam = reg * max(base, 1e-12) / v.size
        start = int(warmup * iterations)
        for it in range(iterations):
            sig = 1.0 / (1.0 + np.exp(-v))
            raw = sig * (ZETA - GAMMA) + GAMMA
            h = np.clip(raw, 0.0, 1.0)
            w = (floor + h - self.zp) * scale
            grad_h = 2.0 * (a @ w - b) * scale
            if it >= start:
                beta = 20.0 + (2.0 - 20.0) * (it - start) / max(iterations - start - 1, 1)
                d = 2 * h - 1
                grad_h += lam * -beta * np.abs(d) ** (beta - 1) * np.sign(d) * 2
            grad_v = np.where((raw > 0) & (raw < 1) & ~fixed, grad_h * sig * (1 - sig) * (ZETA - GAMMA), 0.0)
            m1 = 0.9 * m1 + 0.1 * grad_v
            m2 = 0.999 * m2 + 0.001 * grad_v ** 2
            v -= lr * (m1 / (1 - 0.9 ** (it + 1))) / (np.sqrt(m2 / (1 - 0.999 ** (it + 1))) + 1e-8)
        h = np.clip(1.0 / (1.0 + np.exp(-v)) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)
        learned = np.where(fixed, nearest, np.clip(floor + (h >= 0.5), -128, 127))
        return learned if self.error_q(learned) < base else nearest


class AdaRoundPass(ir.passes.InPlacePass):
    """Learn the rounding of each int8 weight so that layer outputs match the float model's."""

    def __init__(self, float_model: ir.Model, data, *, iterations: int = 300, lr: float = 0.05, reg: float = 0.1,
                 warmup: float = 0.2, max_rows: int = 2048, step: int = 1, seed: int = 0, show: bool = False):
        super().__init__()
        self.float_nodes = {n.name: n for n in float_model.graph if n.name}
        self.float_model, self.data = float_model, data
        self.iterations, self.lr, self.reg, self.warmup = iterations, lr, reg, warmup
        self.max_rows, self.step, self.seed, self.show = max_rows, max(step, 1), seed, show
        self.errors: dict[str, tuple[float, float]] = {}  # layer -> (round-to-nearest error, kept error)
        self.skipped: dict[str, str] = {}

    def _layers(self, model: ir.Model) -> list[_Layer]:
        out = []
        for node in model.graph:
            if node.op_type not in ("Conv", "Gemm", "MatMul"):
                continue
            dq, f = _dq_weight(node), self.float_nodes.get(node.name)
            if dq is None or f is None or const_array(f.inputs[1]) is None:
                continue
            if node.op_type == "Conv" and (node.attributes.get_int("group", 1) != 1 or len(dq.inputs[0].shape) != 4
                                           or _conv_params(node, 1, 1) is None):
                self.skipped[node.name] = "grouped, non-2-D or auto-padded Conv"
                continue
            if node.op_type == "Gemm" and node.attributes.get_int("transA", 0):
                self.skipped[node.name] = "Gemm with transA"
                continue
            if node.op_type == "MatMul" and len(dq.inputs[0].shape) != 2:
                self.skipped[node.name] = "MatMul with a batched weight"
                continue
            out.append(_Layer(node, dq, f))
        return out

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from graphopt.compression.calibration import run_outputs

        layers = self._layers(model)
        if not layers:
            return ir.passes.PassResult(model, modified=False)
        modified = False
        for start in range(0, len(layers), self.step):  # in graph order: each chunk sees the rounding before it
            chunk = layers[start:start + self.step]
            rng = np.random.default_rng(self.seed + start)
            xs = [layer.node.inputs[0].name for layer in chunk]
            ys = [self.float_nodes[layer.node.name].outputs[0].name for layer in chunk]
            student = run_outputs(model, xs, self.data, show=self.show, desc=f"adaround {start + 1}/{len(layers)}")
            teacher = run_outputs(self.float_model, ys, self.data)
            for sv, tv in zip(student, teacher):
                for layer, xn, yn in zip(chunk, xs, ys):
                    layer.add_sample(sv[xn], tv[yn], rng, self.max_rows)
            for layer in chunk:
                modified |= self._round(layer)
        return ir.passes.PassResult(model, modified=modified)

    def _round(self, layer: _Layer) -> bool:
        """Learn ``layer``'s rounding and write its int8 weight; whether the weight changed."""
        name = layer.node.name
        if layer.yy <= 0:
            self.skipped[name] = "teacher output is all bias"
            return False
        nearest = np.clip(np.round(layer.t), -128, 127)
        q = layer.learn(self.iterations, self.lr, self.reg, self.warmup)
        self.errors[name] = (layer.error_q(nearest), layer.error_q(q))
        layer.A = layer.B = None
        old = const_array(layer.dq.inputs[0])
        new = layer._unmatrix(q).astype(np.int8)
        if np.array_equal(old, new):
            return False
        layer.dq.inputs[0].const_value = ir.tensor(new, name=layer.dq.inputs[0].name)
        return True

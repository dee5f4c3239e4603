"""Teacher-guided reconstruction (the post-training form of distillation): after pruning, each layer
that lost input channels gets new weights (and bias) fitted by ridge least squares so that, on
calibration inputs, its output matches the unpruned (teacher) model's output of the same layer.

For a layer ``L`` the rows are its input as the *pruned* model computes it (so the fit also absorbs
the error of the layers before it) and the targets are the teacher's output of ``L`` on the same
sample, restricted to the output channels ``L`` kept. Conv (group 1, 2-D, explicit or no padding)
rows are im2col patches (``max_rows`` random positions a sample), Gemm/MatMul rows are the rows
of the input. With ``A = sum x x^T`` and ``B = sum x y^T`` over every sample (a bias column of ones
included where the layer has or can take a bias), the new weights solve
``(A + lambda * tr(A)/D * I) W = B + lambda * tr(A)/D * W0`` (ridge toward the pruned weights ``W0``);
a layer with fewer rows than unknowns (a squeeze-excite conv on a 1x1 map sees one row a sample)
keeps ``W0``. Layers are fitted in graph order, ``step`` at a time (1: each
one sees the refitted layers before it). ``errors`` reports, per layer, the relative squared error
against the teacher before and after the fit (computed from the same sums).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphopt.passes.rewrite_utils import const_array, drop_unused_constants, new_const


def _conv_params(node: ir.Node, kh: int, kw: int):
    a = node.attributes
    if a.get_string("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return None
    strides = list(a.get_ints("strides", [1, 1]))
    dil = list(a.get_ints("dilations", [1, 1]))
    pads = list(a.get_ints("pads", [0, 0, 0, 0])) if a.get_string("auto_pad", "NOTSET") == "NOTSET" else [0] * 4
    return strides, dil, pads


def im2col(x: np.ndarray, node: ir.Node, kh: int, kw: int, out_hw: tuple[int, int],
           positions: np.ndarray) -> np.ndarray:
    """Conv patches of ``x`` [N, C, H, W] at flat output ``positions`` (over N*OH*OW) as [P, C*kh*kw],
    in the weight's (c, i, j) order."""
    (sh, sw), (dh, dw), pads = _conv_params(node, kh, kw)
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    n, rest = np.divmod(positions, out_hw[0] * out_hw[1])
    i, j = np.divmod(rest, out_hw[1])
    cols = [xp[n, :, i * sh + a * dh, j * sw + b * dw] for a in range(kh) for b in range(kw)]  # each [P, C]
    return np.stack(cols, axis=2).reshape(len(positions), -1)


def sample_rows(node: ir.Node, kernel_hw: tuple[int, int], x: np.ndarray, y: np.ndarray,
                rng: np.random.Generator, max_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, targets) of one sample for a layer: a Conv's im2col patches at up to ``max_rows`` random
    output positions with its outputs there ([P, O]), or up to ``max_rows`` rows of a Gemm/MatMul."""
    if node.op_type == "Conv":
        total = y.shape[0] * y.shape[2] * y.shape[3]
        pick = rng.choice(total, max_rows, replace=False) if total > max_rows else np.arange(total)
        x = im2col(x, node, kernel_hw[0], kernel_hw[1], y.shape[2:], pick)
        return x, y.transpose(0, 2, 3, 1).reshape(-1, y.shape[1])[pick]
    x, y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
    if len(x) > max_rows:
        pick = rng.choice(len(x), max_rows, replace=False)
        x, y = x[pick], y[pick]
    return x, y


class NormalSums:
    """``A = sum x x^T``, ``B = sum x y^T`` and ``yy = sum y^2`` over the rows seen: enough to give the
    relative squared error of any weights ``m`` [D, O] without the rows."""

    def __init__(self):
        self.A = self.B = None
        self.yy, self.rows_seen = 0.0, 0

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        a, b = x.T @ x, x.T @ y
        self.A = a if self.A is None else self.A + a
        self.B = b if self.B is None else self.B + b
        self.yy += float((y ** 2).sum())
        self.rows_seen += len(x)

    def error(self, m: np.ndarray) -> float:
        err = float(((self.A @ m) * m).sum() - 2 * (m * self.B).sum() + self.yy)
        return max(err, 0.0) / max(self.yy, 1e-30)


class _Layer(NormalSums):
    """One layer to refit: how its rows and targets are formed and how new weights are written."""

    def __init__(self, node: ir.Node, kept_out: np.ndarray | None):
        super().__init__()
        self.node, self.kept_out = node, kept_out
        w = const_array(node.inputs[1])
        self.op = node.op_type
        self.w_shape = w.shape
        self.trans_b = self.op == "Gemm" and node.attributes.get_int("transB", 0)
        has_bias = len(node.inputs) > 2 and node.inputs[2] is not None
        bias = const_array(node.inputs[2]) if has_bias else None
        n_out = w.shape[0] if self.op == "Conv" else (w.shape[0] if self.trans_b else w.shape[1])
        # a bias column where the layer has a [N] bias, or can take one (Conv, Gemm without C)
        self.fit_bias = (bias is not None and bias.size == n_out) or (not has_bias and self.op in ("Conv", "Gemm"))

    def matrix(self) -> np.ndarray:
        """Current weights as [D, O] (bias row last when fitted)."""
        w = const_array(self.node.inputs[1]).astype(np.float64)
        m = w.reshape(w.shape[0], -1).T if self.op == "Conv" else (w.T if self.trans_b else w)
        if self.fit_bias:
            b = const_array(self.node.inputs[2]) if len(self.node.inputs) > 2 and self.node.inputs[2] is not None \
                else np.zeros(m.shape[1])
            m = np.vstack([m, np.asarray(b, np.float64).reshape(1, -1)])
        return m

    def rows(self, x: np.ndarray, y: np.ndarray, rng: np.random.Generator, max_rows: int):
        x, y = sample_rows(self.node, self.w_shape[2:4], x, y, rng, max_rows)
        if self.kept_out is not None:
            y = y[:, self.kept_out]
        x = x.astype(np.float64)
        if self.fit_bias:
            x = np.hstack([x, np.ones((len(x), 1))])
        return x, y.astype(np.float64)

    def write(self, graph: ir.Graph, m: np.ndarray) -> list[ir.Value]:
        node = self.node
        replaced = [v for v in node.inputs[1:3] if v is not None]
        dtype = const_array(node.inputs[1]).dtype
        w, b = (m[:-1], m[-1]) if self.fit_bias else (m, None)
        if self.op == "Conv":
            w = w.T.reshape(self.w_shape)
        elif self.trans_b:
            w = w.T
        node.replace_input_with(1, new_const(graph, w.astype(dtype), f"{node.name}_refit_w", node))
        if b is not None:
            if len(node.inputs) < 3:
                node.resize_inputs(3)
            old = node.inputs[2]
            shape = const_array(old).shape if old is not None else (len(b),)
            node.replace_input_with(2, new_const(graph, b.reshape(shape).astype(dtype), f"{node.name}_refit_b", node))
        return replaced


class ReconstructPass(ir.passes.InPlacePass):
    """Refit the weights of pruned layers against the teacher model's outputs on calibration data."""

    def __init__(self, teacher: ir.Model, data, kept: dict[str, dict[str, np.ndarray]], *, ridge: float = 1e-3,
                 max_rows: int = 1024, step: int = 1, seed: int = 0, show: bool = False):
        super().__init__()
        self.teacher, self.data, self.kept = teacher, data, kept
        self.ridge, self.max_rows, self.step, self.seed, self.show = ridge, max_rows, max(step, 1), seed, show
        self.errors: dict[str, tuple[float, float]] = {}  # layer -> (relative error before, after)
        self.skipped: dict[str, str] = {}  # layer -> why it kept its pruned weights

    def _layers(self, model: ir.Model) -> list[_Layer]:
        out = []
        for node in model.graph:
            k = self.kept.get(node.name, {})
            if "in" not in k or node.op_type not in ("Conv", "Gemm", "MatMul") or const_array(node.inputs[1]) is None:
                continue
            if node.op_type == "Conv" and (node.attributes.get_int("group", 1) != 1 or len(node.inputs[1].shape) != 4
                                           or _conv_params(node, 1, 1) is None):
                continue
            if node.op_type == "Gemm" and node.attributes.get_int("transA", 0):
                continue
            out.append(_Layer(node, k.get("out")))
        return out

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from graphopt.compression.calibration import run_outputs

        layers = self._layers(model)
        for start in range(0, len(layers), self.step):
            chunk = layers[start:start + self.step]
            rng = np.random.default_rng(self.seed + start)
            xs = [layer.node.inputs[0].name for layer in chunk]
            ys = [layer.node.outputs[0].name for layer in chunk]
            student = run_outputs(model, xs, self.data, show=self.show, desc=f"reconstruct {start + 1}/{len(layers)}")
            teacher = run_outputs(self.teacher, ys, self.data)
            for sv, tv in zip(student, teacher):
                for layer, xn, yn in zip(chunk, xs, ys):
                    layer.add(*layer.rows(sv[xn], tv[yn], rng, self.max_rows))
            for layer in chunk:
                old = layer.matrix()
                d = layer.A.shape[0]
                if layer.rows_seen < d:  # fewer rows than unknowns: a fit would only memorize them
                    self.skipped[layer.node.name] = f"{layer.rows_seen} rows for {d} weights a channel"
                    layer.A = layer.B = None
                    continue
                lam = max(self.ridge * np.trace(layer.A) / d, 1e-12)
                new = np.linalg.solve(layer.A + lam * np.eye(d), layer.B + lam * old)  # ridge toward the pruned weights
                self.errors[layer.node.name] = (layer.error(old), layer.error(new))
                drop_unused_constants(model.graph, layer.write(model.graph, new))
                layer.A = layer.B = None
        return ir.passes.PassResult(model, modified=bool(layers))

"""Relax constants rewritten in numpy at compile time: layout changes of constant weights (a TVM
kernel per constant would cost seconds per model) and zero-element constants (TVM 0.27 cannot read
them back from an executable)."""

from __future__ import annotations

import numpy as np

_RESHAPE_OPS = ("relax.expand_dims", "relax.reshape", "relax.squeeze", "relax.flatten")
# A constant broadcast to a weight's shape (ONNX Expand / ConstantOfShape of a fill value, as in the
# onnx wheel's light models) becomes that weight up to this size: a matmul then reads it packed
# (light:resnet50's classifier: 0.87 ms reading the broadcast 2048x1000 weight column tile by tile).
BROADCAST_MAX_BYTES = 64 << 20


def rewrite_relax_functions(mod, mutator):
    """``mutator`` (a PyExprMutator built on ``mod``) over every Relax function of ``mod``: the new module."""
    from tvm import relax

    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gv, mutator.visit_expr(func))
    return mutator.builder_.get()


def bound_constant(mutator, expr):
    """``expr`` as a Relax constant, looking through a variable ``mutator`` saw bound to one; else None."""
    import tvm
    from tvm import relax

    if isinstance(expr, relax.Var):
        expr = mutator.lookup_binding(expr)
    return expr if isinstance(expr, tvm.ir.expr.Constant) else None


def fold_layout_of_constants(mod):
    """Reshape/expand_dims/squeeze/flatten/permute_dims/layout_transform of a constant, done once in
    numpy (layout_transform: its index map applied to the constant), and a broadcast_to of one up to
    ``BROADCAST_MAX_BYTES``.

    Relax's FoldConstant would build and run one small kernel per such call (seconds per model for
    the bias broadcasts of every conv); these are pure layout changes, exact in numpy.
    """
    import tvm
    from tvm import relax

    reshapes = [tvm.ir.Op.get(n) for n in _RESHAPE_OPS]
    permute = tvm.ir.Op.get("relax.permute_dims")
    broadcast = tvm.ir.Op.get("relax.broadcast_to")
    relayout = tvm.ir.Op.get("relax.layout_transform")

    @relax.expr_functor.mutator
    class _Fold(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not isinstance(call.op, tvm.ir.Op) or not call.args:
                return call
            arg = call.args[0]
            if isinstance(arg, relax.Var):  # a binding of a constant (possibly folded just before)
                arg = self.lookup_binding(arg)
            if arg is None or not hasattr(arg, "value"):
                return call
            if call.op.same_as(relayout) and call.attrs.pad_value is None:
                moved = relayout_numpy(call.attrs.index_map, arg.value.numpy())
                return call if moved is None else relax.const(moved)
            is_reshape = any(call.op.same_as(op) for op in reshapes)
            is_broadcast = call.op.same_as(broadcast)
            if not (is_reshape or is_broadcast or call.op.same_as(permute)):
                return call
            shape = getattr(self.builder_.normalize(call).ty, "shape", None)
            dims = getattr(shape, "values", None)
            if dims is None or not all(isinstance(d, tvm.tirx.IntImm) for d in dims):
                return call
            value = arg.value.numpy()
            if is_broadcast:
                dims = [int(d) for d in dims]
                if np.prod(dims, dtype=np.int64) * value.itemsize > BROADCAST_MAX_BYTES:
                    return call
                return relax.const(np.ascontiguousarray(np.broadcast_to(value, dims)), value.dtype)
            if is_reshape:
                return relax.const(value.reshape([int(d) for d in dims]), value.dtype)
            axes = None if call.attrs.axes is None else [int(a) for a in call.attrs.axes]
            return relax.const(np.ascontiguousarray(np.transpose(value, axes)), value.dtype)

    return rewrite_relax_functions(mod, _Fold(mod))


# astype and the arithmetic of an affine dequantization, on constants, in numpy (exact: the same
# IEEE float32 operations TVM's kernels do); results above this size stay computed at run time
ELEMENTWISE_MAX_BYTES = 256 << 20
_ELEMENTWISE = {"relax.multiply": np.multiply, "relax.add": np.add, "relax.subtract": np.subtract}


def fold_elementwise_of_constants(mod, max_bytes: int = ELEMENTWISE_MAX_BYTES):
    """astype / multiply / add / subtract whose operands are all constants, done once in numpy.

    Relax's FoldConstant folds only after legalization, after the packed-matmul rewrite has looked for
    constant weights: a weight an int8 model dequantizes as ``Cast(q) * scale + zero`` (Moonshine's
    416x1664 FFN weights, over the ONNX folding's 1 MiB bound) stayed an unpacked matmul reading a
    weight recomputed every call. Run it after the quantized-weight matmul rewrite has taken the
    dequantizations it serves.
    """
    import tvm
    from tvm import relax

    ops = {tvm.ir.Op.get(name): fn for name, fn in _ELEMENTWISE.items()}
    astype = tvm.ir.Op.get("relax.astype")

    @relax.expr_functor.mutator
    class _Fold(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not isinstance(call.op, tvm.ir.Op) or not (call.op.same_as(astype) or call.op in ops):
                return call
            args = [self.lookup_binding(a) if isinstance(a, relax.Var) else a for a in call.args]
            if not all(isinstance(a, tvm.ir.expr.Constant) for a in args):
                return call
            dtype = str(getattr(self.builder_.normalize(call).ty, "dtype", ""))
            if not dtype or dtype == "void":
                return call
            values = [a.value.numpy() for a in args]
            out = values[0].astype(dtype) if call.op.same_as(astype) else ops[call.op](*values)
            if out.nbytes > max_bytes or str(out.dtype) != dtype:
                return call
            return relax.const(np.ascontiguousarray(out), dtype)

    return rewrite_relax_functions(mod, _Fold(mod))


def relayout_numpy(index_map, value: np.ndarray) -> np.ndarray | None:
    """``value`` moved by a layout_transform's ``index_map`` (each index an affine expression with
    floordiv / floormod by constants, as layout strings give), or None for any other map.

    IndexMap.map_tensor evaluates the map per element (ResNet-50's weights: over two minutes)."""
    import tvm

    tir = tvm.tirx
    grid = np.indices(value.shape, dtype=np.int64)
    env = {v: grid[k] for k, v in enumerate(index_map.initial_indices)}
    ops = {tir.Add: np.add, tir.Sub: np.subtract, tir.Mul: np.multiply, tir.FloorDiv: np.floor_divide,
           tir.FloorMod: np.mod}

    def ev(e):
        if isinstance(e, tir.IntImm):
            return int(e.value)
        if isinstance(e, tir.Var):
            return env[e]
        fn = ops.get(type(e))
        if fn is None:
            raise TypeError(type(e).__name__)
        return fn(ev(e.a), ev(e.b))

    try:
        dest = [np.broadcast_to(ev(e), value.shape) for e in index_map.final_indices]
    except (TypeError, KeyError):
        return None
    shape = [int(d.max()) + 1 if d.size else 0 for d in dest]
    out = np.zeros(shape, value.dtype)
    out[tuple(dest)] = value
    if out.size != value.size:  # a map that pads or drops elements is not a pure relayout
        return None
    return out


def _is_empty_constant(expr) -> bool:
    shape = getattr(getattr(expr, "value", None), "shape", None)
    return shape is not None and 0 in [int(d) for d in shape]


def replace_empty_constants(mod):
    """Zero-element constants become zero-element allocations.

    TVM 0.27 writes a zero-element constant into the executable but cannot read it back
    ("Invalid DLTensor file format"); an allocation of no elements needs no data.
    """
    from tvm import relax

    funcs = [(gv, f) for gv, f in mod.functions_items() if isinstance(f, relax.Function)]
    found: list = []
    for _, func in funcs:
        relax.analysis.post_order_visit(func, lambda e: found.append(e) if _is_empty_constant(e) else None)
    if not found:
        return mod

    @relax.expr_functor.mutator
    class _Replace(relax.PyExprMutator):
        def visit_generic_const_(self, const):
            if not _is_empty_constant(const):
                return const
            shape = relax.ShapeExpr([int(d) for d in const.value.shape])
            return relax.op.builtin.alloc_tensor(shape, str(const.value.dtype), 0)

    replacer = _Replace(mod)
    for gv, func in funcs:
        replacer.builder_.update_func(gv, replacer.visit_expr(func))
    return replacer.builder_.get()

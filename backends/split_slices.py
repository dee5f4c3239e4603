"""A ``split`` whose pieces each feed layout or elementwise ops becomes one ``strided_slice`` per piece.

Legalized, ``split`` is one kernel that copies every piece out of its input; each piece is then copied
again by its consumer (a head split's reshape and transpose, a padded copy). As separate slices, each
piece is an injective op that ``FuseOps`` fuses into its consumer: one copy instead of two. Moonshine's
decoder merges its 16 cross-attention K/V projections into one [207, 6656] product whose split copied
5.5 MB serially before the 16 head-split transposes copied it again; BERT's fused QKV projection is
split the same way.

A split stays as it is when a piece goes anywhere else (a matmul, a kernel call, a function output,
another block): a slice alone would copy the same bytes as the split, in more kernels.
"""

from __future__ import annotations

import tvm
from graphopt.backends.constants import rewrite_relax_functions
from tvm import relax

_SPLIT = tvm.ir.Op.get("relax.split")
# Ops that legalize to injective kernels, which FuseOps fuses with a strided_slice before them.
FUSABLE = frozenset(f"relax.{name}" for name in (
    "reshape", "permute_dims", "expand_dims", "squeeze", "flatten", "strided_slice", "astype", "nn.pad",
    "broadcast_to", "concat", "add", "subtract", "multiply", "divide", "negative", "sigmoid", "tanh", "exp",
    "sqrt", "rsqrt", "maximum", "minimum", "clip", "nn.relu", "nn.gelu", "nn.silu"))


def _static(shape) -> list[int] | None:
    values = getattr(shape, "values", None)
    if values is None or not all(isinstance(v, tvm.tirx.IntImm) for v in values):
        return None
    return [int(v) for v in values]


def _users(func: relax.Function) -> dict:
    """Each variable of ``func`` to the binding values (or the body, ``None``) that read it, with the
    index of the block each binding sits in."""
    users: dict = {}
    for n, block in enumerate(func.body.blocks):
        for binding in block.bindings:
            for var in relax.analysis.free_vars(binding.value):
                users.setdefault(var, []).append((binding.value, n))
    for var in relax.analysis.free_vars(func.body.body):
        users.setdefault(var, []).append((None, None))
    return users


def _fusable_use(value) -> bool:
    return isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) and value.op.name in FUSABLE


def split_pieces(func: relax.Function) -> dict:
    """The splits of ``func`` to rewrite: split variable -> its pieces' (begin, end) along its axis."""
    if not isinstance(func.body, relax.SeqExpr):
        return {}
    users = _users(func)
    chosen = {}
    for n, block in enumerate(func.body.blocks):
        if not isinstance(block, relax.DataflowBlock):
            continue
        for binding in block.bindings:
            call = binding.value
            if not (isinstance(call, relax.Call) and call.op.same_as(_SPLIT)):
                continue
            uses = users.get(binding.var, [])
            if not uses or any(not (isinstance(v, relax.TupleGetItem) and b == n) for v, b in uses):
                continue  # the tuple itself escapes: keep the split
            pieces = [b.var for b in block.bindings if isinstance(b.value, relax.TupleGetItem)
                      and b.value.tuple_value.same_as(binding.var)]
            if not all(users.get(p) and all(_fusable_use(v) and b == n for v, b in users[p]) for p in pieces):
                continue
            shapes = [_static(getattr(f, "shape", None)) for f in binding.var.ty.fields]
            if any(s is None for s in shapes):
                continue
            axis = int(call.attrs.axis) % len(shapes[0])
            bounds, start = [], 0
            for s in shapes:
                bounds.append((start, start + s[axis]))
                start += s[axis]
            chosen[binding.var] = (axis, bounds)
    return chosen


@relax.expr_functor.mutator
class _SplitToSlices(relax.PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.splits: dict = {}  # split variable -> (axis, bounds), for the function being visited
        self.slices: dict = {}  # split variable -> its slices, once emitted

    def visit_function_(self, func):
        self.splits, self.slices = split_pieces(func), {}
        return super().visit_function_(func)

    def visit_var_binding_(self, binding):
        value = binding.value
        if binding.var in self.splits:
            axis, bounds = self.splits[binding.var]
            x = self.visit_expr(value.args[0])
            self.slices[binding.var] = [self.builder_.emit(relax.op.strided_slice(
                x, axes=[axis], begin=[b], end=[e], assume_inbound=True)) for b, e in bounds]
            return
        if isinstance(value, relax.TupleGetItem) and value.tuple_value in self.slices:
            self.set_var_remap(binding.var, self.slices[value.tuple_value][value.index])
            return
        super().visit_var_binding_(binding)


def split_to_slices(mod):
    """``mod`` with each split that ``split_pieces`` chooses written as one strided_slice per piece."""
    return rewrite_relax_functions(mod, _SplitToSlices(mod))


def count_splits(mod) -> int:
    """How many relax.split calls the Relax functions of ``mod`` hold (for tests and reports)."""
    n = 0
    for _, func in mod.functions_items():
        if isinstance(func, relax.Function) and isinstance(func.body, relax.SeqExpr):
            n += sum(1 for b in func.body.blocks for x in b.bindings
                     if isinstance(x.value, relax.Call) and x.value.op.same_as(_SPLIT))
    return n

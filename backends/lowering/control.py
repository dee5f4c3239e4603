"""Lowering rules: If, Loop and Scan.

* ``If`` with a condition known at lowering time inlines the taken branch; otherwise it becomes a
  ``relax.If`` on a scalar bool (both branches lowered as their own blocks).
* ``Loop`` and ``Scan`` are unrolled: the trip count must be known at lowering time and at most
  ``MAX_UNROLL``. A Loop whose condition is only known at run time keeps running the body but freezes
  its loop-carried values once the condition turns false (exact, as long as it has no scan outputs,
  whose length would then depend on run-time data).
"""

from __future__ import annotations

import numpy as np
from tvm import relax

from graphopt.backends.lowering import helpers
from graphopt.backends.lowering.rules import OpRule

op = relax.op

MAX_UNROLL = 64


def _scalar_bool(ctx, cond) -> relax.Expr:
    shape = helpers.static_shape(cond)
    ctx.check(shape is not None and helpers.numel(shape) == 1, lambda: f"the condition must hold one value, its shape is {shape}")
    if helpers.dtype_of(cond) != "bool":
        cond = op.not_equal(cond, helpers.scalar(0, helpers.dtype_of(cond)))
    return ctx.emit(op.reshape(cond, [])) if shape != () else cond


# ---------------------------------------------------------------- If


def _lifted(ctx, branch: relax.SeqExpr, which: str) -> relax.Expr:
    """A branch as a call of a private function of its own, taking the outer values it reads.

    Inline branches are unsafe in TVM 0.27: StaticPlanBlockMemory plans both branches of a ``relax.If``
    as one block, so a storage allocated inside the then-branch is reused by the else-branch, where it
    was never allocated (the VM then dereferences a null storage: a segfault whenever the else-branch
    runs). A function is planned on its own; what it returns is allocated for the caller.
    Weights it reads are parameters here; ``bind_constant_arguments`` binds them once they are constants.
    """
    branch = ctx.bb.normalize(branch)
    params = list(relax.analysis.free_vars(branch))
    fn = relax.utils.copy_with_new_vars(relax.Function(params, branch))
    name = helpers.safe_name(f"{ctx.name}_{which}_{ctx._lowerer.next_id()}", "branch")
    gv = ctx.bb.add_func(fn, name)
    return relax.Call(gv, params)


def _if(ctx, inputs):
    then_g, else_g = ctx.attr("then_branch"), ctx.attr("else_branch")
    value = ctx.const(0)
    if value is not None:
        return ctx.lower_graph(then_g if bool(np.asarray(value).reshape(-1)[0]) else else_g, [])
    cond = _scalar_bool(ctx, inputs[0])
    then_b = _lifted(ctx, ctx.lower_branch(then_g), "then")
    else_b = _lifted(ctx, ctx.lower_branch(else_g), "else")
    result = ctx.emit(relax.If(cond, then_b, else_b))
    n = len(then_g.outputs)
    if n == 1:
        return result
    return [ctx.emit(relax.TupleGetItem(result, k)) for k in range(n)]


def bind_constant_arguments(mod):
    """Constant arguments bound into the private functions that receive them (If branches).

    A branch function takes every outer value it reads as a parameter, weights included; once the
    weights are bound as constants in ``main``, the branch still sees parameters, so work on a weight
    (a transpose of a 32768x416 embedding) would run on every call instead of folding at compile time.
    A parameter that is the same constant at every call site is bound into the function and dropped
    from the calls; repeated until nothing changes (a nested If's function is called from a branch).
    Run after binding the weights, and again after constant folding (weights computed from constants
    in ``main`` are constants only then).
    """
    import tvm

    while True:
        sites, constant_vars = _call_sites(mod)
        value = lambda arg: constant_vars.get(arg, arg)  # noqa: E731 - a variable bound to a constant
        bound = {}
        for gv, calls in sites.items():
            func = mod[gv]
            if not calls or gv.name_hint == "main" or not isinstance(func, relax.Function):
                continue
            keep = {}
            for i, param in enumerate(func.params):
                first = value(calls[0].args[i])
                if isinstance(first, tvm.ir.expr.Constant) and all(value(c.args[i]).same_as(first) for c in calls):
                    keep[i] = (param, first)
            if keep:
                bound[gv] = keep
        if not bound:
            return mod

        funcs, renamed = {}, {}
        for gv, func in mod.functions_items():
            if gv in bound:  # a new GlobalVar: the old one's type still lists the bound parameters
                func = func.bind_params({p: c for p, c in bound[gv].values()})
                renamed[gv] = relax.GlobalVar(gv.name_hint)
                relax._ffi_api.UpdateType(renamed[gv], func.ty)
            funcs[renamed.get(gv, gv)] = func

        @relax.expr_functor.mutator
        class _Drop(relax.PyExprMutator):
            def visit_call_(self, call):
                call = super().visit_call_(call)
                drop = bound.get(call.op) if isinstance(call.op, tvm.ir.GlobalVar) else None
                if not drop:
                    return call
                args = [a for i, a in enumerate(call.args) if i not in drop]
                return relax.Call(renamed[call.op], args, call.attrs, call.ty_args, call.span)

        mod = tvm.IRModule({gv: _Drop().visit_expr(f) if isinstance(f, relax.Function) else f
                            for gv, f in funcs.items()}, attrs=mod.attrs)


def _call_sites(mod) -> tuple[dict, dict]:
    """``{GlobalVar: [relax.Call]}`` of every call of a Relax function from a Relax function, and
    ``{relax.Var: constant}`` of the variables bound to a constant."""
    import tvm

    sites: dict = {}
    constant_vars: dict = {}

    @relax.expr_functor.visitor
    class _Calls(relax.PyExprVisitor):
        def visit_var_binding_(self, binding):
            super().visit_var_binding_(binding)
            if isinstance(binding.value, tvm.ir.expr.Constant):
                constant_vars[binding.var] = binding.value

        def visit_call_(self, call):
            super().visit_call_(call)
            if isinstance(call.op, tvm.ir.GlobalVar) and isinstance(mod[call.op], relax.Function):
                sites.setdefault(call.op, []).append(call)

    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            sites.setdefault(gv, [])
            _Calls().visit_expr(func)
    return sites, constant_vars


# ---------------------------------------------------------------- Loop


def _loop(ctx, inputs):
    body = ctx.attr("body")
    num_carried = len(inputs) - 2
    num_scan = len(body.outputs) - 1 - num_carried
    ctx.check(ctx.has_input(0), "a Loop without a trip count (run-time termination) cannot be unrolled")
    trips = int(np.asarray(ctx.require_const(0, "trip count")).reshape(-1)[0])
    ctx.check(0 <= trips <= MAX_UNROLL, lambda: f"trip count {trips} is over the unrolling limit {MAX_UNROLL}")
    ctx.check(trips > 0 or num_scan == 0, "a Loop with scan outputs and no iterations (empty outputs)")
    if ctx.has_input(1):
        c = ctx.const(1)
        if c is None and num_scan:
            c = ctx.require_const(1, "loop condition: scan output lengths depend on it")
        active = helpers.const(np.array(bool(np.asarray(c).reshape(-1)[0])), "bool") if c is not None else _scalar_bool(ctx, inputs[1])
    else:
        active = helpers.const(np.array(True), "bool")
    carried = list(inputs[2:])
    scans: list[list] = [[] for _ in range(num_scan)]
    for i in range(trips):
        known = helpers.const_value(active)
        if known is not None and not bool(known):
            break
        it = helpers.const(np.array(i, dtype="int64"), "int64")
        outs = ctx.lower_graph(body, [it, active] + carried)
        cond_out, new, scan_vals = outs[0], outs[1:1 + num_carried], outs[1 + num_carried:]
        if known is None:  # run-time condition: keep the old values once it has turned false
            new = [ctx.emit(op.where(active, n, o)) for n, o in zip(new, carried)]
        carried = list(new)
        for k, v in enumerate(scan_vals):
            scans[k].append(v)
        cond_known = helpers.const_value(cond_out)
        if cond_known is not None:
            if not bool(np.asarray(cond_known).reshape(-1)[0]):
                break
            continue
        ctx.check(num_scan == 0, "the loop condition is computed at run time and the Loop has scan outputs")
        cond_b = _scalar_bool(ctx, cond_out)
        active = cond_b if known is not None else ctx.emit(op.logical_and(active, cond_b))
    stacked = [ctx.emit(op.stack(vals, axis=0)) for vals in scans]
    return carried + stacked


# ---------------------------------------------------------------- Scan


def _scan_once(ctx, body, states, scan_inputs, in_axes, in_dirs, out_axes, out_dirs):
    """One Scan-9 over inputs without a batch axis: (final states, scan outputs)."""
    lengths = {helpers.static_shape(x)[a] for x, a in zip(scan_inputs, in_axes)}
    ctx.check(len(lengths) == 1, lambda: f"scan inputs have different lengths {sorted(lengths)}")
    steps = lengths.pop()
    ctx.check(steps <= MAX_UNROLL, lambda: f"{steps} scan iterations are over the unrolling limit {MAX_UNROLL}")
    slices = []
    for x, a in zip(scan_inputs, in_axes):
        parts = ctx.emit(op.split(x, steps, axis=a)) if steps > 1 else None
        slices.append([ctx.emit(op.squeeze(relax.TupleGetItem(parts, t) if parts is not None else x, [a])) for t in range(steps)])
    num_states = len(states)
    num_out = len(body.outputs) - num_states
    outs: list[list] = [[] for _ in range(num_out)]
    for t in range(steps):
        step_in = [sl[steps - 1 - t if d else t] for sl, d in zip(slices, in_dirs)]
        res = ctx.lower_graph(body, list(states) + step_in)
        states = res[:num_states]
        for k, v in enumerate(res[num_states:]):
            outs[k].append(v)
    stacked = []
    for vals, a, d in zip(outs, out_axes, out_dirs):
        axis = helpers.norm_axis(a, helpers.rank_of(vals[0]) + 1)
        stacked.append(ctx.emit(op.stack(vals[::-1] if d else vals, axis=axis)))
    return list(states), stacked


def _scan_attrs(ctx, num_scan_in: int, num_scan_out: int, rank_in: list[int]):
    in_axes = ctx.attr("scan_input_axes") or [0] * num_scan_in
    in_dirs = ctx.attr("scan_input_directions") or ctx.attr("directions") or [0] * num_scan_in
    out_axes = ctx.attr("scan_output_axes") or [0] * num_scan_out
    out_dirs = ctx.attr("scan_output_directions") or [0] * num_scan_out
    in_axes = [helpers.norm_axis(a, r) for a, r in zip(in_axes, rank_in)]
    return in_axes, list(in_dirs), list(out_axes), list(out_dirs)


def _scan(ctx, inputs):
    body = ctx.attr("body")
    num_scan_in = int(ctx.attr("num_scan_inputs"))
    legacy = ctx.opset < 9  # Scan-8: a batch axis first, and optional sequence_lens as input 0
    if legacy:
        lens = ctx.const(0)
        ctx.check(not ctx.has_input(0) or lens is not None, "sequence_lens computed at run time")
        inputs = inputs[1:]
    num_states = len(inputs) - num_scan_in
    states, scan_in = list(inputs[:num_states]), list(inputs[num_states:])
    num_scan_out = len(body.outputs) - num_states
    in_ranks = [helpers.rank_of(x) - (1 if legacy else 0) for x in scan_in]
    if not legacy:
        in_axes, in_dirs, out_axes, out_dirs = _scan_attrs(ctx, num_scan_in, num_scan_out, in_ranks)
        final, outs = _scan_once(ctx, body, states, scan_in, in_axes, in_dirs, out_axes, out_dirs)
        return final + outs
    batch = helpers.static_shape(scan_in[0])[0]
    steps = helpers.static_shape(scan_in[0])[1]
    ctx.check(lens is None or np.all(np.asarray(lens) == steps), "sequence_lens shorter than the scan length")
    in_axes, in_dirs, out_axes, out_dirs = _scan_attrs(ctx, num_scan_in, num_scan_out, in_ranks)
    per_batch = []
    for b in range(batch):
        idx = relax.const(b, "int64")
        st = [ctx.emit(op.take(s, idx, axis=0)) for s in states]
        sc = [ctx.emit(op.take(x, idx, axis=0)) for x in scan_in]
        per_batch.append(_scan_once(ctx, body, st, sc, in_axes, in_dirs, out_axes, out_dirs))
    final = [ctx.emit(op.stack([pb[0][k] for pb in per_batch], axis=0)) for k in range(num_states)]
    outs = [ctx.emit(op.stack([pb[1][k] for pb in per_batch], axis=0)) for k in range(num_scan_out)]
    return final + outs


RULES = (
    OpRule("If", _if, kind="decomposed"),
    OpRule("Loop", _loop, kind="decomposed"),
    OpRule("Scan", _scan, since=8, kind="decomposed"),
)

"""LayerNormalization over the last axis with vector-wide partial sums (CPU, float32).

TVM's layer norm sums each row in one serial chain, twice (the mean, then the variance): every add
waits for the previous one, 4 cycles each, so a row of 768 costs ~6,000 cycles whatever the vector
width (BERT-base at seq 128: 24 layer norms, 3.5 ms of a 100 ms run; 0.15 ms each for 128 x 768).
``layer_norm_te`` writes the row as ``C`` vectors of ``V`` lanes (``V`` independent chains):

* ``ln_psum [rows, V]`` then ``ln_sum``: the row's sum, lanes first; ``ln_mean`` = sum / n;
* ``ln_pvar [rows, V]`` then ``ln_var``: the sum of squared deviations from the mean (two passes, as
  ONNX Runtime: no cancellation in ``E[x²] - E[x]²``);
* ``ln_out``: ``(x - mean) * rsqrt(var / n + eps) * gamma + beta``.

``schedule_layer_norm`` (a rule of ``apply_default_schedules``; ``symbolic.py`` calls it for a
symbolic row count) computes every stage of a row under one parallel loop over the rows, so a row is
read from L1 by its second and third pass; the lane loops and the output row are vectorized.
Rows whose length is not a whole number of vectors keep TVM's layer norm.
"""

from __future__ import annotations

from tvm import s_tir, te, tirx

from .analysis import get_block
from .features import RuleContext
from .tiling import _try

BLOCKS = ("ln_psum", "ln_sum", "ln_pvar", "ln_var", "ln_out")


def applies(shape, axes, lanes: int) -> bool:
    """A float32 layer norm over the last axis only, of a static length that is whole vectors."""
    if shape is None or len(shape) < 2 or not isinstance(shape[-1], tirx.IntImm):
        return False
    rank = len(shape)
    if [int(a) % rank for a in axes] != [rank - 1]:
        return False
    n = int(shape[-1])
    return n >= lanes and n % lanes == 0


def layer_norm_te(x: te.Tensor, gamma: te.Tensor, beta: te.Tensor, eps: float, lanes: int) -> te.Tensor:
    *lead, n = x.shape
    n = int(n)
    c = n // lanes
    dt = x.dtype

    def lanes_sum(src, name):
        rc = te.reduce_axis((0, c), f"{name}_c")
        part = te.compute((*lead, lanes), lambda *i: te.sum(src(*i[:-1], rc * lanes + i[-1]), axis=rc),
                          name=f"ln_p{name}")
        rv = te.reduce_axis((0, lanes), f"{name}_v")
        return te.compute(tuple(lead), lambda *i: te.sum(part(*i, rv), axis=rv), name=f"ln_{name}")

    total = lanes_sum(x, "sum")
    mean = te.compute(tuple(lead), lambda *i: total(*i) / tirx.const(n, dt), name="ln_mean")
    dev = te.compute(x.shape, lambda *i: (x(*i) - mean(*i[:-1])) * (x(*i) - mean(*i[:-1])), name="ln_dev")
    var = lanes_sum(dev, "var")
    rstd = te.compute(tuple(lead), lambda *i: tirx.rsqrt(var(*i) / tirx.const(n, dt) + tirx.const(eps, dt)),
                      name="ln_rstd")
    return te.compute(x.shape, lambda *i: (x(*i) - mean(*i[:-1])) * rstd(*i[:-1]) * gamma[i[-1]] + beta[i[-1]],
                      name="ln_out")


PARALLEL_MIN = 1 << 18  # elements of a static layer norm below which it stays serial (a row is ~100 cycles)


def schedule_layer_norm(func: tirx.PrimFunc, ctx: RuleContext | None = None,
                        parallel: bool | None = None) -> s_tir.Schedule | None:
    """Every stage of a row under one loop over the rows, lane loops vectorized; the row loop parallel
    when ``parallel`` (None: when a static nest has ``PARALLEL_MIN`` elements)."""
    sch = s_tir.Schedule(func)
    if any(get_block(sch, n) is None for n in BLOCKS):
        return None
    for name in ("ln_dev", "ln_mean", "ln_rstd"):
        if (b := get_block(sch, name)) is not None:
            sch.compute_inline(b)
    for b in list(sch.get_producers(get_block(sch, "ln_psum"))):  # an add before the norm (a residual)
        _try(sch.compute_inline, b)
    out = get_block(sch, "ln_out")
    for b in list(sch.get_consumers(out)):  # an elementwise op after it
        _try(sch.reverse_compute_inline, b)
    out = get_block(sch, "ln_out")
    *rows, col = sch.get_loops(out)
    row = sch.fuse(*rows) if len(rows) > 1 else rows[0]
    lanes = int(sch.get(sch.get_loops(get_block(sch, "ln_psum"))[-2]).extent)
    for name in reversed(BLOCKS[:-1]):
        sch.compute_at(get_block(sch, name), row, preserve_unit_loops=True)
    if parallel is None:
        extent = sch.get(row).extent
        parallel = isinstance(extent, tirx.IntImm) and int(extent) * int(sch.get(col).extent) >= PARALLEL_MIN
    if parallel and (ctx is None or ctx.feats.cores > 1):
        sch.parallel(row)  # before the reductions' inits are split off (a parallel loop needs whole blocks)
    for name in ("ln_psum", "ln_pvar"):
        block = get_block(sch, name)
        lane, rc = sch.get_loops(block)[-2:]
        sch.reorder(rc, lane)
        sch.vectorize(lane)
        init = sch.decompose_reduction(block, rc)
        _try(sch.vectorize, sch.get_loops(init)[-1])
    _, inner = sch.split(col, [None, lanes])
    sch.vectorize(inner)
    return sch


def legalize_layer_norm(lanes: int):
    """A LegalizeOps entry for ``relax.nn.layer_norm`` (``layer_norm_te`` where ``applies``)."""
    from tvm.relax.transform.legalize_ops.nn import _nn_layer_norm

    def legalize(bb, call):
        x, gamma, beta = call.args
        shape = x.ty.shape if hasattr(x.ty, "shape") else None
        ok = (x.ty.dtype == "float32" and bool(call.attrs.center) and bool(call.attrs.scale)
              and applies(shape, list(call.attrs.axes), lanes)
              and all(len(t.ty.shape) == 1 for t in (gamma, beta)))
        if not ok:
            return _nn_layer_norm(bb, call)
        return bb.call_te(layer_norm_te, x, gamma, beta, float(call.attrs.epsilon), lanes,
                          primfunc_name_hint="layer_norm")

    return legalize

"""Elementwise chains as one loop: what the injective schedule needs for a QDQ model's integer glue.

FuseOps puts a chain such as ``dequantize -> add -> quantize -> dequantize -> relu -> quantize``
(a residual block between two integer convs) in one PrimFunc, but legalization leaves one block per
op, each writing a whole intermediate tensor: a dozen passes over memory for one elementwise result
(ResNet-50 int8: 8 ms per 256x56x56 residual add on 2 cores). ``fold_into_consumers`` inlines such
blocks into the block that reads them, so the chain is one loop computing in registers.

The surviving block reads and writes uint8 but computes in float32: ``widest_bits`` gives the type
its vector lanes are counted in (16 lanes of float32 on AVX-512, not 64 of uint8), and
``vector_split`` fuses trailing loops when the innermost one has no power-of-2 divisor near the
lane count (14x14 and 28x28 planes) instead of leaving the loop scalar.
"""

from __future__ import annotations

from tvm import s_tir, tirx

from .analysis import is_kept, is_spatial_block, uses

MAX_RECOMPUTE = 2  # consumers an elementwise block may be folded into (each computes it again)


def _walk(expr, visit) -> None:
    """Call ``visit`` on ``expr`` and its operands (not on the indices of loads)."""
    visit(expr)
    for field in ("a", "b", "value", "condition", "true_value", "false_value"):
        sub = getattr(expr, field, None)
        if sub is not None and hasattr(sub, "ty"):
            _walk(sub, visit)
    if type(expr).__name__ == "Call":
        for arg in expr.args:
            if hasattr(arg, "ty"):
                _walk(arg, visit)


def _value(stmt):
    """The stored expression of a block whose body is one store, else None."""
    body = stmt.body
    return body.value if type(body).__name__ in ("BufferStore", "TensorStore") else None


def _source(load):
    """The buffer (a Var in TVM 0.27's TensorLoad) a load reads."""
    return load.source if hasattr(load, "source") else load.buffer


def _loads_of(stmt, buffer) -> int | None:
    value = _value(stmt)
    if value is None:
        return None
    count = [0]

    def visit(node):
        if type(node).__name__ in ("BufferLoad", "TensorLoad") and _source(node).same_as(buffer):
            count[0] += 1

    _walk(value, visit)
    return count[0]


def widest_bits(stmt) -> int:
    """Bits of the widest scalar type the block computes in (uint8 -> float32 -> uint8: 32)."""
    bits = [stmt.writes[0].source.dtype.bits if stmt.writes else 32]

    def visit(node):
        ty = getattr(node, "ty", None)
        dtype = getattr(ty, "dtype", None)
        b = getattr(dtype, "bits", None)
        # 64-bit integers are index arithmetic (a pad's bounds test), not the data
        if isinstance(b, int) and str(dtype) not in ("bool", "handle", "int64") and getattr(dtype, "lanes", 1) == 1:
            bits.append(b)

    value = _value(stmt)
    if value is not None:
        _walk(value, visit)
    return max(bits)


def has_branch(stmt) -> bool:
    """Whether the block's value holds an ``if_then_else`` (a pad's bounds test)."""
    value, found = _value(stmt), [False]

    def visit(node):
        if type(node).__name__ == "Call" and getattr(node.op, "name", "") in ("tirx.if_then_else", "prim.if_then_else"):
            found[0] = True

    if value is not None:
        _walk(value, visit)
    return found[0]


def fold_into_consumers(sch: s_tir.Schedule, block) -> bool:
    """Inline ``block`` (elementwise, not kept) into its at most ``MAX_RECOMPUTE`` consumers when
    each is an unscheduled spatial block that reads it once per element; True when it did."""
    stmt = sch.get(block)
    if is_kept(sch, block) or not is_spatial_block(sch, block) or len(stmt.writes) != 1:
        return False
    cons = list(sch.get_consumers(block))
    if not cons or len(cons) > MAX_RECOMPUTE:
        return False
    buffer = stmt.writes[0].source
    for c in cons:
        if not is_spatial_block(sch, c) or any(sch.get(lp).kind != tirx.ForKind.SERIAL for lp in sch.get_loops(c)):
            return False
        if _loads_of(sch.get(c), buffer) != 1:
            return False
    try:
        sch.compute_inline(block)
    except Exception:  # noqa: BLE001 - e.g. a block writing a function output
        return False
    return True


def reads_in_order(stmt, k: int) -> bool:
    """Whether fusing the block's last ``k`` iterators keeps every read a contiguous run: each read
    indexes its last ``k`` dims by exactly those iterators, in order, or uses none of them (a
    broadcast). A transpose (``A[s, h, d] -> B[h, s, d]``) or a reshape folded into the read
    (``A[(h * 52 + d) % 416]``) fails: fused, its vector lanes are a gather with a division each."""
    trailing = [iv.var for iv in stmt.iter_vars[-k:]]
    for region in stmt.reads:
        mins = [r.min for r in region.region]
        for pos, index in enumerate(mins):
            aligned = pos - (len(mins) - k)
            for j, var in enumerate(trailing):
                if not uses(index, var):
                    continue
                if j != aligned or not index.same_as(var):
                    return False
    return True


def vector_split(exts: list[int], lanes: int, max_fuse: int | None = None) -> tuple[int, int]:
    """(trailing loops to fuse, vector width) for a nest with extents ``exts``.

    The innermost loop alone when it has a power-of-2 divisor of at least half the lanes (at most one
    vector, or exactly two: odd widths like 19 lanes legalize into slow pieces; a predicated tail
    measured 2x slower than scalar code); else the fewest trailing loops (at most ``max_fuse``, all by
    default) whose product the lanes divide (a pad's bounds test over fused rows measured slower than
    short vectors: its caller passes 1); else (1, the best divisor).
    """
    inner = exts[-1]
    vt = 2 * lanes if inner % (2 * lanes) == 0 else max(d for d in _powers_of_two(lanes) if inner % d == 0)
    limit = len(exts) if max_fuse is None else max_fuse
    if vt >= max(2, lanes // 2) or limit < 2:
        return 1, vt
    n = inner
    for k in range(2, limit + 1):
        n *= exts[-k]
        if n % lanes == 0:
            return k, 2 * lanes if n % (2 * lanes) == 0 else lanes
    return 1, vt


def _powers_of_two(limit: int) -> list[int]:
    return [1 << i for i in range(limit.bit_length()) if 1 << i <= limit]

"""What a schedule rule needs to know about the target: vector width and core count."""

from __future__ import annotations

import dataclasses
import os


@dataclasses.dataclass(frozen=True)
class CPUFeatures:
    """Target facts the rules are parameterized by (x86 AVX-512: 512 bits; aarch64 NEON: 128 bits)."""

    vector_bits: int = 256
    cores: int = 1
    target: object = None  # the tvm Target, for rules that need more
    l2: int = 1 << 20  # bytes of L2 cache a core has (the target's ``l2`` feature when it gives one)

    def lanes(self, dtype_bits: int = 32) -> int:
        """Vector lanes for an element type of ``dtype_bits`` bits (at least 1)."""
        return max(1, self.vector_bits // max(1, dtype_bits))

    @property
    def max_accumulators(self) -> int:
        """Vector registers a register tile may use for accumulators: 24 of AVX-512's 32, else 12
        (leaving room for the loaded operands and broadcasts)."""
        return 24 if self.vector_bits >= 512 else 12

    @property
    def vector_registers(self) -> int:
        """Architectural vector registers: 32 with AVX-512 (zmm0-31), 16 with AVX/AVX2 and SSE."""
        return 32 if self.vector_bits >= 512 else 16


def as_target(target_spec):
    """A tvm Target from a graphopt TargetSpec, a tvm Target, a dict or a string name of a kind."""
    import tvm

    for attr in ("tvm_target", "target"):
        t = getattr(target_spec, attr, None)
        if t is not None and not isinstance(target_spec, tvm.target.Target):
            return t if isinstance(t, tvm.target.Target) else tvm.target.Target(t)
    if isinstance(target_spec, tvm.target.Target):
        return target_spec
    if target_spec is None:
        return tvm.target.Target({"kind": "llvm"})
    return tvm.target.Target(target_spec)


def llvm_vector_bits(target) -> int:
    """SIMD register width in bits of an llvm target, from the CPU features LLVM reports for it.

    TVM's ``llvm_get_vector_width`` is not usable for this: it answers 512 for every x86 CPU (AVX2-only
    znver3 and haswell, even plain x86-64), and a rule that plans AVX-512 register tiles on an AVX2 CPU
    spills half of its accumulators.
    """
    from tvm.target.codegen import llvm_get_cpu_features

    try:
        features = {str(f) for f in llvm_get_cpu_features(as_target(target))}
    except Exception:  # noqa: BLE001 - a target this LLVM cannot describe: the common 128-bit baseline
        return 128
    if "avx512f" in features:
        return 512
    if "avx" in features:
        return 256
    return 128  # SSE2 (every x86-64), NEON, or no SIMD we plan for


# LLVM CPU features -> the int8 dot product a kernel can use (``int8_dot.DOTS``), first match wins
INT8_DOT_FEATURES = (("vnni", ("avx512vnni", "avx512bw")), ("avxvnni", ("avxvnni",)), ("sdot", ("dotprod",)))


def int8_dot_kind(target_spec) -> str | None:
    """"vnni" (AVX-512 VNNI), "avxvnni" (AVX-VNNI), "sdot" (Arm ``+dotprod``) or None: the int8 dot
    product of an llvm target; a TargetSpec's ``features["int8_dot"]`` wins when present."""
    given = getattr(target_spec, "features", None)
    if isinstance(given, dict) and "int8_dot" in given:
        return given["int8_dot"] or None
    from tvm.target.codegen import llvm_get_cpu_features

    target = as_target(target_spec)
    if target.kind.name != "llvm":
        return None
    try:
        features = {str(f) for f in llvm_get_cpu_features(target)}
    except Exception:  # noqa: BLE001 - a target this LLVM cannot describe
        return None
    return next((kind for kind, needs in INT8_DOT_FEATURES if all(f in features for f in needs)), None)


def features_of(target_spec) -> CPUFeatures:
    """Read vector width and cores from a TargetSpec (its fields win) or from the tvm Target."""
    target = as_target(target_spec)
    given = getattr(target_spec, "features", None)
    given = dict(given) if isinstance(given, dict) else {}
    bits = given.get("vector_bits") or getattr(target_spec, "vector_bits", None)
    if not bits:
        bits = llvm_vector_bits(target)
    cores = given.get("cores") or getattr(target_spec, "cores", None)
    if not cores:
        nc = target.attrs.get("num-cores") if hasattr(target, "attrs") else None
        if nc:
            cores = int(nc)
        else:
            from graphopt.backends.bundle.loader import physical_cores

            cores = int(os.environ.get("TVM_NUM_THREADS") or physical_cores())
    l2 = int(given.get("l2") or CPUFeatures.l2)
    return CPUFeatures(vector_bits=int(bits), cores=max(1, int(cores)), target=target, l2=l2)


class Knobs:
    """A rule's decisions (tile sizes, plan, loop order, parallelism), each with its alternatives.

    A rule asks ``pick(name, default, options)`` where it would otherwise hard-code its heuristic. The
    answer is the heuristic's ``default`` unless ``choice`` (a tuning record) names another of
    ``options``; a choice that is not among them (a record from another shape or version) is ignored.
    Every pick is recorded in ``taken`` and ``options``: the schedule search (``tuning/search.py``)
    perturbs those to make candidates, so the rules are the starting point of tuning.
    """

    def __init__(self, choice: dict | None = None):
        self.choice = dict(choice or {})
        self.taken: dict = {}
        self.options: dict = {}

    def pick(self, name: str, default, options=()):
        opts = tuple(dict.fromkeys((default, *options)))
        value = self.choice.get(name, default)
        if value not in opts:
            value = default
        self.taken[name] = value
        self.options[name] = opts
        return value


@dataclasses.dataclass
class RuleContext:
    """What a rule gets besides the function: target features, which parameters are compile-time
    constants (their layout may change, see ``prepack``), attributes to set on the result, and the
    decisions to take (``knobs``: the defaults, or a tuning record's choice)."""

    feats: CPUFeatures
    constants: frozenset = frozenset()
    attrs: dict = dataclasses.field(default_factory=dict)
    knobs: Knobs = dataclasses.field(default_factory=Knobs)

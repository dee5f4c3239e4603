"""Pruning inside ``graphopt optimize`` (called by ``graphopt.compression.compress``): the ``--prune`` spec, the
channel or magnitude pass, teacher-guided reconstruction, and the ``--max-drop`` fallback that
lowers the pruning of the most sensitive layers until the metric is within budget.

Spec: ``channels:R`` or ``magnitude:R`` with ``R`` in [0, 1), then optional ``:l1``/``:l2`` (the
importance norm), for channels ``:mN`` (kept widths a multiple of N, default 16) and, for
magnitude, ``:global``/``:layer``; per-layer ratios come as
``--prune-layer NAME=R``. Channel groups are named by their first producing layer; a per-layer ratio
given to any layer of a group applies to the group.
"""

from __future__ import annotations

import dataclasses
import gzip
from typing import Any

import onnx_ir as ir

from graphopt.core.errors import UsageError

PRUNE_KINDS = ("channels", "magnitude")


@dataclasses.dataclass(frozen=True)
class PruneSpec:
    kind: str
    ratio: float
    norm: str = "l2"
    scope: str = "layer"
    layers: tuple[tuple[str, float], ...] = ()  # per-layer ratios
    multiple: int = 16  # channels: kept widths rounded up to a multiple of this (see prune_channels)


def _ratio(text: str, what: str) -> float:
    try:
        r = float(text)
    except ValueError:
        raise UsageError(f"{what}: ratio {text!r} is not a number") from None
    if not 0.0 <= r < 1.0:
        raise UsageError(f"{what}: ratio {r} is outside [0, 1)")
    return r


def parse_spec(text: str, layer_ratios=()) -> PruneSpec:
    """``channels:0.3[:l1]`` / ``magnitude:0.5[:l1][:global]`` and ``NAME=R`` strings, checked."""
    parts = str(text).split(":")
    if parts[0] not in PRUNE_KINDS or len(parts) < 2:
        raise UsageError(f"--prune {text}: expected channels:R or magnitude:R (R in [0, 1)), "
                         "optionally :l1|:l2 and, for magnitude, :global|:layer")
    ratio = _ratio(parts[1], f"--prune {text}")
    norm, scope, multiple = "l2", "layer", 16
    for opt in parts[2:]:
        if opt in ("l1", "l2"):
            norm = opt
        elif opt in ("global", "layer") and parts[0] == "magnitude":
            scope = opt
        elif parts[0] == "channels" and opt[:1] == "m" and opt[1:].isdigit() and int(opt[1:]) >= 1:
            multiple = int(opt[1:])
        else:
            raise UsageError(f"--prune {text}: unknown option {opt!r} (l1, l2" +
                             (", global, layer)" if parts[0] == "magnitude" else ", mN: widths a multiple of N)"))
    layers = []
    for item in layer_ratios:
        name, sep, r = str(item).rpartition("=")
        if not sep or not name:
            raise UsageError(f"--prune-layer {item}: expected NAME=R")
        layers.append((name, _ratio(r, f"--prune-layer {item}")))
    if not any(layers) and ratio == 0.0:
        raise UsageError(f"--prune {text}: ratio 0 and no --prune-layer prunes nothing")
    return PruneSpec(parts[0], ratio, norm, scope, tuple(layers), multiple)


def gzip_size(model: ir.Model) -> int:
    """Bytes of the serialized model after gzip (level 6): what unstructured zeros buy."""
    return len(gzip.compress(ir.serde.serialize_model(model).SerializeToString(), 6))


def flops(model: ir.Model) -> int | None:
    from graphopt.core.summary import summarize

    return summarize(model)["flops"]


class Pruner:
    """Prunes copies of one float model as a spec says, with extra per-layer ratios (the fallback)."""

    def __init__(self, model: ir.Model, spec: PruneSpec, *, exclude=(), data=None, reconstruct: bool = False,
                 show: bool = False):
        self.float_model, self.spec, self.exclude = model, spec, tuple(exclude)
        self.data, self.reconstruct, self.show = data, reconstruct, show
        probe = self._pass({})
        if spec.kind == "channels":
            probe.plan(model)  # checks names; lists the groups
            self.units = [r["group"] for r in probe.rows if r["kept"] < r["channels"]]
        else:
            self.units = [n.name for n, _ in probe.layers(model)]
        if not self.units:
            raise UsageError(f"--prune {spec.kind}:{spec.ratio}: no layer can be pruned "
                             "(every channel group is blocked or excluded, or the ratios keep every channel)")
        self.notes: dict[str, Any] = {}

    def _pass(self, overrides: dict[str, float]):
        layer_ratios = {**dict(self.spec.layers), **overrides}
        if self.spec.kind == "channels":
            from graphopt.passes.prune_channels import PruneChannelsPass

            return PruneChannelsPass(self.spec.ratio, overrides=layer_ratios, exclude=self.exclude,
                                     norm=self.spec.norm, multiple=self.spec.multiple, data=self.data,
                                     show=self.show)
        from graphopt.passes.prune_magnitude import PruneMagnitudePass

        return PruneMagnitudePass(self.spec.ratio, overrides=layer_ratios, exclude=self.exclude,
                                  norm=self.spec.norm, scope=self.spec.scope)

    def build(self, restored=(), *, reconstruct: bool | None = None) -> tuple[ir.Model, Any, Any]:
        """A pruned copy with the ``restored`` units unpruned; returns (model, prune pass, reconstruct pass)."""
        from graphopt.compression.compress import copy_model

        model = copy_model(self.float_model)
        p = self._pass({name: 0.0 for name in restored})
        p(model)
        rp = None
        if self.spec.kind == "channels" and (self.reconstruct if reconstruct is None else reconstruct) and p.kept:
            from graphopt.passes.reconstruct import ReconstructPass

            rp = ReconstructPass(self.float_model, self.data, p.kept, show=self.show)
            rp(model)
        return model, p, rp


def budget_fallback(pruner: Pruner, metric, max_drop: float, base: float):
    """Restore the most sensitive units (groups or layers) until the metric is within ``max_drop``."""
    from graphopt.compression.compress import fewest_within_budget, score

    model, p, rp = pruner.build()
    full = score(metric, model, "pruned")
    info: dict[str, Any] = {"float": base, "all_pruned": full, "max_drop": max_drop, "restored": []}
    if base - full <= max_drop:
        info.update(final=full, within_budget=True)
        return (model, p, rp), info
    units = pruner.units
    sens = {}
    for u in units:  # each unit pruned alone, without reconstruction (cheap)
        alone = pruner.build([v for v in units if v != u], reconstruct=False)[0]
        sens[u] = base - score(metric, alone, f"{u}-only pruned")
    ranked = sorted(units, key=lambda u: -sens[u])
    tried: dict[int, tuple[float, tuple]] = {}

    def attempt(k: int) -> bool:
        if k not in tried:
            built = pruner.build(ranked[:k])
            tried[k] = (score(metric, built[0], f"{k} layers restored"), built)
        return base - tried[k][0] <= max_drop

    hi = fewest_within_budget(len(ranked), attempt)
    final, built = tried[hi]
    info.update(final=final, within_budget=base - final <= max_drop, restored=ranked[:hi], sensitivity=sens,
                evaluated={str(k): v[0] for k, v in sorted(tried.items())})
    return built, info


def prune(model: ir.Model, spec: PruneSpec, *, exclude=(), data=None, reconstruct=False, metric=None,
          max_drop=None, base=None, show=False) -> tuple[ir.Model, dict[str, Any]]:
    """Prune ``model`` (not changed) as ``spec`` says; returns the pruned model and its report."""
    pruner = Pruner(model, spec, exclude=exclude, data=data, reconstruct=reconstruct, show=show)
    report: dict[str, Any] = {"kind": spec.kind, "ratio": spec.ratio, "norm": spec.norm}
    if max_drop is not None:
        (out, p, rp), report["budget"] = budget_fallback(pruner, metric, max_drop, base)
    else:
        out, p, rp = pruner.build()
    from graphopt.passes.parameter_sharing import ParameterSharingPass

    ParameterSharingPass()(out)  # weights that were one tensor before pruning are one again
    restored = set(report.get("budget", {}).get("restored", []))
    sens = report.get("budget", {}).get("sensitivity", {})
    rows = []
    for r in p.rows:
        name = r.get("group", r.get("layer"))
        row = dict(r)
        if name in restored:
            row["status"] = "kept (budget)"
        elif r.get("blocked"):
            row["status"] = "kept: " + r["blocked"]
        elif spec.kind == "channels":
            row["status"] = "pruned" if r["kept"] < r["channels"] else "kept"
        else:
            row["status"] = "zeroed" if r["zeroed"] else "kept"
        if name in sens:
            row["sensitivity"] = sens[name]
        if rp is not None:
            for layer in r.get("layers", ()):
                if layer in rp.errors:
                    row.setdefault("reconstruction", {})[layer] = [round(v, 5) for v in rp.errors[layer]]
        rows.append(row)
    report["layers"] = rows
    before, after = flops(model), flops(out)
    report["flops"] = {"before": before, "after": after}
    if spec.kind == "magnitude":
        zeros = sum(r["zeroed"] for r in p.rows)
        total = sum(r["weights"] for r in p.rows)
        report["sparsity"] = zeros / max(total, 1)
        report["gzip_bytes"] = {"before": gzip_size(model), "after": gzip_size(out)}
        report["note"] = ("unstructured zeros keep every shape: no CPU runtime runs the model faster for them; "
                          "they shrink only the compressed (gzip/zip) file")
    if rp is not None:
        report["reconstructed"] = len(rp.errors)
        report["reconstruction_skipped"] = dict(rp.skipped)
    if report["flops"]["before"] and report["flops"]["after"] is not None:
        report["flops"]["reduction"] = 1 - report["flops"]["after"] / report["flops"]["before"]
    return out, report

"""The configurations ``graphopt search`` tries: the space (a JSON file or the default), one
configuration, and the order they run in.

A space file is a JSON object of lists; every key is optional (the default's list is used)::

    {"quantize": ["none", "fp16", "int8"], "calibration-method": ["percentile", "mse"],
     "prune": [0, 0.1, 0.2], "reconstruct": [false, true], "fallback": [false, true],
     "prune-layer": [[], ["p2o.MatMul.8=0", "p2o.Conv.33=0"]]}

``quantize``: storage format (``none``, ``fp16``/``bf16`` weights, or a ``--quantize`` mode);
``calibration-method`` applies to int8; ``prune``: channel-pruning ratios (0 = unpruned);
``reconstruct``: refit pruned layers on the calibration data; ``fallback``: the ``--max-drop``
budget machinery (most sensitive layers kept float / groups left unpruned); ``prune-layer``: sets
of per-layer ratios (``NAME=R``) for pruned configurations. The product is expanded, and
combinations that mean the same model are one configuration (a method only for int8, reconstruction
only with pruning). The float model itself is the baseline, measured first, never a candidate.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import random
from typing import Any

from graphopt.compression.calibration import METHODS
from graphopt.compression.compress import QUANTIZE_MODES, WEIGHT_DTYPES
from graphopt.core.errors import UsageError
from graphopt.core.io import read_json_object

FORMATS = ("none", *WEIGHT_DTYPES, *QUANTIZE_MODES)
FALLBACK_FORMATS = ("int8", "int8-dynamic")  # formats the quantization budget fallback applies to

DEFAULT_SPACE: dict[str, tuple] = {
    "quantize": ("none", "fp16", "int8"),
    "calibration_method": ("percentile", "mse", "minmax"),
    "prune": (0.0, 0.1, 0.2, 0.3),
    "reconstruct": (False, True),
    "fallback": (False, True),
    "prune_layer": ((),),
}


@dataclasses.dataclass(frozen=True)
class Config:
    """One configuration: a storage format, a calibration method (int8), channel pruning."""

    quantize: str = "none"
    method: str | None = None
    prune: float = 0.0
    reconstruct: bool = False
    fallback: float = 0.0  # the --max-drop of the budget fallback, 0 without one
    prune_layers: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        """A unique, readable name (results are stored and resumed by it)."""
        parts = [self.quantize + (f"/{self.method}" if self.method else "")]
        if self.prune or self.prune_layers:
            parts.append(f"channels:{self.prune:g}" + ("+rec" if self.reconstruct else ""))
        if self.prune_layers:
            parts.append("layers[" + ",".join(self.prune_layers) + "]")
        if self.fallback:
            parts.append(f"fallback@{self.fallback:g}")
        return " ".join(parts)

    @property
    def label(self) -> str:
        """``key`` with a long per-layer list shortened (tables, plots)."""
        if self.is_baseline:
            return "float (no compression)"
        if len(self.prune_layers) <= 2:
            return self.key
        return self.key.replace("layers[" + ",".join(self.prune_layers) + "]", f"layers[{len(self.prune_layers)}]")

    @property
    def is_baseline(self) -> bool:
        return self.quantize == "none" and not self.pruned and not self.fallback

    @property
    def pruned(self) -> bool:
        return bool(self.prune or self.prune_layers)

    @property
    def needs_calibration(self) -> bool:
        return self.quantize == "int8" or self.reconstruct

    @property
    def twin(self) -> Config:
        """The same configuration without the fallback."""
        return dataclasses.replace(self, fallback=0.0)

    def as_dict(self) -> dict[str, Any]:
        return {"quantize": self.quantize, "calibration-method": self.method, "prune": self.prune,
                "reconstruct": self.reconstruct, "fallback": self.fallback, "prune-layer": list(self.prune_layers)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        return cls(d["quantize"], d.get("calibration-method"), float(d.get("prune", 0.0)),
                   bool(d.get("reconstruct")), float(d.get("fallback") or 0.0), tuple(d.get("prune-layer", ())))

    def options(self) -> dict[str, Any]:
        """The ``graphopt optimize`` options (config-file keys) of this configuration, calibration aside."""
        out: dict[str, Any] = {}
        if self.quantize in WEIGHT_DTYPES:
            out["weights"] = self.quantize
        elif self.quantize != "none":
            out["quantize"] = self.quantize
        if self.method:
            out["calibration-method"] = self.method
        if self.pruned:
            out["prune"] = f"channels:{self.prune:g}"
            if self.prune_layers:
                out["prune-layer"] = list(self.prune_layers)
            if self.reconstruct:
                out["reconstruct"] = True
        return out


BASELINE = Config()


def _norm_key(key: str) -> str:
    return str(key).lstrip("-").replace("-", "_")


def _check_list(path, key: str, values, check) -> tuple:
    if not isinstance(values, list) or not values:
        raise UsageError(f"--space {path}: {key!r} must be a non-empty list")
    out = []
    for v in values:
        problem = check(v)
        if problem:
            raise UsageError(f"--space {path}: {key!r} value {v!r}: {problem}")
        out.append(tuple(v) if isinstance(v, list) else v)
    return tuple(out)


def _ratio_problem(v) -> str | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
        return "expected a pruning ratio in [0, 1)"
    return None


def _layers_problem(v) -> str | None:
    if not isinstance(v, list) or not all(isinstance(s, str) and "=" in s for s in v):
        return "expected a list of NAME=R strings"
    return None


CHECKS = {
    "quantize": lambda v: None if v in FORMATS else f"expected one of {', '.join(FORMATS)}",
    "calibration_method": lambda v: None if v in METHODS else f"expected one of {', '.join(METHODS)}",
    "prune": _ratio_problem,
    "reconstruct": lambda v: None if isinstance(v, bool) else "expected true or false",
    "fallback": lambda v: None if isinstance(v, bool) else "expected true or false",
    "prune_layer": _layers_problem,
}


def load_space(path: str | os.PathLike | None) -> dict[str, tuple]:
    """The default space, with the lists a JSON space file gives in place of its own."""
    space = dict(DEFAULT_SPACE)
    if path is None:
        return space
    given = read_json_object(path, "--space", f"a JSON object of lists (keys: {', '.join(DEFAULT_SPACE)})")
    for key, values in given.items():
        k = _norm_key(key)
        if k not in CHECKS:
            raise UsageError(f"--space {path}: unknown key {key!r} (known: "
                             f"{', '.join(k.replace('_', '-') for k in CHECKS)})")
        space[k] = _check_list(path, key, values, CHECKS[k])
    return space


def expand(space: dict[str, tuple], max_drop: float) -> list[Config]:
    """Every distinct configuration of ``space`` (baseline first), in grid order: cheap ones first
    (no pruning, pruning, pruning with reconstruction, then fallbacks), lower pruning ratios first,
    configurations that share a pruned model next to each other, the unquantized one first."""
    seen: dict[str, Config] = {BASELINE.key: BASELINE}
    for q, m, r, rec, fb, layers in itertools.product(
            space["quantize"], space["calibration_method"], space["prune"], space["reconstruct"],
            space["fallback"], space["prune_layer"]):
        pruned = bool(r or layers)
        cfg = Config(q, m if q == "int8" else None, float(r), bool(rec and pruned),
                     max_drop if fb and (pruned or q in FALLBACK_FORMATS) else 0.0, tuple(layers) if pruned else ())
        seen.setdefault(cfg.key, cfg)
    configs = list(seen.values())
    quant_order = {q: i for i, q in enumerate(space["quantize"])}
    configs.sort(key=lambda c: (not c.is_baseline, c.fallback, c.reconstruct, c.pruned, c.prune_layers, c.prune,
                                c.quantize != "none", quant_order.get(c.quantize, 0)))
    return configs


def order(configs: list[Config], strategy: str, seed: int = 0) -> list[Config]:
    """``grid``: as expanded; ``random``: shuffled (seeded, so a rerun resumes the same sequence),
    the baseline first and fallbacks after the configurations they fall back from."""
    if strategy == "grid":
        return list(configs)
    if strategy != "random":
        raise UsageError(f"--strategy {strategy}: expected grid or random")
    base = [c for c in configs if c.is_baseline]
    plain = [c for c in configs if not c.is_baseline and not c.fallback]
    fallback = [c for c in configs if c.fallback]
    rng = random.Random(seed)
    rng.shuffle(plain)
    rng.shuffle(fallback)
    return base + plain + fallback

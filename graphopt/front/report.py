"""The pass report as a picture: node count and parameter bytes after each pass.

``plot_pass_report(report, path)`` takes the dict of :meth:`graphopt.front.api.OptimizeResult.report`
(``{"initial": {"nodes", "parameter_bytes"}, "passes": [{"name", "modified", "nodes",
"parameter_bytes", ...}, ...]}``) and writes a two-panel PNG atomically. Passes that modified the
model are drawn as filled markers, the others hollow.
"""

from __future__ import annotations

import io as _io
import os
from collections.abc import Mapping
from pathlib import Path

from graphopt.core.errors import UsageError

_BYTE_UNITS = ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB"), (1, "bytes"))


def _byte_unit(max_bytes: int) -> tuple[int, str]:
    for scale, unit in _BYTE_UNITS:
        if max_bytes >= scale:
            return scale, unit
    return 1, "bytes"


def _series(report: Mapping) -> tuple[list[str], list[int], list[int], list[bool]]:
    try:
        initial = report["initial"]
        rows = list(report["passes"])
        labels = ["(input)"] + [str(r["name"]) for r in rows]
        nodes = [int(initial["nodes"])] + [int(r["nodes"]) for r in rows]
        nbytes = [int(initial["parameter_bytes"])] + [int(r["parameter_bytes"]) for r in rows]
        modified = [True] + [bool(r.get("modified", True)) for r in rows]
    except (KeyError, TypeError, ValueError) as e:
        raise UsageError(
            f"pass report: expected {{'initial': {{'nodes', 'parameter_bytes'}}, 'passes': [...]}}: {e!r}"
        ) from None
    return labels, nodes, nbytes, modified


def plot_pass_report(report: Mapping, path: str | os.PathLike) -> Path:
    """Draw node count (top) and parameter bytes (bottom) after each pass; write PNG to ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from graphopt.core.io import atomic_write_bytes

    out = Path(path)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"--plot {out}: directory {parent} does not exist")
    labels, nodes, nbytes, modified = _series(report)
    scale, unit = _byte_unit(max(nbytes))
    xs = list(range(len(labels)))

    fig = Figure(figsize=(max(6.0, 0.35 * len(labels) + 2.0), 6.5), dpi=100)
    FigureCanvasAgg(fig)
    ax_nodes, ax_bytes = fig.subplots(2, 1, sharex=True)
    for ax, values, ylabel in (
        (ax_nodes, nodes, "nodes"),
        (ax_bytes, [b / scale for b in nbytes], f"parameters ({unit})"),
    ):
        ax.plot(xs, values, color="tab:blue", linewidth=1.2, drawstyle="steps-post", zorder=1)
        changed = [i for i in xs if modified[i]]
        unchanged = [i for i in xs if not modified[i]]
        ax.scatter(changed, [values[i] for i in changed], color="tab:blue", s=18, zorder=2,
                   label="modified")
        ax.scatter(unchanged, [values[i] for i in unchanged], facecolors="white",
                   edgecolors="tab:blue", s=18, zorder=2, label="unchanged")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    ax_nodes.set_title(
        f"nodes {nodes[0]} -> {nodes[-1]}, parameters {nbytes[0] / scale:.3g} -> "
        f"{nbytes[-1] / scale:.3g} {unit}"
    )
    ax_nodes.legend(loc="upper right", fontsize="small")
    ax_bytes.set_xticks(xs)
    ax_bytes.set_xticklabels(labels, rotation=60, ha="right", fontsize="small")
    ax_bytes.set_xlabel("after pass")
    fig.tight_layout()

    buf = _io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(out, buf.getvalue())
    return out

"""The search as a picture: the metric against latency (left) and against file size (right).

Every measured configuration is a point: filled within the accuracy budget, hollow grey over it; the
Pareto front (no other configuration both scores higher and is faster, or smaller) is a line through
its points; the budget is a dashed horizontal line at ``float score - max_drop``; the float model is
a black square and the best configuration a red star, both labelled. Written atomically as PNG.
"""

from __future__ import annotations

import io as _io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path


def pareto(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both (lower x, higher y), by increasing x."""
    idx = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best_y = [], float("-inf")
    for i in idx:
        if points[i][1] > best_y:
            front.append(i)
            best_y = points[i][1]
    return front


_BOX = {"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none", "alpha": 0.85}


def _panel(ax, rows, base, best, x_of, xlabel, max_drop, within) -> None:
    ok = [r for r in rows if within(r)]
    over = [r for r in rows if not within(r)]
    ax.scatter([x_of(r) for r in over], [r["score"] for r in over], facecolors="none", edgecolors="0.55",
               s=28, label="over budget", zorder=2)
    ax.scatter([x_of(r) for r in ok], [r["score"] for r in ok], color="tab:blue", s=28,
               label="within budget", zorder=3)
    pts = [(x_of(r), r["score"]) for r in rows]
    front = [rows[i] for i in pareto(pts)]
    ax.plot([x_of(r) for r in front], [r["score"] for r in front], color="tab:orange", linewidth=1.5,
            drawstyle="steps-post", marker="o", markersize=10, markerfacecolor="none",
            label="Pareto front", zorder=1)  # the rings show a front of one point too
    for i, r in enumerate(front):
        if r is not best:  # alternate below and above the line, on a light box, so that neighbours stay legible
            ax.annotate(r["label"], (x_of(r), r["score"]), textcoords="offset points",
                        xytext=(5, -12 if i % 2 == 0 else 6), fontsize=7, color="0.25", zorder=6, bbox=_BOX)
    ax.axhline(base["score"] - max_drop, color="tab:red", linestyle="--", linewidth=1,
               label=f"budget (float - {max_drop:g})")
    ax.scatter([x_of(base)], [base["score"]], marker="s", color="black", s=40, zorder=4, label="float model")
    ax.annotate("float", (x_of(base), base["score"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    if best is not None:
        ax.scatter([x_of(best)], [best["score"]], marker="*", color="tab:red", s=180, zorder=5, label="best")
        ax.annotate(best["label"], (x_of(best), best["score"]), textcoords="offset points", xytext=(-10, 16),
                    fontsize=8, color="tab:red", weight="bold", zorder=7, bbox=_BOX,
                    arrowprops={"arrowstyle": "-", "color": "tab:red", "linewidth": 0.8})
    ax.set_xlabel(xlabel)
    ax.grid(True, alpha=0.3)


def plot_search(rows: Sequence[Mapping], path: str | os.PathLike, *, baseline: Mapping, best: Mapping | None,
                max_drop: float, metric: str, latency: str) -> Path:
    """Draw the metric against latency and against size for ``rows`` (the measured configurations)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from graphopt.core.io import atomic_write_bytes

    rows = [r for r in rows if "error" not in r and r["key"] != baseline["key"]]
    base = dict(baseline)

    def ok(r):
        return r["drop"] <= max_drop + 1e-12

    fig = Figure(figsize=(13, 5.8), dpi=110)
    FigureCanvasAgg(fig)
    ax_lat, ax_size = fig.subplots(1, 2, sharey=True)
    _panel(ax_lat, rows, base, best, lambda r: r["latency_ms"], f"latency (ms; {latency})", max_drop, ok)
    _panel(ax_size, rows, base, best, lambda r: r["bytes"] / 1e6, "model file size (MB)", max_drop, ok)
    ax_lat.set_ylabel(f"{metric} (higher is better)")
    scores = [r["score"] for r in [*rows, base]]
    floor = base["score"] - max_drop
    low = min([s for s in scores if s >= floor - 4 * max_drop] + [floor])
    ax_lat.set_ylim(low - 0.6 * max_drop, base["score"] + 0.6 * max_drop)  # the budget band, not the wrecks
    hidden = sum(1 for s in scores if s < low - 0.6 * max_drop)
    title = f"{len(rows)} configurations; best: {best['label']}" if best else f"{len(rows)} configurations; none within budget"
    if hidden:
        title += f" ({hidden} scoring below the plotted range not shown)"
    fig.suptitle(title, fontsize=11)
    ax_size.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buf = _io.BytesIO()
    fig.savefig(buf, format="png")
    out = Path(path)
    atomic_write_bytes(out, buf.getvalue())
    return out

"""PNG charts (the one module that imports matplotlib; headless Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def line_chart(path: str | Path, title: str, xlabel: str, ylabel: str,
               series: dict[str, tuple[Sequence[float], Sequence[float | None]]], *, logx: bool = False,
               points: dict[str, tuple[float, float]] | None = None, xticks: Sequence[float] | None = None) -> Path:
    """One line per series (None values are gaps), plus single labelled points (methods with one budget)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for name, (xs, ys) in series.items():
        ax.plot(xs, [float("nan") if y is None else y for y in ys], marker="o", label=name)
    for name, (x, y) in (points or {}).items():
        ax.scatter([x], [y], marker="*", s=120, zorder=3, label=name)
    if logx:
        ax.set_xscale("log", base=2)
    if xticks is not None:
        ax.set_xticks(list(xticks), [str(x) for x in xticks])
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def bar_chart(path: str | Path, title: str, ylabel: str, groups: Sequence[str],
              series: dict[str, Sequence[float | None]], *, stacked: bool = False) -> Path:
    """Bars per group: side by side, or stacked (e.g. time per stage)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    n = max(len(series), 1)
    width = 0.8 if stacked else 0.8 / n
    bottom = [0.0] * len(groups)
    for i, (name, ys) in enumerate(series.items()):
        vals = [0.0 if y is None else float(y) for y in ys]
        xs = [g if stacked else g - 0.4 + width * (i + 0.5) for g in range(len(groups))]
        ax.bar(xs, vals, width, bottom=bottom if stacked else None, label=name)
        if stacked:
            bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xticks(range(len(groups)), list(groups))
    ax.set(title=title, ylabel=ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_accuracy(by_n: Sequence[dict[str, Any]], points: Sequence[tuple[str, float, float | None]], x_key: str,
                  path: Path) -> None:
    """Accuracy curves of `by_n` rows against N or tokens; `points` (label, accuracy, tokens) are single-run methods
    (greedy, beam, MCTS): horizontal lines against N, markers against tokens."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [row[x_key] for row in by_n]
    for key in by_n[0] if by_n else ():
        if key not in ("N", "tokens"):
            ax.plot(xs, [row[key] for row in by_n], marker="o", label=f"{key}@N")
    for (label, accuracy, tokens), marker, style in zip(points, "*Dsvp^", ("--", ":", "-.", (0, (5, 1)))):
        if x_key == "tokens":
            ax.scatter([tokens], [accuracy], marker=marker, s=120, color="black", label=label, zorder=3)
        else:
            ax.axhline(accuracy, color="black", linestyle=style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("samples per problem (N)" if x_key == "N" else "generated tokens per problem")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

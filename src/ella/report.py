"""The accuracy matrix as a text table and as a heat-map."""

from __future__ import annotations

from pathlib import Path

from .engine import SequenceResult


def format_matrix(result: SequenceResult) -> str:
    """Rows: zero-shot, then after each task; columns: the tasks; cells: accuracy in %."""
    names = result.tasks
    rows = ([("zero-shot", result.zero_shot)] if result.zero_shot is not None else [])
    rows += [(f"after {i + 1}: {names[i]}", row) for i, row in enumerate(result.matrix)]
    first = max(len(label) for label, _ in rows)
    widths = [max(6, len(name)) for name in names]
    lines = [" " * first + "  " + "  ".join(name.rjust(w) for name, w in zip(names, widths))]
    for label, row in rows:
        lines.append(label.ljust(first) + "  " + "  ".join(f"{v:.1f}".rjust(w) for v, w in zip(row, widths)))
    return "\n".join(lines)


def format_metrics(result: SequenceResult) -> str:
    summary = result.metrics()
    if summary is None:
        return f"{len(result.matrix)} of {len(result.tasks)} tasks done: no metrics yet"

    def show(name: str, signed: bool = False) -> str:
        value = summary[name]
        return f"{name} n/a" if value is None else f"{name} {value:+.1f}" if signed else f"{name} {value:.1f}"

    fwt = show("FWT", signed=True) + (" (vs zero-shot)" if summary["FWT"] is not None else "")
    return "  ".join([show("OA"), show("BWT", signed=True), fwt, show("forgetting")])


def plot_matrix(result: SequenceResult, path: str | Path, title: str = "") -> Path:
    """Heat-map of the accuracy matrix (the zero-shot row on top when present), saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = ([result.zero_shot] if result.zero_shot is not None else []) + result.matrix
    labels = (["zero-shot"] if result.zero_shot is not None else []) + \
        [f"after {i + 1}: {name}" for i, name in enumerate(result.tasks[:len(result.matrix)])]
    n = len(result.tasks)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * n, 0.9 + 0.5 * len(rows)))
    image = ax.imshow(rows, vmin=0, vmax=100, cmap="viridis", aspect="auto")
    ax.set_xticks(range(n), result.tasks, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), labels)
    for i, row in enumerate(rows):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.0f}", ha="center", va="center", color="white" if value < 60 else "black")
    ax.set_xlabel("evaluated task")
    ax.set_title(title or f"accuracy (%), {result.eval_mode}")
    fig.colorbar(image, ax=ax, fraction=0.04)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

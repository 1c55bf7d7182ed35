"""The field's metrics, as pure functions of the accuracy matrix.

``a[i][j]`` is the accuracy (%) on task j after training task i (0-based, N tasks); ``a`` is N x N: ella evaluates
every task after every task, the not-yet-seen ones too, unless an evaluation schedule leaves a row partial. A cell
that was not measured is None (NaN, as numpy marks a gap, is read as None): a scheduled row's cells other than
a[i][i], a continued run's earlier rows' cells of the tasks added later. The final row and the diagonal are always
measured; forgetting takes the measured cells only.
"""

from __future__ import annotations

import math
from statistics import mean


def _measured(value: float | None) -> bool:
    return value is not None and not math.isnan(value)


def average_accuracy(a: list[list[float | None]]) -> float:
    """OA = mean_j a[N-1][j]: accuracy over all tasks after the last one."""
    return mean(a[-1])


def backward_transfer(a: list[list[float | None]]) -> float | None:
    """BWT = mean_{j<N-1} (a[N-1][j] - a[j][j]); negative means forgetting. None for a single task."""
    n = len(a)
    return mean(a[n - 1][j] - a[j][j] for j in range(n - 1)) if n > 1 else None


def forward_transfer(a: list[list[float | None]], reference: list[float | None]) -> float | None:
    """FWT = mean_j (a[j][j] - reference[j]), over the tasks that have a reference (None where none has).

    ella's reference is the zero-shot accuracy of the base model before any training (SPEC.md also allows the
    accuracy of a model trained on task j alone); a task added by continuing a finished run has none (None).
    """
    gains = [a[j][j] - reference[j] for j in range(len(a)) if reference[j] is not None]
    return mean(gains) if gains else None


def forgetting(a: list[list[float | None]]) -> float | None:
    """F = mean_{j<N-1} max_{j<=i<N-1} a[i][j] - a[N-1][j]: the drop from the best accuracy a task had once
    learned. Rows before task j was learned do not count (the papers' matrices have only that lower triangle), nor
    do unmeasured (None) cells: with only the diagonal measured before the final row, F = -BWT.
    """
    n = len(a)
    if n < 2:
        return None
    return mean(max(a[i][j] for i in range(j, n - 1) if _measured(a[i][j])) - a[n - 1][j] for j in range(n - 1))


def summarize(a: list[list[float | None]], zero_shot: list[float | None] | None = None) -> dict:
    """OA, BWT, FWT (when the zero-shot row exists) and forgetting of an N x N matrix whose final row and diagonal
    are measured (other cells may be None)."""
    n = len(a)
    if not a or any(len(row) != n for row in a):
        raise ValueError(f"the metrics need an N x N accuracy matrix, got {n} rows of lengths "
                         f"{[len(row) for row in a]}")
    if zero_shot is not None and len(zero_shot) != n:
        raise ValueError(f"the zero-shot row has {len(zero_shot)} cells for {n} tasks")
    a = [[value if _measured(value) else None for value in row] for row in a]
    zero_shot = None if zero_shot is None else [value if _measured(value) else None for value in zero_shot]
    unmeasured = [f"a[{n - 1}][{j}]" for j in range(n) if a[-1][j] is None] + \
        [f"a[{j}][{j}]" for j in range(n - 1) if a[j][j] is None]
    if unmeasured:
        raise ValueError(f"the metrics need the final row and the diagonal measured; {', '.join(unmeasured)} "
                         "are None (or NaN)")
    return {
        "OA": average_accuracy(a),
        "BWT": backward_transfer(a),
        "FWT": forward_transfer(a, zero_shot) if zero_shot is not None else None,
        "forgetting": forgetting(a),
    }

"""Is a method's difference from a reference method (ELLA) real? Paired differences of OA and BWT with 95 %
confidence intervals, two ways:

- over runs: the runs of both methods at one (order, seed) saw the same training and test examples, so their
  difference is one paired observation; the interval is Student's t over those differences (mean ± t · s / √n,
  n − 1 degrees of freedom). It covers what varies between seeds and orders: the examples drawn, the
  initialisation, dropout, the task order. With a single pair there is no interval. The pairs are taken as
  independent, though the orders of one seed share that seed's examples (each task's sample depends on the seed
  and the task, not on the order).
- over test examples: a paired bootstrap. Each resample redraws, with replacement, every task's test examples (the
  same draw for both methods, for every cell of the task: its a[j][j] and its final a[N-1][j], and for every pair
  tested on that sample: the orders of a seed test a task on the same examples) and recomputes the mean
  difference; the interval is the resamples' 2.5th and 97.5th percentiles. It covers the finite test set only (the
  trained models fixed), so it is narrower when a few seeds hide much seed-to-seed spread.

A difference is called significant when the interval over runs excludes 0 (over test examples where there is
only one pair).
"""

from __future__ import annotations

import math
from statistics import mean, stdev

import numpy as np

from . import metrics
from .errors import EllaError

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0  # the resamples are the same at every call: a report reproduces exactly

# Student's t, 97.5th percentile, for 1-30 degrees of freedom (standard tables)
T_975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t_975(degrees_of_freedom: int) -> float:
    """Student's t 97.5th percentile: the table up to 30 degrees of freedom, beyond it the Cornish-Fisher
    expansion around the normal's 1.95996 (within 0.001 of the exact value there)."""
    if degrees_of_freedom < 1:
        raise ValueError(f"Student's t needs at least 1 degree of freedom, got {degrees_of_freedom}")
    if degrees_of_freedom <= len(T_975):
        return T_975[degrees_of_freedom - 1]
    z, v = 1.959964, degrees_of_freedom
    return z + (z ** 3 + z) / (4 * v) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * v ** 2)


def t_interval(differences: list[float]) -> tuple[float, float] | None:
    if len(differences) < 2:
        return None
    half = t_975(len(differences) - 1) * stdev(differences) / math.sqrt(len(differences))
    return mean(differences) - half, mean(differences) + half


def pair_runs(runs: list[dict], label: str, reference: str) -> list[tuple[dict, dict]]:
    """(run of ``label``, run of ``reference``) at each (order, seed) that both have."""
    def keyed(name):
        return {(str(r["run"].get("order")), r["run"].get("seed")): r for r in runs if r["label"] == name}
    own, ref = keyed(label), keyed(reference)
    return [(own[key], ref[key]) for key in sorted(own.keys() & ref.keys(), key=str)]


def _final_and_diagonal(run: dict) -> tuple[list[np.ndarray], list[np.ndarray]] | None:
    """Per task, its per-example scores after the last task and after its own task (None: not recorded)."""
    cells = run.get("example_scores")
    if not cells or any(cells[-1][j] is None or cells[j][j] is None for j in range(len(cells))):
        return None
    return [np.asarray(s) for s in cells[-1]], [np.asarray(cells[j][j]) for j in range(len(cells))]


def bootstrap_interval(pairs: list[tuple[dict, dict]]) -> dict[str, tuple[float, float]] | None:
    """The paired bootstrap over test examples of the mean difference in OA and BWT (see the module's text)."""
    scores = [(_final_and_diagonal(a), _final_and_diagonal(b)) for a, b in pairs]
    if not scores or any(a is None or b is None for a, b in scores):
        return None
    generator = np.random.default_rng(BOOTSTRAP_SEED)
    draws = {}  # (task, seed, examples) -> the resamples' example indices: one draw per test sample

    def drawn(task: str, seed, n: int) -> np.ndarray:
        if (task, seed, n) not in draws:
            draws[task, seed, n] = generator.integers(0, n, (BOOTSTRAP_RESAMPLES, n))
        return draws[task, seed, n]

    oa, bwt = np.zeros(BOOTSTRAP_RESAMPLES), np.zeros(BOOTSTRAP_RESAMPLES)
    for ((final_a, diagonal_a), (final_b, diagonal_b)), (run_a, run_b) in zip(scores, pairs):
        n = len(final_a)
        # every resample draws the same example indices from a task's four score lists: they must be as long
        if len(final_b) != n or any(len({len(final_a[j]), len(final_b[j]), len(diagonal_a[j]), len(diagonal_b[j])}) > 1
                                    for j in range(n)):
            raise EllaError(f"{run_a['label']} and {run_b['label']} at order {run_a['run'].get('order')}, seed "
                            f"{run_a['run'].get('seed')} were tested on different tasks or numbers of test examples "
                            f"({run_a['directory']}, {run_b['directory']}): they cannot be paired; report runs of "
                            "one protocol together")
        task_final, task_diagonal = np.zeros((BOOTSTRAP_RESAMPLES, n)), np.zeros((BOOTSTRAP_RESAMPLES, n))
        for j in range(n):
            indices = drawn(run_a["tasks"][j], run_a["run"].get("seed"), len(final_a[j]))
            task_final[:, j] = (final_a[j][indices] - final_b[j][indices]).mean(1)
            task_diagonal[:, j] = (diagonal_a[j][indices] - diagonal_b[j][indices]).mean(1)
        oa += task_final.mean(1)
        bwt += (task_final[:, :-1] - task_diagonal[:, :-1]).mean(1) if n > 1 else 0.0
    oa, bwt = oa / len(scores), bwt / len(scores)
    return {name: (float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5)))
            for name, values in (("OA", oa), ("BWT", bwt))}


def paired_difference(runs: list[dict], label: str, reference: str) -> dict | None:
    """``label`` − ``reference`` in OA and BWT: the mean over paired runs and both intervals (None: no pair; a
    metric is None where it is undefined, the BWT of a single task)."""
    pairs = pair_runs(runs, label, reference)
    if not pairs:
        return None
    bootstrap = bootstrap_interval(pairs)
    out = {"pairs": len(pairs)}
    for name, summary in (("OA", metrics.average_accuracy), ("BWT", metrics.backward_transfer)):
        values = [(summary(a["accuracy_matrix"]), summary(b["accuracy_matrix"])) for a, b in pairs]
        if any(None in pair for pair in values):  # BWT of a single task
            out[name] = None
            continue
        differences = [x - y for x, y in values]
        over_runs = t_interval(differences)
        over_examples = bootstrap[name] if bootstrap else None
        deciding = over_runs or over_examples
        out[name] = {"difference": mean(differences), "over_runs": over_runs, "over_examples": over_examples,
                     "significant": None if deciding is None else not deciding[0] <= 0 <= deciding[1]}
    return out


def verdict(label: str, reference: str, metric: str, result: dict) -> str:
    """One plain sentence about ``result[metric]``."""
    d = result[metric]
    if d is None:
        return f"{label} − {reference}, {metric}: undefined for these runs."
    where = "over runs" if d["over_runs"] else "over test examples"
    interval = d["over_runs"] or d["over_examples"]
    if interval is None:
        return f"{label} − {reference}, {metric}: {d['difference']:+.1f} from one pair, no interval."
    low, high = interval
    claim = "significant" if d["significant"] else "not significant"
    if d["difference"] == 0:
        size = f"equals {reference}'s"
    else:
        size = f"is {abs(d['difference']):.1f} points {'higher' if d['difference'] > 0 else 'lower'} than {reference}'s"
    return f"{label}'s {metric} {size} (95 % CI {where} [{low:+.1f}, {high:+.1f}], {result['pairs']} pair(s)): {claim}."

"""Paired differences against a reference method: intervals computed by hand."""

import math

import pytest

from ella import EllaError
from ella.comparison import bootstrap_interval, pair_runs, paired_difference, t_975, t_interval, verdict


def run(label, order, seed, matrix, example_scores=None, tasks=("dbpedia", "amazon")):
    return {"label": label, "run": {"order": order, "seed": seed}, "accuracy_matrix": matrix,
            "example_scores": example_scores, "tasks": list(tasks[:len(matrix)])}


def test_t_quantiles_match_the_tables():
    assert t_975(1) == 12.706 and t_975(8) == 2.306
    # beyond the table, the expansion against exact values: 31 -> 2.0395, 60 -> 2.0003, 120 -> 1.9799
    assert t_975(31) == pytest.approx(2.0395, abs=1e-3)
    assert t_975(60) == pytest.approx(2.0003, abs=1e-3)
    assert t_975(120) == pytest.approx(1.9799, abs=1e-3)
    with pytest.raises(ValueError, match="at least 1 degree of freedom"):
        t_975(0)


def test_t_interval_by_hand():
    low, high = t_interval([1.0, 2.0, 3.0])  # mean 2, s = 1, n = 3: 2 ± 4.303 / sqrt(3)
    assert (low, high) == pytest.approx((2 - 4.303 / math.sqrt(3), 2 + 4.303 / math.sqrt(3)))
    assert t_interval([5.0]) is None


def test_pairs_are_matched_by_order_and_seed():
    runs = [run("ella", 1, 42, [[50.0]]), run("ella", 1, 43, [[60.0]]), run("inclora", 1, 43, [[40.0]]),
            run("inclora", 2, 42, [[40.0]])]
    pairs = pair_runs(runs, "inclora", "ella")
    assert len(pairs) == 1 and pairs[0][0]["run"] == {"order": 1, "seed": 43} == pairs[0][1]["run"]


def test_paired_difference_over_runs():
    """OA = mean of the final row; BWT = mean_j<N-1 (a[N-1][j] - a[j][j]); differences 10 - 2 = 8, 6 - 2 = 4
    and 2 - 2 = 0 in OA: mean 4, s = 4, interval 4 ± 4.303 * 4 / sqrt(3)."""
    ref = [[80.0, 0.0], [80.0, 80.0]]  # OA 80, BWT 0
    runs = [run("ella", o, 42, ref) for o in (1, 2, 3)]
    runs += [run("inclora", 1, 42, [[90.0, 0.0], [70.0, 94.0]]),   # OA 82, BWT -20
             run("inclora", 2, 42, [[90.0, 0.0], [74.0, 86.0]]),   # OA 80, BWT -16
             run("inclora", 3, 42, [[90.0, 0.0], [78.0, 78.0]])]   # OA 78, BWT -12
    result = paired_difference(runs, "inclora", "ella")
    assert result["pairs"] == 3
    assert result["OA"]["difference"] == pytest.approx(0.0)
    half = 4.303 * 2 / math.sqrt(3)  # OA differences 2, 0, -2: s = 2
    assert result["OA"]["over_runs"] == pytest.approx((-half, half))
    assert result["OA"]["significant"] is False and result["OA"]["over_examples"] is None
    half = 4.303 * 4 / math.sqrt(3)  # BWT differences -20, -16, -12: mean -16, s = 4
    assert result["BWT"]["over_runs"] == pytest.approx((-16 - half, -16 + half))
    assert result["BWT"]["significant"] is True
    assert verdict("inclora", "ella", "BWT", result) == (
        f"inclora's BWT is 16.0 points lower than ella's (95 % CI over runs [{-16 - half:+.1f}, {-16 + half:+.1f}], "
        "3 pair(s)): significant.")
    assert paired_difference(runs, "olora", "ella") is None


def test_bootstrap_of_a_constant_difference_is_that_difference():
    """When every example's score differs by the same amount, every resample gives that amount: the interval is a
    point. Task 0 (scores such as ROUGE-L's): +50 on every example in the final row, +0 on its diagonal; task 1:
    +0. OA +25, BWT +50."""
    high, low, same = [75.0] * 8, [25.0] * 8, [60.0] * 8
    a = run("a", 1, 42, [[75.0, 0.0], [75.0, 60.0]], [[high, None], [high, same]])
    b = run("b", 1, 42, [[75.0, 0.0], [25.0, 60.0]], [[high, None], [low, same]])
    interval = bootstrap_interval([(a, b)])
    assert interval["OA"] == pytest.approx((25.0, 25.0))
    assert interval["BWT"] == pytest.approx((50.0, 50.0))


def test_bootstrap_interval_covers_the_observed_difference_and_is_reproducible():
    """Scores that differ on some examples only: the interval is not a point, holds the observed difference,
    and is the same at every call (the resamples are seeded)."""
    a_final = [[100.0] * 6 + [0.0] * 4, [100.0] * 10]
    b_final = [[100.0] * 3 + [0.0] * 7, [100.0] * 10]
    a = run("a", 1, 42, [[60.0, 0.0], [60.0, 100.0]], [[a_final[0], None], a_final])
    b = run("b", 1, 42, [[30.0, 0.0], [30.0, 100.0]], [[b_final[0], None], b_final])
    interval = bootstrap_interval([(a, b)])
    low, high = interval["OA"]
    assert low < 15.0 < high and low < high  # observed OA difference (60 + 100)/2 - (30 + 100)/2 = 15
    assert interval == bootstrap_interval([(a, b)])
    assert bootstrap_interval([(run("a", 1, 42, [[1.0]]), b)]) is None  # no per-example scores recorded


def test_bootstrap_draws_a_test_sample_once_for_every_pair_tested_on_it():
    """Orders 1 and 2 of seed 42 test dbpedia on the same examples: a resample draws them once for both pairs.
    Here a beats b by 100 on examples 0 and 2 in order 1 and loses by as much in order 2, so every resample's mean
    difference is 0; at two seeds (two samples, drawn apart) it is not."""
    wins, zeros = [[[100.0, 0.0, 100.0, 0.0]]], [[[0.0] * 4]]
    pairs = [(run("a", 1, 42, [[50.0]], wins, ["dbpedia"]), run("b", 1, 42, [[0.0]], zeros, ["dbpedia"])),
             (run("a", 2, 42, [[0.0]], zeros, ["dbpedia"]), run("b", 2, 42, [[50.0]], wins, ["dbpedia"]))]
    assert bootstrap_interval(pairs)["OA"] == pytest.approx((0.0, 0.0))
    pairs[1][0]["run"]["seed"] = pairs[1][1]["run"]["seed"] = 43
    low, high = bootstrap_interval(pairs)["OA"]
    assert low < 0.0 < high


def test_an_equal_result_is_said_so():
    runs = [run("ella", o, 42, [[50.0]]) for o in (1, 2)] + [run("inclora", o, 42, [[50.0]]) for o in (1, 2)]
    result = paired_difference(runs, "inclora", "ella")
    assert verdict("inclora", "ella", "OA", result) == (
        "inclora's OA equals ella's (95 % CI over runs [+0.0, +0.0], 2 pair(s)): not significant.")
    assert result["BWT"] is None  # one task: no BWT
    assert verdict("inclora", "ella", "BWT", result) == "inclora − ella, BWT: undefined for these runs."


def test_runs_of_different_sizes_are_refused_with_a_message():
    a = run("a", 1, 42, [[50.0]], [[[100.0, 0.0]]])
    b = run("b", 1, 42, [[50.0]], [[[100.0, 0.0, 50.0, 50.0]]])
    a["directory"], b["directory"] = "runs/a", "runs/b"
    with pytest.raises(EllaError, match="a and b at order 1, seed 42 were tested on different .*\(runs/a, runs/b\)"):
        bootstrap_interval([(a, b)])


def test_a_diagonal_cell_of_another_size_is_refused_too():
    # the same final row in both runs, but b's first task was tested on 4 examples after its own task
    a = run("a", 1, 42, [[50.0, None], [50.0, 50.0]], [[[100.0, 0.0], None], [[100.0, 0.0], [100.0, 0.0]]])
    b = run("b", 1, 42, [[50.0, None], [50.0, 50.0]],
            [[[100.0, 0.0, 50.0, 50.0], None], [[100.0, 0.0], [100.0, 0.0]]])
    a["directory"], b["directory"] = "runs/a", "runs/b"
    with pytest.raises(EllaError, match="cannot be paired"):
        bootstrap_interval([(a, b)])

import pytest

from ella.metrics import average_accuracy, backward_transfer, forgetting, forward_transfer, summarize

# a[i][j]: accuracy on task j after training task i. a[0][1] = 99 is measured before task 1 was learned:
# forgetting must not count it.
A = [[80.0, 99.0, 20.0],
     [85.0, 70.0, 30.0],
     [50.0, 65.0, 90.0]]
ZERO_SHOT = [5.0, 10.0, 15.0]


def test_oa_is_the_mean_of_the_last_row():
    assert average_accuracy(A) == pytest.approx((50 + 65 + 90) / 3)


def test_bwt_compares_the_last_row_with_the_diagonal():
    assert backward_transfer(A) == pytest.approx(((50 - 80) + (65 - 70)) / 2)  # -17.5


def test_fwt_against_zero_shot():
    assert forward_transfer(A, ZERO_SHOT) == pytest.approx(((80 - 5) + (70 - 10) + (90 - 15)) / 3)  # 70


def test_forgetting_takes_the_best_accuracy_after_learning():
    # task 0: best 85 (after task 1), ends at 50 -> 35; task 1: best 70 (the 99 before learning it is not counted),
    # ends at 65 -> 5.
    assert forgetting(A) == pytest.approx((35 + 5) / 2)


def test_summary_and_single_task():
    summary = summarize(A, ZERO_SHOT)
    assert summary == pytest.approx({"OA": 205 / 3, "BWT": -17.5, "FWT": 70.0, "forgetting": 20.0})
    assert summarize([[42.0]]) == {"OA": 42.0, "BWT": None, "FWT": None, "forgetting": None}
    with pytest.raises(ValueError):
        summarize(A[:2])


# The same run evaluated on a schedule: before the final row only the diagonal (and a[1][0]) was measured.
SCHEDULED = [[80.0, None, None],
             [85.0, 70.0, None],
             [50.0, 65.0, 90.0]]


def test_metrics_of_a_matrix_with_unmeasured_cells():
    # OA and BWT read only measured cells: as for A. Forgetting: task 0 best 85 -> 35, task 1 best 70 -> 5.
    assert summarize(SCHEDULED, ZERO_SHOT) == pytest.approx({"OA": 205 / 3, "BWT": -17.5, "FWT": 70.0,
                                                              "forgetting": 20.0})
    diagonal = [[80.0, None, None], [None, 70.0, None], [50.0, 65.0, 90.0]]
    assert forgetting(diagonal) == pytest.approx(((80 - 50) + (70 - 65)) / 2)  # = -BWT


def test_the_final_row_and_the_diagonal_must_be_measured():
    with pytest.raises(ValueError, match=r"a\[1\]\[1\] are None"):
        summarize([[80.0, None, None], [None, None, None], [50.0, 65.0, 90.0]])
    with pytest.raises(ValueError, match=r"a\[2\]\[0\] are None"):
        summarize([[80.0, None, None], [None, 70.0, None], [None, 65.0, 90.0]])


def test_nan_is_read_as_an_unmeasured_cell_and_the_zero_shot_row_must_fit():
    nan = float("nan")  # how numpy marks a gap
    as_nan = [[80.0, nan, nan], [nan, 70.0, nan], [50.0, 65.0, 90.0]]
    assert summarize(as_nan) == summarize([[v if v == v else None for v in row] for row in as_nan])
    assert summarize(as_nan)["forgetting"] == pytest.approx(17.5)
    with pytest.raises(ValueError, match=r"a\[0\]\[0\] are None \(or NaN\)"):
        summarize([[nan, 1.0], [40.0, 60.0]])
    with pytest.raises(ValueError, match="the zero-shot row has 1 cells for 2 tasks"):
        summarize([[50.0, None], [40.0, 60.0]], [10.0])

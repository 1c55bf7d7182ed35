"""Each answer metric against values computed by hand."""

import pytest

from ella.data import Example, load_cl_benchmark
from ella.scores import ANSWER_METRICS, choice, edit_similarity, exact_match, number, rouge_l, sari


def test_exact_match_accepts_any_reference():
    example = Example("q", "POS", ("positive",))
    assert exact_match("Positive.", example) == 100.0 and exact_match("negative", example) == 0.0


def test_rouge_l_is_the_lcs_f1():
    # LCS("the cat sat on the mat", "the cat on the mat") = 5 tokens: P = 5/5, R = 5/6, F1 = 10/11
    assert rouge_l("the cat on the mat", Example("", "the cat sat on the mat")) == pytest.approx(100 * 10 / 11)
    assert rouge_l("a b", Example("", "x y", ("a b c",))) == pytest.approx(100 * 0.8)  # best reference: 2/2, 2/3


def test_choice_number_and_edit_similarity():
    assert choice(" b. hawkish", Example("", "B\nbecause ...")) == 100.0
    assert choice("C", Example("", "B")) == 0.0
    assert number("The answer is 6 eyes", Example("", "6")) == 100.0
    assert number("6.5", Example("", "6")) == 0.0 and number("none", Example("", "6")) == 0.0
    # Indel similarity: 2 * matches / total length = 2 * 3 / 8
    assert edit_similarity("abcd", Example("", "abce")) == pytest.approx(75.0)


def test_sari_by_hand():
    # source "a b c", reference "a b d". Copying the source: keep F1 per n = (0.8, 2/3, 0, 1), deletion precision
    # 1 (nothing deleted), addition F1 (0, 0, 0, 1): SARI = (0.61667 + 1 + 0.25) / 3
    example = Example("a b c", "a b d")
    assert sari("a b c", example) == pytest.approx(100 * ((0.8 + 2 / 3 + 0 + 1) / 4 + 1 + 0.25) / 3)
    assert sari("a b d", example) == pytest.approx(100.0)  # the reference itself: every component is 1


def test_every_task_metric_is_registered(data_dir):
    for benchmark in ("superni", "trace"):
        for task in load_cl_benchmark(benchmark, data_dir=data_dir, train_per_task=1, test_per_task=1):
            assert task.metric in ANSWER_METRICS

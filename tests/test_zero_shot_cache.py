"""Zero-shot accuracies measured once and reused (``ella.zero_shot_cache``): a run reads an accuracy measured in the
same conditions instead of measuring it, gets the accuracy it would have measured, and says where it came from;
anything that changes what the base model would score measures it anew."""

import json
from dataclasses import replace

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState

from ella import EvaluationConfig, TrainingConfig, engine, get_method, run_sequence, zero_shot_cache
from ella.data import TaskEncoder
from ella.models import tiny_model

from conftest import one_label_task

TRAINING = TrainingConfig(batch_size=4, learning_rate=3e-2, warmup_ratio=0.0, mixed_precision="no", max_length=64)
SETTINGS = {"mode": "rank", "batch_size": 8}


def three_tasks():
    return [one_label_task("colour", ["red", "blue"], "red"), one_label_task("parity", ["even", "odd"], "even"),
            one_label_task("size", ["small", "big"], "small")]


def run(tasks, method, output_dir=None, cache=None):
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    model, tokenizer = tiny_model()
    return run_sequence(model, tokenizer, tasks, get_method(method), TRAINING,
                        EvaluationConfig(mode="rank", schedule="diagonal"), output_dir, zero_shot_cache_dir=cache)[1]


@pytest.fixture
def measured(monkeypatch) -> list[str]:
    """The tasks whose zero-shot accuracy the runs measure."""
    names = []
    evaluate = engine.evaluate_sequence

    def counting(model, tokenizer, tasks, encoders, evaluation, accelerator, label):
        if label == "zero-shot":
            names.extend(task.name for task in tasks)
        return evaluate(model, tokenizer, tasks, encoders, evaluation, accelerator, label)

    monkeypatch.setattr(engine, "evaluate_sequence", counting)
    return names


def test_a_later_run_reads_the_row_another_method_and_order_measured(tmp_path, measured, capsys):
    cache = tmp_path / "cache"
    first = run(three_tasks(), "seqft", tmp_path / "seqft", cache)
    assert first.zero_shot == [80, 20, 20] and first.zero_shot_reused == {}
    assert measured == ["colour", "parity", "size"] and len(list(cache.glob("*.json"))) == 3

    reversed_order = three_tasks()[::-1]
    capsys.readouterr()
    second = run(reversed_order, "inclora", tmp_path / "inclora", cache)
    shown = "zero-shot, measured in earlier runs: size 20.0  parity 20.0  colour 80.0 (in …/seqft)"
    assert shown in capsys.readouterr().out
    assert measured == ["colour", "parity", "size"]  # nothing measured again
    assert second.zero_shot == [20, 20, 80] == run(reversed_order, "inclora").zero_shot  # as measured afresh
    # outside the working directory a run's path is recorded as …/seqft
    assert second.zero_shot_reused == {"colour": "…/seqft", "parity": "…/seqft", "size": "…/seqft"}
    record = json.loads((tmp_path / "inclora" / "results.json").read_text())
    assert record["zero_shot_reused_from"] == second.zero_shot_reused
    assert "zero_shot_reused_from" not in json.loads((tmp_path / "seqft" / "results.json").read_text())


def test_only_the_missing_task_is_measured_and_a_broken_entry_is_measured_again(tmp_path, measured):
    cache = tmp_path / "cache"
    run(three_tasks()[:2], "seqft", None, cache)  # colour and parity
    [broken] = [p for p in cache.glob("*.json") if json.loads(p.read_text())["task"] == "parity"]
    broken.write_text("{not json")
    result = run(three_tasks(), "seqft", None, cache)
    assert measured == ["colour", "parity", "parity", "size"] and result.zero_shot == [80, 20, 20]
    assert list(result.zero_shot_reused) == ["colour"] and result.zero_shot_reused["colour"] is None  # no directory
    assert json.loads(broken.read_text())["accuracy"] == 20  # rewritten


def keys(model, tokenizer, tasks, settings=SETTINGS):
    encoders = [TaskEncoder(tokenizer, task, 64, False) for task in tasks]
    return zero_shot_cache.task_keys(model, tokenizer, tasks, encoders, settings)


def test_keys_change_with_anything_the_accuracy_depends_on():
    model, tokenizer = tiny_model()
    tasks = three_tasks()
    base = keys(model, tokenizer, tasks)
    assert len(set(base)) == 3 and keys(*tiny_model(), tasks) == base  # the same weights, the same keys
    assert set(keys(*tiny_model(seed=1), tasks)).isdisjoint(base)  # other weights
    changed_test = [replace(tasks[0], test=tasks[0].test[:-1])] + tasks[1:]
    assert keys(model, tokenizer, changed_test)[1:] == base[1:] and keys(model, tokenizer, changed_test)[0] != base[0]
    assert set(keys(model, tokenizer, tasks, {**SETTINGS, "batch_size": 4})).isdisjoint(base)
    with_label = [replace(tasks[0], labels=["red", "blue", "green"])] + tasks[1:]
    assert keys(model, tokenizer, with_label)[0] != base[0]
    assert keys(model, tokenizer, with_label)[1:] == base[1:]
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1e-6  # one weight, a little
    assert set(keys(model, tokenizer, tasks)).isdisjoint(base)

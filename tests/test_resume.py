"""A run interrupted after a task resumes from its checkpoint and ends exactly as the uninterrupted run."""

import json

import pytest

from ella import EllaError, EvaluationConfig, TrainingConfig, get_method, run_sequence
from ella import engine
from ella.checkpoint import CHECKPOINT
from ella.models import tiny_model

SETTINGS = dict(training=TrainingConfig(batch_size=4, learning_rate=1e-2, mixed_precision="no"),
                evaluation=EvaluationConfig(mode="rank"))


def crash_at_second_task(monkeypatch):
    real_train_task = engine.train_task

    def train_task(model, method, task_index, *args):
        if task_index == 1:
            raise KeyboardInterrupt("the machine went away")
        return real_train_task(model, method, task_index, *args)

    monkeypatch.setattr(engine, "train_task", train_task)


@pytest.mark.parametrize("method_name", ["seqlora", "ella", "replay"])  # a live adapter, W_past, a data buffer
def test_resumed_run_equals_the_uninterrupted_run(tasks, tmp_path, monkeypatch, method_name):
    model, tokenizer = tiny_model()
    _, expected = run_sequence(model, tokenizer, tasks, get_method(method_name, lam=10.0) if method_name == "ella"
                               else get_method(method_name), **SETTINGS)

    out = tmp_path / "run"
    make = (lambda: get_method(method_name, lam=10.0)) if method_name == "ella" else (lambda: get_method(method_name))
    with monkeypatch.context() as patch:
        crash_at_second_task(patch)
        with pytest.raises(KeyboardInterrupt):
            run_sequence(tiny_model()[0], tokenizer, tasks, make(), output_dir=out, **SETTINGS)
    interrupted = json.loads((out / "results.json").read_text())
    assert interrupted["status"] == "running" and interrupted["tasks_done"] == 1
    assert (out / CHECKPOINT / "model.safetensors").is_file()

    _, resumed = run_sequence(tiny_model()[0], tokenizer, tasks, make(), output_dir=out, resume=True, **SETTINGS)
    assert resumed.matrix == expected.matrix and resumed.zero_shot == expected.zero_shot
    final = json.loads((out / "results.json").read_text())
    assert final["status"] == "complete" and final["accuracy_matrix"] == expected.matrix
    assert not (out / CHECKPOINT).exists()  # removed once the run is complete


def test_resume_refuses_other_settings(tasks, tmp_path):
    model, tokenizer = tiny_model()
    out = tmp_path / "run"
    run_sequence(model, tokenizer, tasks, get_method("inclora"), output_dir=out, **SETTINGS)
    with pytest.raises(EllaError, match="other settings \\(method differ"):
        run_sequence(tiny_model()[0], tokenizer, tasks, get_method("inclora", lora_r=4), output_dir=out,
                     resume=True, **SETTINGS)


def test_resuming_a_complete_run_trains_nothing(tasks, tmp_path, monkeypatch):
    model, tokenizer = tiny_model()
    out = tmp_path / "run"
    _, first = run_sequence(model, tokenizer, tasks, get_method("inclora"), output_dir=out, **SETTINGS)
    monkeypatch.setattr(engine, "train_task", lambda *args: pytest.fail("a complete run must not train"))
    _, again = run_sequence(tiny_model()[0], tokenizer, tasks, get_method("inclora"), output_dir=out, resume=True,
                            **SETTINGS)
    assert again.matrix == first.matrix

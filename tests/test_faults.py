"""Faults during a run: a diverging loss, an output directory that cannot be written, a state of another model.
Each stops with a message that says what happened, and what was saved before stays resumable."""

import errno
import json

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from ella import EllaError, EvaluationConfig, TrainingConfig, get_method, run_sequence
from ella import checkpoint, engine
from ella.engine import TrainingDiverged
from ella.methods import TaskData
from ella.models import tiny_model

from conftest import toy_tasks, with_crash_in_second_task

SETTINGS = dict(training=TrainingConfig(batch_size=4, learning_rate=1e-2, mixed_precision="no"),
                evaluation=EvaluationConfig(mode="rank"))


def run(output_dir, method=None, **options):
    model, tokenizer = tiny_model()
    settings = {**SETTINGS, **options}
    return run_sequence(model, tokenizer, toy_tasks(8, 4), method or get_method("ella", lam=10.0),
                        output_dir=output_dir, **settings)


def test_an_absurd_learning_rate_stops_with_the_task_the_step_and_the_value(tmp_path):
    training = TrainingConfig(batch_size=2, learning_rate=1e12, mixed_precision="no", max_grad_norm=0)
    with pytest.raises(TrainingDiverged, match=r"task 1 \(colour\) at step \d+ of 4: the loss is (nan|inf)"):
        run(tmp_path / "run", get_method("seqlora"), training=training)


def test_a_non_finite_penalty_stops_the_run_and_the_finished_task_stays_resumable(tmp_path):
    """λ = ∞ on the second task: ∞ · 0 is NaN at its first step. The first task's commit is intact."""
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"task 2 \(parity\) at step 1 of 2: the loss is [\d.]+ and the "
                                               r"penalty nan"):
        run(out, get_method("ella", lam=[10.0, float("inf")]))
    record = json.loads((out / checkpoint.RESULTS).read_text())
    assert record["status"] == "running" and record["tasks_done"] == 1
    assert checkpoint.commits(out) == [(1, checkpoint.commit_dir(out, 1))]


def test_a_transient_nan_resumes_to_the_uninterrupted_run(tmp_path, monkeypatch):
    _, expected = run(tmp_path / "whole")
    real, calls = engine.answer_token_nll, []

    def nan_once_in_the_second_task(model, batch):
        nll, mask = real(model, batch)
        calls.append(1)
        return (nll * float("nan"), mask) if len(calls) == 4 else (nll, mask)  # task 2, step 2

    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(engine, "answer_token_nll", nan_once_in_the_second_task)
        with pytest.raises(TrainingDiverged, match="task 2 .* at step 2"):
            run(out)
    _, resumed = run(out, resume=True)
    assert resumed.matrix == expected.matrix
    assert (out / checkpoint.METHOD_STATE).read_bytes() == (tmp_path / "whole" / checkpoint.METHOD_STATE).read_bytes()


def test_an_output_directory_that_cannot_be_written_is_refused_before_training(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setattr(engine, "train_task", lambda *args: pytest.fail("nothing may train"))
    with pytest.raises(EllaError, match="cannot write to the output directory .*a-file/run"):
        run(blocker / "run")


def test_a_full_disk_at_a_save_keeps_the_previous_task_intact(tmp_path, monkeypatch):
    out = tmp_path / "run"
    _, expected = run(tmp_path / "whole")
    real_write = checkpoint.write_file

    def disk_full_in_the_second_save(path, write):
        if path.parent.name == "after-task-2.partial" and path.name == checkpoint.METHOD_STATE:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, write)

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint, "write_file", disk_full_in_the_second_save)
        with pytest.raises(checkpoint.SaveError, match="could not save task 2 .*No space left on device.*its first "
                                                       "1 task\\(s\\) are saved intact"):
            run(out)
    assert [n for n, _ in checkpoint.commits(out)] == [1] and not list((out / "progress").glob("*.partial"))
    _, resumed = run(out, resume=True)
    assert resumed.matrix == expected.matrix


@pytest.mark.parametrize("method_name", ["ella", "jumplora-ella", "olora", "inflora", "ewc"])
@pytest.mark.parametrize("other", ["t5", "wider"])
def test_a_state_saved_for_another_model_is_refused_clearly(tasks, method_name, other):
    """A state from a run on tiny-causal, loaded for a T5 (other module names) or a wider LLaMA (other shapes)."""
    model, tokenizer = tiny_model()
    first = get_method(method_name)
    run_sequence(model, tokenizer, tasks[:1], first, TrainingConfig(batch_size=4, mixed_precision="no"),
                 EvaluationConfig(mode="rank", zero_shot=False))
    state = first.state_dict()
    assert state
    if other == "t5":
        target, target_tokenizer = tiny_model(seq2seq=True)
    else:
        target = LlamaForCausalLM(LlamaConfig(**{**model.config.to_dict(), "hidden_size": 48, "head_dim": 12}))
    method = get_method(method_name)
    method.setup(target, tasks)
    method.load_state_dict(state)
    data = TaskData([], 4, lambda **kwargs: iter([]))
    with pytest.raises(EllaError, match="state does not fit this model"):
        method.prepare(target, 1, tasks[1], data)


def test_a_resumed_run_refuses_a_model_state_of_another_shape(tmp_path):
    """A commit whose model file does not fit (as if the files had been swapped) is refused, not half loaded."""
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        with_crash_in_second_task(lambda: run(out, get_method("seqlora")))
    saved = checkpoint.SavedRun({}, checkpoint.commit_dir(out, 1))
    wider = LlamaForCausalLM(LlamaConfig(**{**tiny_model()[0].config.to_dict(), "hidden_size": 48, "head_dim": 12}))
    with pytest.raises(EllaError, match="does not fit this model"):
        saved.load_model(wider)

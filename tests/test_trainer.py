"""ella's methods inside Hugging Face Trainer (and TRL's SFTTrainer): every method on the tiny model with a user's own
data pipeline, the same training as `ella run` on the same data and settings, and SmolLM2 through two real tasks."""

import pytest
import torch
from transformers import DataCollatorForSeq2Seq, TrainingArguments

from conftest import toy_tasks
from ella import (ContinualTrainer, EllaError, EvaluationConfig, TrainingConfig, get_method, load_cl_benchmark,
                  load_model, run_sequence, run_sequence_with_trainer, task_data, trainer_steps, training_arguments)
from ella.methods import METHODS
from ella.models import tiny_model

HOOKS = ("prepare", "penalty", "after_backward", "after_step", "finish")


def count_hooks(method) -> dict[str, int]:
    """Count the calls of the method's hooks (wrapping them on the instance; the method itself is unchanged)."""
    calls = dict.fromkeys(HOOKS, 0)
    for hook in HOOKS:
        real = getattr(method, hook)

        def counted(*args, _real=real, _hook=hook, **kwargs):
            calls[_hook] += 1
            return _real(*args, **kwargs)

        setattr(method, hook, counted)
    return calls


def user_rows(task, tokenizer) -> list[dict]:
    """A user's own tokenization: prompt + answer + EOS, the loss on the answer only (no ella encoder)."""
    rows = []
    for example in task.train:
        prompt = tokenizer(f"{task.prefix}{example.input}\nAnswer:").input_ids
        answer = tokenizer(" " + example.output, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        rows.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})
    return rows


def merged_weights(model) -> dict[str, torch.Tensor]:
    model = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


@pytest.mark.parametrize("method_name", sorted(METHODS) + ["inclora+ella+replay", "jumplora+olora"])
def test_every_method_trains_inside_a_trainer_with_the_users_pipeline(tmp_path, method_name):
    tasks = toy_tasks()
    model, tokenizer = tiny_model()
    before = merged_weights(model)
    method = get_method(method_name)
    calls = count_hooks(method)
    args = training_arguments(TrainingConfig(batch_size=4, mixed_precision="no"), method, str(tmp_path))
    model, result = run_sequence_with_trainer(
        model, tokenizer, tasks, method, args, train_datasets=[user_rows(task, tokenizer) for task in tasks],
        data_collator=DataCollatorForSeq2Seq(tokenizer), warmup_ratio=0.1)  # no warm-up step of 3, as ella run
    steps = [log["optimizer_steps"] for log in result.task_logs]
    trained = [log for log in result.task_logs if log["optimizer_steps"]]
    assert all(log["optimizer_steps"] == trainer_steps(log["examples"], args) for log in trained)
    assert sum(steps) > 0 and (method_name != "mtl" or steps[1] == 0)  # MTL learns everything at the first task
    # the per-step hooks once per optimiser step (JumpLoRA's ramp needs after_step), prepare/finish once per task
    assert calls == {"prepare": len(trained), "penalty": sum(steps), "after_backward": sum(steps),
                     "after_step": sum(steps), "finish": len(trained)}
    after = merged_weights(model)
    assert any(not torch.equal(before[name], after[name]) for name in before)


@pytest.mark.parametrize("method_name, grad_accum", [("ella", 2), ("jumplora-ella", 1)])
def test_the_trainer_path_trains_exactly_as_ella_run(method_name, grad_accum, tmp_path):
    """The same data, order, loss, optimiser, schedule and random stream: bitwise the same weights, method state
    (W_past), accuracy matrix and learning rates. 10 optimiser steps per task: a warm-up of 1 step, which a Trainer's
    own warmup_ratio would round up to 2; gradient accumulation puts the penalty on the step's last micro-batch."""
    tasks = toy_tasks(n_train=40 * grad_accum, n_test=4)
    training = TrainingConfig(learning_rate=1e-2, batch_size=4, grad_accum=grad_accum, max_length=64,
                              mixed_precision="no")
    evaluation = EvaluationConfig(mode="rank", batch_size=8, zero_shot=False)
    model, tokenizer = tiny_model()
    reference = get_method(method_name, lam=10.0)
    model, expected = run_sequence(model, tokenizer, tasks, reference, training, evaluation)
    expected_weights = merged_weights(model)

    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    model, tokenizer = tiny_model()
    method = get_method(method_name, lam=10.0)
    args = training_arguments(training, method, str(tmp_path))
    model, result = run_sequence_with_trainer(model, tokenizer, tasks, method, args, evaluation=evaluation,
                                              max_length=training.max_length, warmup_ratio=training.warmup_ratio)
    assert result.matrix == expected.matrix and len(result.matrix) == 2
    weights = merged_weights(model)
    assert all(torch.equal(weights[name], expected_weights[name]) for name in expected_weights)
    state, expected_state = method.state_dict(), reference.state_dict()
    assert state.keys() == expected_state.keys() and state
    assert all(torch.equal(state[key], expected_state[key]) for key in state)
    for log, reference_log in zip(result.task_logs, expected.task_logs):
        assert log["optimizer_steps"] == reference_log["optimizer_steps"] == 10
        assert log["steps"]["learning_rate"] == reference_log["steps"]["learning_rate"]
        assert log["steps"]["learning_rate"][:2] == [0.0, 1e-2]  # warm-up: int(0.1 x 10) = 1 step
        assert log["steps"]["penalty"] == reference_log["steps"]["penalty"]
        # the logged loss is summed in another order (the training itself is bitwise the same)
        assert log["steps"]["loss"] == pytest.approx(reference_log["steps"]["loss"], rel=1e-6)
    assert expected.task_logs[1]["penalty_mean"] > 0


def test_a_trainer_that_takes_other_steps_than_prepared_is_refused(tmp_path):
    """The hooks in a user's own loop over tasks: the Trainer's step count is checked against the TaskData."""
    tasks = toy_tasks(n_train=8)
    model, tokenizer = tiny_model()
    method = get_method("jumplora")
    method.setup(model, tasks)
    rows = user_rows(tasks[0], tokenizer)
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=4, num_train_epochs=1, report_to="none",
                             save_strategy="no")
    assert trainer_steps(len(rows), args) == 2
    data = task_data(rows, tokenizer, model, num_steps=5)  # wrong on purpose
    model = method.prepare(model, 0, tasks[0], data)
    trainer = ContinualTrainer(model=model, args=args, train_dataset=rows,
                               data_collator=DataCollatorForSeq2Seq(tokenizer), method=method, task_data=data)
    with pytest.raises(EllaError, match="take 2 optimiser steps, but jumplora was prepared for 5"):
        trainer.train()


def test_sft_trainer_runs_ella_methods(tmp_path):
    """TRL's SFTTrainer with a pre-tokenized datasets.Dataset per task; JumpLoRA + ELLA: the ramp's after_step and the
    penalty on the second task."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    tasks = toy_tasks(n_train=8, n_test=2)
    model, tokenizer = tiny_model()
    before = merged_weights(model)
    method = get_method("jumplora-ella", lam=10.0)
    calls = count_hooks(method)
    args = trl.SFTConfig(str(tmp_path), per_device_train_batch_size=4, num_train_epochs=1, learning_rate=1e-3,
                         max_length=64, report_to="none", save_strategy="no", use_cpu=True)
    datasets = [Dataset.from_list(user_rows(task, tokenizer)) for task in tasks]
    model, result = run_sequence_with_trainer(model, tokenizer, tasks, method, args, train_datasets=datasets,
                                              trainer_class=trl.SFTTrainer, processing_class=tokenizer)
    assert [log["optimizer_steps"] for log in result.task_logs] == [2, 2]
    assert calls["after_step"] == calls["after_backward"] == calls["penalty"] == 4
    assert result.task_logs[1]["penalty_mean"] > 0
    assert not hasattr(model, "peft_config")  # merged after each task
    after = merged_weights(model)  # the gated updates merged: the ramp reset the threshold to the LoRA budget
    assert any(not torch.equal(before[name], after[name]) for name in before)


@pytest.mark.slow
def test_smollm2_two_tasks_with_ella_inside_a_trainer(data_dir, tmp_path):
    """SmolLM2 on real benchmark data (dbpedia then agnews, a few examples each), ELLA inside a Trainer."""
    tasks = load_cl_benchmark("standard", tasks=["dbpedia", "agnews"], data_dir=data_dir, train_per_task=4,
                              test_per_task=2)
    model, tokenizer = load_model("smollm2-135m")
    method = get_method("ella", lam=3e4)
    training = TrainingConfig(batch_size=2, max_length=128, mixed_precision="no")
    args = training_arguments(training, method, str(tmp_path))
    model, result = run_sequence_with_trainer(model, tokenizer, tasks, method, args, max_length=128,
                                              evaluation=EvaluationConfig(mode="rank", batch_size=8, zero_shot=False),
                                              warmup_ratio=training.warmup_ratio)
    assert len(result.matrix) == 2 and all(len(row) == 2 and all(0 <= v <= 100 for v in row) for row in result.matrix)
    assert [log["optimizer_steps"] for log in result.task_logs] == [2, 2]
    assert result.task_logs[0]["loss_end"] < result.task_logs[0]["loss_start"]  # it learns
    assert result.task_logs[1]["penalty_mean"] > 0  # ELLA's penalty is active on the second task
    state = method.state_dict()  # W_past: two rank-8 tasks as exact factors of rank 16, q_proj and v_proj of 30 layers
    assert len(state) == 30 * 2 * 2 and all(value.shape[-1] == 16 for value in state.values())

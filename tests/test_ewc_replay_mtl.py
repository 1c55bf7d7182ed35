import pytest
import torch
from safetensors.torch import load_file, save_file

from ella import EllaError, EvaluationConfig, TrainingConfig, get_method, run_sequence
from ella.data import Encoded, TaskEncoder, collate
from ella.engine import task_data
from ella.models import tiny_model

FP32 = dict(mixed_precision="no")


def round_trip(state: dict[str, torch.Tensor], tmp_path) -> dict[str, torch.Tensor]:
    """The state as the engine stores it: through a safetensors file."""
    save_file(state, tmp_path / "state.safetensors")
    return load_file(tmp_path / "state.safetensors")


# EWC

def test_ewc_penalty_and_its_gradient_by_hand():
    layer = torch.nn.Linear(2, 1)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0]]))
        layer.bias.copy_(torch.tensor([0.5]))
    method = get_method("ewc", ewc_lambda=2.0)
    ewc = method.parts["ewc"]
    ewc.fisher = {"weight": torch.tensor([[1.0, 3.0]]), "bias": torch.tensor([2.0])}
    ewc.previous = {"weight": torch.tensor([[0.0, 1.0]]), "bias": torch.tensor([0.0])}
    penalty = method.penalty(layer)
    # θ − θ* = [1, 1] and [0.5]:  (λ/2)·Σ F·(θ − θ*)² = 1·(1·1 + 3·1 + 2·0.25) = 4.5
    assert penalty.item() == pytest.approx(4.5)
    penalty.backward()
    # ∂/∂θ = λ·F·(θ − θ*) = 2·[1·1, 3·1] and 2·2·0.5
    torch.testing.assert_close(layer.weight.grad, torch.tensor([[2.0, 6.0]]))
    torch.testing.assert_close(layer.bias.grad, torch.tensor([2.0]))


def ewc_on_tiny_model(tasks, **hyperparameters):
    """EWC prepared for task 0 on the tiny causal model, with non-zero LoRA B (so that A has gradients too), and
    the first task's data as the engine gives it."""
    model, tokenizer = tiny_model()
    method = get_method("ewc", **hyperparameters)
    method.setup(model, tasks)
    model = method.prepare(model, 0, tasks[0])
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    items = TaskEncoder(tokenizer, tasks[0], 64, seq2seq=False).training(tasks[0].train)
    return model, method, items, task_data(items, 3, tokenizer, False, torch.device("cpu"))


def test_fisher_is_the_mean_squared_gradient_of_each_example(tasks):
    model, method, items, data = ewc_on_tiny_model(tasks, fisher_examples=5, lora_dropout=0.5)
    trainable = {name: param for name, param in model.named_parameters() if param.requires_grad}
    # independently: Hugging Face's own causal-LM loss of each of the first 5 examples, dropout off
    model.eval()
    expected = {name: torch.zeros_like(param) for name, param in trainable.items()}
    for item in items[:5]:
        batch = collate([item], 0, False)
        model.zero_grad()
        model(input_ids=batch["input_ids"], labels=batch["labels"]).loss.backward()
        for name, param in trainable.items():
            expected[name] += param.grad ** 2 / 5
    model.zero_grad(set_to_none=True)

    model.train()
    model = method.finish(model, 0, tasks[0], data)
    ewc = method.parts["ewc"]
    assert ewc.fisher.keys() == trainable.keys()
    for name in trainable:
        torch.testing.assert_close(ewc.fisher[name], expected[name], rtol=1e-4, atol=1e-10)
        torch.testing.assert_close(ewc.previous[name], trainable[name].detach())
    assert sum(value.sum() for value in ewc.fisher.values()) > 0
    assert model.training and all(param.grad is None for param in trainable.values())  # left as it was

    method.prepare(model, 1, tasks[1])
    method.finish(model, 1, tasks[1], data)  # online EWC: F ← F + F_t (here F_t is the same again)
    for name in trainable:
        torch.testing.assert_close(ewc.fisher[name], 2 * expected[name], rtol=1e-4, atol=1e-10)


def test_ewc_has_no_penalty_on_the_first_task_nor_at_the_previous_parameters(tasks):
    model, method, _, data = ewc_on_tiny_model(tasks, fisher_examples=4)
    assert method.penalty(model).item() == 0.0
    model = method.finish(model, 0, tasks[0], data)
    model = method.prepare(model, 1, tasks[1])
    assert method.penalty(model).item() == 0.0  # θ = θ*
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(0.01)
    # every parameter moved by 0.01: (λ/2)·Σ F·0.01²
    ewc = method.parts["ewc"]
    expected = ewc.config.ewc_lambda / 2 * sum(f.sum() for f in ewc.fisher.values()) * 1e-4
    assert method.penalty(model).item() == pytest.approx(expected.item(), rel=1e-4)


def test_ewc_state_round_trip(tasks, tmp_path):
    model, method, _, data = ewc_on_tiny_model(tasks, fisher_examples=2)
    model = method.finish(model, 0, tasks[0], data)
    state = method.state_dict()
    ewc = method.parts["ewc"]
    assert len(state) == 2 * len(ewc.fisher)
    assert all(k.split(".")[:2] in (["ewc", "fisher"], ["ewc", "previous"]) for k in state)
    restored = get_method("ewc")
    restored.load_state_dict(round_trip(state, tmp_path))
    restored_ewc = restored.parts["ewc"]
    for name in ewc.fisher:
        torch.testing.assert_close(restored_ewc.fisher[name], ewc.fisher[name])
        torch.testing.assert_close(restored_ewc.previous[name], ewc.previous[name])
    with pytest.raises(EllaError, match="not an EWC state"):
        restored.load_state_dict({"ewc.fisher.x": torch.ones(1)})


def test_ewc_state_must_match_the_model(tasks):
    model, _ = tiny_model()
    method = get_method("ewc")
    method.setup(model, tasks)
    method.load_state_dict({"ewc.fisher.elsewhere": torch.ones(1), "ewc.previous.elsewhere": torch.ones(1)})
    with pytest.raises(EllaError, match="same model and LoRA settings"):
        method.prepare(model, 1, tasks[1])


# Replay

def toy_sequence(sizes: list[int]) -> list[list[Encoded]]:
    """Task t's example i is input_ids [t, i] with labels [t, i, 7] (the lengths differ, as with T5)."""
    return [[Encoded([t, i], [t, i, 7]) for i in range(size)] for t, size in enumerate(sizes)]


def learn(method, sequence: list[list[Encoded]], t: int) -> list[Encoded]:
    """Run the replay hooks for task ``t``, showing it only task t's own examples; returns what it trains on."""
    visible = [items if j == t else None for j, items in enumerate(sequence)]  # reading another task would fail
    trained = method.training_items(t, visible)
    method.finish(None, t, None)
    return trained


def test_replay_buffer_shares_and_composition():
    sequence = toy_sequence([20, 20, 2])
    method = get_method("replay", buffer_size=10)
    replay = method.parts["replay"]
    assert learn(method, sequence, 0) == sequence[0]
    first = replay.buffer[0]
    assert list(replay.buffer) == [0] and len(first) == 10 and len({tuple(i.input_ids) for i in first}) == 10
    assert all(item in sequence[0] for item in first) and first != sequence[0][:10]  # a random choice

    assert learn(method, sequence, 1) == sequence[1] + first  # its own examples and the 10 kept of task 0
    assert {t: len(kept) for t, kept in replay.buffer.items()} == {0: 5, 1: 5}
    second = replay.buffer[1]

    trained = learn(method, sequence, 2)
    assert trained == sequence[2] + first[:5] + second  # only earlier tasks' examples are replayed
    # after 3 tasks 10 // 3 = 3 each (task 2 has only 2); a shrunk sample is a subset of what the task kept before
    assert {t: len(kept) for t, kept in replay.buffer.items()} == {0: 3, 1: 3, 2: 2}
    assert replay.buffer[0] == first[:3] and replay.buffer[1] == second[:3]
    assert all(item.input_ids[0] == t for t, kept in replay.buffer.items() for item in kept)
    assert method.report() == {"replay_buffer": {0: 3, 1: 3, 2: 2}}


@pytest.mark.parametrize("buffer_size", [1, 7, 200])
def test_replay_buffer_never_exceeds_its_size(buffer_size):
    method = get_method("replay", buffer_size=buffer_size)
    sequence = toy_sequence([50, 3, 50, 50, 50])
    for t in range(len(sequence)):
        assert len(learn(method, sequence, t)) - len(sequence[t]) <= buffer_size
        buffer = method.parts["replay"].buffer  # each finish makes a new dict
        assert sum(len(kept) for kept in buffer.values()) <= buffer_size
        assert all(len(kept) == min(buffer_size // (t + 1), len(sequence[j])) for j, kept in buffer.items())


def test_replay_is_seeded():
    sequence = toy_sequence([30, 30])
    buffers = []
    for seed in (1, 1, 2):
        method = get_method("replay", buffer_size=8, buffer_seed=seed)
        for t in range(2):
            learn(method, sequence, t)
        buffers.append(method.parts["replay"].buffer)
    assert buffers[0] == buffers[1] and buffers[0] != buffers[2]


def test_replay_state_round_trip(tmp_path):
    method = get_method("replay", buffer_size=6)
    for t in range(3):
        learn(method, toy_sequence([5, 5, 1]), t)
    restored = get_method("replay", buffer_size=6)
    state = method.state_dict()
    assert set(state) == {f"replay.{key}" for key in ("task", "input_ids", "input_lengths", "labels", "label_lengths")}
    restored.load_state_dict(round_trip(state, tmp_path))
    assert restored.parts["replay"].buffer == method.parts["replay"].buffer
    sequence = toy_sequence([5, 5, 1, 4])
    assert restored.training_items(3, sequence) == method.training_items(3, sequence)
    with pytest.raises(EllaError, match="not a Replay state"):
        restored.load_state_dict({"replay.input_ids": torch.ones(1)})


def test_replay_finish_needs_training_items():
    with pytest.raises(EllaError, match="training_items"):
        get_method("replay").finish(None, 0, None)


def test_replay_trains_on_the_buffer_in_a_run(tasks):
    model, tokenizer = tiny_model()
    method = get_method("replay", buffer_size=4)
    _, result = run_sequence(model, tokenizer, tasks, method, TrainingConfig(batch_size=4, max_length=64, **FP32),
                             EvaluationConfig(mode="rank", zero_shot=False))
    assert [log["examples"] for log in result.task_logs] == [12, 12 + 4]
    assert result.task_logs[1]["replay_buffer"] == {0: 2, 1: 2}


# MTL

def test_mtl_trains_once_on_every_task(tasks):
    sequence = toy_sequence([3, 2, 4])
    method = get_method("mtl")
    assert method.training_items(0, sequence) == sequence[0] + sequence[1] + sequence[2]
    assert method.training_items(1, sequence) == [] and method.training_items(2, sequence) == []

    model, tokenizer = tiny_model()
    _, result = run_sequence(model, tokenizer, tasks, get_method("mtl"),
                             TrainingConfig(batch_size=4, max_length=64, **FP32),
                             EvaluationConfig(mode="rank", zero_shot=False))
    assert [log["examples"] for log in result.task_logs] == [24, 0]
    assert [log["optimizer_steps"] for log in result.task_logs] == [6, 0]
    assert result.matrix[1] == result.matrix[0]  # nothing changed after the joint training


@pytest.mark.parametrize("name, bad, message", [
    ("ewc", dict(ewc_lambda=-1.0), "ewc_lambda must be non-negative"),
    ("ewc", dict(fisher_examples=0), "fisher_examples must be at least 1"),
    ("replay", dict(buffer_size=0), "buffer_size must be at least 1"),
    ("replay", dict(seed=3), "not a hyper-parameter of replay"),
])
def test_bad_hyperparameters(name, bad, message):
    with pytest.raises(EllaError, match=message):
        get_method(name, **bad)

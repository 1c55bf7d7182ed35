import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from ella import EllaError, EvaluationConfig, TrainingConfig, get_method, run_sequence
from ella.data import TaskEncoder
from ella.engine import task_data
from ella.methods.inflora import designed_lora_a, extend_basis, residual_eigen
from ella.methods.lora import lora_layers
from ella.methods.olora import orthogonality_loss
from ella.models import tiny_model

FP32 = dict(mixed_precision="no")
Q0 = "model.layers.0.self_attn.q_proj"  # the tiny causal model's first query projection: 32 -> 32


def round_trip(state: dict[str, torch.Tensor], tmp_path) -> dict[str, torch.Tensor]:
    """The state as the engine stores it: through a safetensors file."""
    save_file(state, tmp_path / "state.safetensors")
    return load_file(tmp_path / "state.safetensors")


def projector(basis: torch.Tensor) -> torch.Tensor:
    """M Mᵀ: compares subspaces whatever the signs and order of their basis vectors."""
    return basis @ basis.T


# O-LoRA

def test_orthogonality_loss_and_its_gradient_by_hand():
    a_past = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]])
    a_new = torch.tensor([[1.0, -2.0, 1.0]], requires_grad=True)
    # A_past A_newᵀ = [[1 + 0 + 2], [0 − 2 − 1]] = [[3], [−3]] -> |3| + |−3| = 6
    loss = orthogonality_loss(a_past, a_new)
    assert loss.item() == pytest.approx(6.0)
    loss.backward()
    # ∂/∂A_new = sign(A_past A_newᵀ)ᵀ A_past = 1·[1, 0, 2] − 1·[0, 1, −1]
    torch.testing.assert_close(a_new.grad, torch.tensor([[1.0, -1.0, 3.0]]))


def olora_with_known_factors(tasks, task_index: int, **hyperparameters):
    """O-LoRA prepared for ``task_index`` on the tiny causal model with every LoRA zero except module Q0:
    A = [e0; 2·e1] (r = 2) and B = 1 everywhere (32 x 2)."""
    model, _ = tiny_model()
    method = get_method("olora", lora_r=2, **hyperparameters)
    method.setup(model, tasks)
    model = method.prepare(model, task_index, tasks[task_index])
    adapter = method.update.adapter
    layers = lora_layers(model, adapter)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_A[adapter].weight.zero_()
        layers[Q0].lora_A[adapter].weight[0, 0] = 1.0
        layers[Q0].lora_A[adapter].weight[1, 1] = 2.0
        layers[Q0].lora_B[adapter].weight.fill_(1.0)
    return model, method


def test_olora_penalty_through_peft_layers(tasks):
    model, method = olora_with_known_factors(tasks, 1, lambda1=0.5, lambda2=0.25)
    a_past = torch.zeros(3, 32)  # earlier rows e0, e1 and e0 + e1
    a_past[0, 0] = a_past[1, 1] = a_past[2, 0] = a_past[2, 1] = 1.0
    method.parts["olora"].a_past = {Q0: a_past}
    # A_past A_newᵀ = [[1, 0], [0, 2], [1, 2]] -> L1 = 6;  ‖A‖ = √(1 + 4) = √5;  ‖B‖ = √(32·2) = 8
    assert method.penalty(model).item() == pytest.approx(0.5 * 6 + 0.25 * (math.sqrt(5) + 8))


def test_olora_first_task_has_no_orthogonality_term(tasks):
    model, method = olora_with_known_factors(tasks, 0, lambda1=1e6, lambda2=0.0)
    assert method.penalty(model).item() == 0.0
    model, method = olora_with_known_factors(tasks, 0, lambda1=1e6, lambda2=0.25)
    assert method.penalty(model).item() == pytest.approx(0.25 * (math.sqrt(5) + 8))  # only the norms


def test_olora_stacks_every_task_a_and_its_state_round_trips(tasks, tmp_path):
    model, _ = tiny_model()
    method = get_method("olora", lora_r=4)
    method.setup(model, tasks)
    task_a = []
    for t, task in enumerate(tasks):
        model = method.prepare(model, t, task)
        adapter = method.update.adapter
        layer = lora_layers(model, adapter)[Q0]
        task_a.append(layer.lora_A[adapter].weight.detach().clone())
        model = method.finish(model, t, task)
        if t == 0:
            assert method.report() == {}
    a_past = method.parts["olora"].a_past
    assert set(a_past) == {f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qv"}
    torch.testing.assert_close(a_past[Q0], torch.cat(task_a))  # (2·4) x 32: both tasks' rows
    assert method.report()["orthogonality_loss_end"] > 0  # random initial A's overlap
    state = method.state_dict()
    assert set(state) == {f"olora.{name}" for name in a_past}
    other = get_method("olora")
    other.load_state_dict(round_trip(state, tmp_path))
    torch.testing.assert_close(other.parts["olora"].a_past[Q0], a_past[Q0])
    other.setup(model, tasks)
    other.prepare(model, 2, tasks[0])  # the loaded rows fit the model
    stranger = get_method("olora")
    stranger.load_state_dict({"olora.model.layers.9.self_attn.q_proj": torch.ones(4, 32)})  # the tiny model: 2 layers
    fresh, _ = tiny_model()
    stranger.setup(fresh, tasks)
    with pytest.raises(EllaError, match="olora state does not fit this model"):
        stranger.prepare(fresh, 1, tasks[1])


def test_olora_penalty_is_active_from_the_second_task(tasks):
    model, tokenizer = tiny_model()
    _, result = run_sequence(model, tokenizer, tasks, get_method("olora"),
                             TrainingConfig(batch_size=4, max_length=64, **FP32),
                             EvaluationConfig(mode="rank", zero_shot=False))
    assert result.task_logs[0]["penalty_mean"] == 0.0 and result.task_logs[1]["penalty_mean"] > 0.0


# InfLoRA

def test_designed_a_is_the_top_eigenvectors_off_the_earlier_subspace():
    covariance = torch.tensor([[2.0, 1.0, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, 5.0]])
    basis = torch.tensor([[0.0], [0.0], [1.0]])  # M = e2, the direction of the largest eigenvalue (5)
    # C' = diag(1, 1, 0) C diag(1, 1, 0) = [[2, 1, 0], [1, 2, 0], [0, 0, 0]]: on the complement of M (the plane
    # of e0 and e1) 3 along (1, 1, 0)/√2 and 1 along (1, −1, 0)/√2
    values, vectors = residual_eigen(covariance, basis)
    torch.testing.assert_close(values, torch.tensor([3.0, 1.0]))
    torch.testing.assert_close(basis.T @ vectors, torch.zeros(1, 2))
    a = designed_lora_a(covariance, basis, 2)
    s = 1 / math.sqrt(2)
    torch.testing.assert_close(a.abs(), torch.tensor([[s, s, 0.0], [s, s, 0.0]]))
    torch.testing.assert_close(a[0, 0] * a[0, 1], torch.tensor(0.5))  # (1, 1): same signs
    torch.testing.assert_close(a[1, 0] * a[1, 1], torch.tensor(-0.5))  # (1, −1): opposite signs


def test_designed_a_stays_off_the_earlier_subspace_where_c_prime_is_zero():
    covariance = torch.diag(torch.tensor([0.0, 0.0, 0.0, 5.0]))
    basis = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # M = [e2, e3]: C' = 0
    a = designed_lora_a(covariance, basis, 2)
    torch.testing.assert_close(a @ a.T, torch.eye(2))
    torch.testing.assert_close(a @ basis, torch.zeros(2, 2))


def test_extend_basis_by_hand():
    covariance = torch.diag(torch.tensor([6.0, 3.0, 1.0]))  # tr(C) = 10
    empty = torch.zeros(3, 0)
    e = torch.eye(3)
    # from nothing: e0 alone captures 6/10 >= 0.5; τ = 0.85 needs e0 and e1 (9/10)
    torch.testing.assert_close(projector(extend_basis(empty, covariance, 0.5, 2)), projector(e[:, :1]))
    torch.testing.assert_close(projector(extend_basis(empty, covariance, 0.85, 2)), projector(e[:, :2]))
    # τ = 0.95 would need all three: the cap of 2 columns (d_in − r for r = 1) stops it
    torch.testing.assert_close(projector(extend_basis(empty, covariance, 0.95, 2)), projector(e[:, :2]))
    # M = e0 already captures 6/10 >= 0.5: nothing added; τ = 0.85 adds e1
    torch.testing.assert_close(projector(extend_basis(e[:, :1], covariance, 0.5, 2)), projector(e[:, :1]))
    torch.testing.assert_close(projector(extend_basis(e[:, :1], covariance, 0.85, 2)), projector(e[:, :2]))


def inflora_data(tokenizer, task, seq2seq: bool = False):
    items = TaskEncoder(tokenizer, task, 64, seq2seq).training(task.train)
    return items, task_data(items, 3, tokenizer, seq2seq, torch.device("cpu"))


def test_covariance_is_the_sum_of_the_layer_inputs(tasks):
    """C of the first query projection from its input computed directly: the RMS-normed token embeddings."""
    model, tokenizer = tiny_model()
    method = get_method("inflora", lora_r=4, stats_examples=3)
    method.setup(model, tasks)
    items, data = inflora_data(tokenizer, tasks[0])
    model = method.prepare(model, 0, tasks[0], data)
    base = model.get_base_model().model
    with torch.no_grad():
        inputs = torch.cat([base.layers[0].input_layernorm(base.embed_tokens(torch.tensor(item.input_ids)))
                            for item in items[:3]])  # the first 3 examples, no padding
    covariance = inputs.T @ inputs
    torch.testing.assert_close(method.update.covariances(model, data)[Q0], covariance, rtol=1e-5, atol=1e-5)
    # A = C's top-4 eigenvectors (no earlier subspace yet): A C Aᵀ = diag of its 4 largest eigenvalues
    a = lora_layers(model, "task0")[Q0].lora_A["task0"].weight.detach()
    top = torch.linalg.eigvalsh(covariance).flip(0)[:4]
    torch.testing.assert_close(a @ covariance @ a.T, torch.diag(top), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("seq2seq", [False, True], ids=["causal", "t5"])
def test_second_task_a_is_orthonormal_and_off_the_first_tasks_subspace(tasks, tmp_path, seq2seq):
    model, tokenizer = tiny_model(seq2seq=seq2seq)
    method = get_method("inflora", lora_r=4)
    method.setup(model, tasks)
    data = [inflora_data(tokenizer, task, seq2seq)[1] for task in tasks[:2]]
    model = method.prepare(model, 0, tasks[0], data[0])
    model = method.finish(model, 0, tasks[0], data[0])
    inflora = method.update
    first = {name: basis.clone() for name, basis in inflora.bases.items()}
    assert len(first) == 2 * 2 * (3 if seq2seq else 1)  # q and v of every attention
    for basis in first.values():
        assert 1 <= basis.shape[1] <= 32 - 4  # room left for the next task's A
        torch.testing.assert_close(basis.T @ basis, torch.eye(basis.shape[1]), rtol=0, atol=1e-5)

    model = method.prepare(model, 1, tasks[1], data[1])
    for name, layer in lora_layers(model, "task1").items():
        a = layer.lora_A["task1"].weight
        assert not a.requires_grad and layer.lora_B["task1"].weight.requires_grad
        torch.testing.assert_close(a @ a.T, torch.eye(4), rtol=0, atol=1e-5)
        assert (a @ first[name]).abs().max() < 1e-5
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trainable and all("lora_B" in name for name in trainable)

    model = method.finish(model, 1, tasks[1], data[1])
    for name, basis in inflora.bases.items():
        assert first[name].shape[1] <= basis.shape[1] <= 32 - 4
        torch.testing.assert_close(basis.T @ basis, torch.eye(basis.shape[1]), rtol=0, atol=1e-5)
        torch.testing.assert_close(projector(basis) @ first[name], first[name], rtol=0, atol=1e-5)  # M only grows
    assert 0 < method.report()["input_subspace_fraction"] <= 28 / 32

    state = method.state_dict()
    assert set(state) == {f"inflora.{name}" for name in inflora.bases}
    other = get_method("inflora")
    other.load_state_dict(round_trip(state, tmp_path))
    torch.testing.assert_close(other.update.bases, inflora.bases)


def test_subspace_grows_from_the_trained_models_inputs_at_the_tasks_threshold(tasks):
    """As in the reference code: after the task its examples run through the trained model again, and M takes the
    directions of those inputs that reach τ_t = τ + (τ_end − τ)·t/T."""
    model, tokenizer = tiny_model()
    method = get_method("inflora", lora_r=4, gpm_threshold=0.6, gpm_threshold_end=0.9)
    method.setup(model, tasks)
    inflora, steps = method.update, len(tasks)
    assert [inflora.threshold(t) for t in range(steps)] == pytest.approx([0.6 + 0.3 * t / steps for t in range(steps)])
    _, data = inflora_data(tokenizer, tasks[0])
    model = method.prepare(model, 0, tasks[0], data)
    before = inflora.covariances(model, data)
    with torch.no_grad():  # "training": the first block's update changes what the second block receives
        for name, layer in lora_layers(model, "task0").items():
            if ".0." in name:
                layer.lora_B["task0"].weight.normal_(0, 1.0)
    after = inflora.covariances(model, data)
    changed = [name for name in after if ".1." in name]
    assert changed and all((after[name] - before[name]).abs().max() > 1e-3 * after[name].abs().max()
                           for name in changed)
    model = method.finish(model, 0, tasks[0], data)
    for name, covariance in after.items():
        expected = extend_basis(covariance.new_zeros(32, 0), covariance, 0.6, 32 - 4)
        torch.testing.assert_close(projector(inflora.bases[name]), projector(expected), rtol=0, atol=1e-4)


def test_inflora_update_leaves_the_earlier_subspace_unchanged(tasks):
    """Trained end to end: the second task's merged update ΔW = s·B·A maps the first task's subspace to zero."""
    model, tokenizer = tiny_model()
    method = get_method("inflora", lora_r=4)
    training = TrainingConfig(learning_rate=1e-2, batch_size=4, max_length=64, **FP32)
    evaluation = EvaluationConfig(mode="rank", zero_shot=False)
    model, _ = run_sequence(model, tokenizer, tasks[:1], method, training, evaluation)
    first = {name: basis.clone() for name, basis in method.update.bases.items()}
    before = {name: value.clone() for name, value in model.state_dict().items()}
    model, _ = run_sequence(model, tokenizer, tasks[1:], method, training, evaluation)
    for name, basis in first.items():
        update = model.state_dict()[name + ".weight"] - before[name + ".weight"]
        assert update.abs().max() > 1e-4  # B trained
        assert (update @ basis).abs().max() < 1e-6


def test_inflora_needs_room_for_a(tasks):
    model, tokenizer = tiny_model()
    _, data = inflora_data(tokenizer, tasks[0])
    with pytest.raises(EllaError, match=r"no room for A's lora_r = 33 .* choose lora_r <= 32"):
        method = get_method("inflora", lora_r=33)
        method.setup(model, tasks)
        method.prepare(model, 0, tasks[0], data)


@pytest.mark.parametrize("name, bad, message", [
    ("olora", dict(lambda1=-0.5), "lambda1 must be non-negative"),
    ("olora", dict(lambda2=float("nan")), "lambda2 must be non-negative"),
    ("inflora", dict(gpm_threshold=1.0), r"gpm_threshold must be in \(0, 1\)"),
    ("inflora", dict(gpm_threshold=0.0), r"gpm_threshold must be in \(0, 1\)"),
    ("inflora", dict(stats_examples=0), "stats_examples must be at least 1"),
    ("inflora", dict(gpm_threshold=0.95, gpm_threshold_end=0.9), r"gpm_threshold_end must be in \[gpm_threshold, 1\]"),
])
def test_bad_hyperparameters(name, bad, message):
    with pytest.raises(EllaError, match=message):
        get_method(name, **bad)

import pytest
import torch

from ella import EllaError, EvaluationConfig, TrainingConfig, get_method, run_sequence
from ella.methods.ella import interference_figures
from ella.methods.lora import lora_layers
from ella.methods.w_past import LowRank, PastUpdates
from ella.models import tiny_model

FP32 = dict(mixed_precision="no")


@pytest.mark.parametrize("representation", ["dense", "factors", "svd"])
def test_penalty_and_its_gradient_by_hand(representation):
    # r = 1, alpha = 2 -> s = 2;  ΔW = s·B·A = 2·[[1],[3]]·[[1, 2]] = [[2, 4], [6, 12]]
    A = torch.tensor([[1.0, 2.0]], requires_grad=True)
    B = torch.tensor([[1.0], [3.0]], requires_grad=True)
    # W_past = [[1, 0], [0.5, -1]], given as the update of two earlier rank-one tasks
    w_past = PastUpdates(representation, rank=2)
    w_past.add("m", LowRank(torch.tensor([[1.0], [0.5]]), torch.tensor([[1.0], [0.0]])))
    w_past.add("m", LowRank(torch.tensor([[0.0], [-1.0]]), torch.tensor([[0.0], [1.0]])))
    torch.testing.assert_close(w_past.matrix("m"), torch.tensor([[1.0, 0.0], [0.5, -1.0]]))
    lam = 0.5
    penalty = lam * w_past.penalty({"m": LowRank(2 * B, A.T)})
    # ΔW ⊙ W_past = [[2, 0], [3, -12]] -> 4 + 0 + 9 + 144 = 157, times λ
    assert penalty.item() == pytest.approx(78.5)
    penalty.backward()
    # ∂/∂ΔW = λ·2·ΔW⊙W_past⊙W_past = [[2, 0], [1.5, 12]];  ∂/∂B = s·(∂/∂ΔW)·Aᵀ;  ∂/∂A = s·Bᵀ·(∂/∂ΔW)
    torch.testing.assert_close(B.grad, torch.tensor([[4.0], [51.0]]))
    torch.testing.assert_close(A.grad, torch.tensor([[13.0, 72.0]]))


def test_mean_reduction_averages_modules():
    deltas = {"a": torch.ones(2, 2), "b": torch.full((1, 3), 2.0)}
    w_past = PastUpdates("dense")
    w_past.add("a", torch.full((2, 2), 3.0))
    w_past.add("b", torch.ones(1, 3))
    # module a: 4 entries of (1·3)² = 36; module b: 3 entries of (2·1)² = 12
    assert w_past.penalty(deltas, "sum").item() == pytest.approx(48.0)
    assert w_past.penalty(deltas, "mean").item() == pytest.approx(24.0)


@pytest.mark.parametrize("reduction, modules", [(None, 4), ("mean", 4), ("sum", 1)])
def test_penalty_through_peft_layers(tasks, reduction, modules):
    """ELLA's penalty on real LoRA layers: a rank-one ΔW = s·1·1ᵀ on one module against W_past = 2 everywhere. By
    default (as ``mean``) the penalty is averaged over the 4 adapted modules, of which 3 contribute 0."""
    model, _ = tiny_model()
    chosen = {} if reduction is None else {"penalty_reduction": reduction}
    method = get_method("ella", lam=0.25, lora_r=8, lora_alpha=32, **chosen)  # s = 4
    method.setup(model, tasks)
    model = method.prepare(model, 1, tasks[1])
    adapter = method.update.adapter
    layers = lora_layers(model, adapter)
    name = "model.layers.0.self_attn.q_proj"
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_A[adapter].weight.zero_()
        layers[name].lora_A[adapter].weight[0] = 1.0
        layers[name].lora_B[adapter].weight[:, 0] = 1.0
    d_out, d_in = layers[name].base_layer.weight.shape
    w_past = method.parts["ella"].w_past
    for n, layer in layers.items():  # W_past = 2 everywhere: the rank-one 2·1·1ᵀ
        d_out_n, d_in_n = layer.base_layer.weight.shape
        w_past.add(n, LowRank(torch.full((d_out_n, 1), 2.0), torch.ones(d_in_n, 1)))
    # every entry of ΔW ⊙ W_past is 4·2 = 8 on the one module, 0 elsewhere; divided by the modules averaged over
    assert method.penalty(model).item() == pytest.approx(0.25 * 64 * d_out * d_in / modules)


def test_first_task_has_no_penalty(tasks):
    model, _ = tiny_model()
    method = get_method("ella", lam=1e6)
    method.setup(model, tasks)
    model = method.prepare(model, 0, tasks[0])
    assert method.penalty(model).item() == 0.0


def test_w_past_is_the_sum_of_the_merged_updates(tasks):
    """After two tasks W_past^m = (merged weights - base weights) of every adapted module."""
    model, tokenizer = tiny_model()
    base = {name: value.clone() for name, value in model.state_dict().items()}
    method = get_method("ella", lam=1e3, lora_dropout=0.0)
    model, result = run_sequence(model, tokenizer, tasks, method,
                                 TrainingConfig(learning_rate=1e-2, batch_size=4, **FP32),
                                 EvaluationConfig(mode="rank", zero_shot=False))
    w_past = method.parts["ella"].w_past
    assert sorted(w_past.modules) == sorted(f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qv")
    weights = model.state_dict()
    for name in w_past.modules:
        merged_update = weights[name + ".weight"] - base[name + ".weight"]
        past = w_past.matrix(name)
        assert past.abs().max() > 0
        torch.testing.assert_close(past, merged_update, rtol=0, atol=1e-6)
    assert result.task_logs[0]["penalty_mean"] == 0.0 and result.task_logs[1]["penalty_mean"] > 0.0
    # nothing but the adapted modules changed
    changed = {n for n in base if not torch.equal(base[n], weights[n])}
    assert changed == {name + ".weight" for name in w_past.modules}


@pytest.mark.parametrize("representation", ["dense", "factors", "svd"])
def test_state_round_trip(representation):
    method = get_method("ella", w_past=representation)
    method.parts["ella"].w_past.add("x.q", LowRank(torch.ones(2, 1), torch.ones(3, 1)))
    state = method.state_dict()
    assert state and all(key.startswith("ella.x.q") for key in state)  # the part's tensors under its name
    other = get_method("ella", w_past=representation)
    other.load_state_dict(state)
    torch.testing.assert_close(other.parts["ella"].w_past.matrix("x.q"), torch.ones(2, 3))
    with pytest.raises(EllaError, match="pass the matching --w-past"):
        get_method("ella", w_past="dense" if representation != "dense" else "svd").load_state_dict(
            method.state_dict())


@pytest.mark.parametrize("bad, message", [
    (dict(lam=-1.0), "non-negative"),
    (dict(lam=[1.0, -2.0]), "non-negative"),
    (dict(penalty_reduction="max"), "penalty_reduction"),
    (dict(lora_r=0), "lora_r"),
    (dict(alpha=3), "not a hyper-parameter of ella"),
])
def test_bad_hyperparameters(bad, message):
    with pytest.raises(EllaError, match=message):
        get_method("ella", **bad)


def test_one_lambda_per_task(tasks):
    model, _ = tiny_model()
    with pytest.raises(EllaError, match="3 λ values for 2 tasks"):
        get_method("ella", lam=[1.0, 2.0, 3.0]).setup(model, tasks)
    method = get_method("ella", lam=[0.0, 5.0])
    method.setup(model, tasks)
    method.prepare(model, 1, tasks[1])
    assert method.parts["ella"].lam_now == 5.0


def test_interference_and_energy_by_hand():
    past = torch.tensor([[1.0, 0.0], [0.5, -1.0]])
    update = torch.tensor([[2.0, 4.0], [6.0, 12.0]])
    interference, _, total = interference_figures(update, past)
    assert interference == pytest.approx(2 * 1 + 6 * 0.5 - 12)  # ⟨ΔW, W_past⟩ = -7
    assert total == pytest.approx(4 + 16 + 36 + 144)
    # 20 coordinates: |W_past| = 1..20; the top 10 % are 19 and 20, where the update puts 3² + 4² of 3² + 4² + 12²
    past = torch.arange(1.0, 21.0).reshape(4, 5)
    update = torch.zeros(4, 5)
    update[3, 3], update[3, 4], update[0, 0] = 3.0, 4.0, 12.0
    _, high, total = interference_figures(update, past)
    assert high / total == pytest.approx(25 / 169)


def test_diagnostics_are_logged_from_the_second_task(tasks):
    """The logged interference is ⟨ΔW_2, W_past⟩_F summed over the modules, with ΔW_2 the second task's merged
    update and W_past the first task's (the two tasks run as two sequences to see W_past between them)."""
    model, tokenizer = tiny_model()
    method = get_method("ella", lam=10.0)
    training = TrainingConfig(learning_rate=1e-2, batch_size=4, **FP32)
    evaluation = EvaluationConfig(mode="rank", zero_shot=False)
    model, first = run_sequence(model, tokenizer, tasks[:1], method, training, evaluation)
    assert "diagnostics" not in first.task_logs[0]  # W_past = 0 on the first task: nothing to relate to
    w_past = method.parts["ella"].w_past
    past = {name: w_past.matrix(name).clone() for name in w_past.modules}
    before = {name: value.clone() for name, value in model.state_dict().items()}
    model, second = run_sequence(model, tokenizer, tasks[1:], method, training, evaluation)
    figures = second.task_logs[0]["diagnostics"]
    assert set(figures) == {"lambda", "interference", "update_energy_in_high_energy_coordinates"}
    weights = model.state_dict()
    expected = sum(((weights[name + ".weight"] - before[name + ".weight"]) * matrix).sum().item()
                   for name, matrix in past.items())
    assert figures["lambda"] == 10.0 and figures["interference"] == pytest.approx(expected, rel=1e-3, abs=1e-6)
    assert 0 < figures["update_energy_in_high_energy_coordinates"] <= 1

import math

import pytest
import torch

from ella import EllaError, EvaluationConfig, TrainingConfig, get_method, run_sequence
from ella.methods import TaskData
from ella.methods.jumplora import jump_gate, ramp
from ella.methods.lora import lora_layers
from ella.models import tiny_model


def test_gate_forward_and_both_straight_through_gradients_by_hand():
    x = torch.tensor([[0.5, -0.0098], [0.0103, -0.3]], requires_grad=True)
    log_threshold = torch.tensor(math.log(0.01), requires_grad=True)  # θ = 0.01, ε = 0.001
    out = jump_gate(x, log_threshold, bandwidth=1e-3)
    torch.testing.assert_close(out, torch.tensor([[0.5, 0.0], [0.0103, -0.3]]))  # |x| ≤ θ is cut, signs kept
    upstream = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    (out * upstream).sum().backward()
    # ∂/∂x = 1[|x| > θ]·g
    torch.testing.assert_close(x.grad, torch.tensor([[1.0, 0.0], [3.0, 4.0]]))
    # at the magnitudes the gradient is sign(x)·g = [[1, -2], [3, -4]]; rect((|x| - θ)/ε) = 1 for 0.0098 (-0.2)
    # and 0.0103 (+0.3) only: ∂/∂θ = -(θ/ε)·mean = -(10)·((-2 + 3)/4) = -2.5, and ∂/∂log θ = θ·∂/∂θ = -0.025
    assert log_threshold.grad.item() == pytest.approx(-0.025, rel=1e-5)


def test_ramp_from_twenty_to_eighty_percent():
    assert [ramp(p, 0.2, 0.8) for p in (0.0, 0.2, 0.5, 0.8, 1.0)] == pytest.approx([0, 0, 0.5, 1, 1])


def prepared(tasks, num_steps=10, name="jumplora", **hyperparameters):
    model, _ = tiny_model()
    method = get_method(name, lora_dropout=0.0, **hyperparameters)
    method.setup(model, tasks)
    model = method.prepare(model, 0, tasks[0], TaskData([], num_steps, lambda **_: iter(())))
    adapter = method.update.adapter
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in lora_layers(model, adapter).values():
            for part in (layer.lora_A[adapter], layer.lora_B[adapter]):
                part.weight.copy_(torch.randn(part.weight.shape, generator=generator))
    return model, method


def run_schedule(model, method, steps=None):
    """Call after_step as the engine does after each optimiser step: ``steps`` times, by default all of them."""
    for _ in range(method.update.num_steps if steps is None else steps):
        method.after_step(model)


@pytest.mark.parametrize("scope", ["global", "block"])
def test_threshold_reset_keeps_exactly_the_lora_parameter_count(tasks, scope):
    model, method = prepared(tasks, threshold_scope=scope)
    jump = method.update
    jump.reset_thresholds(model)
    survivors, budget = {}, {}
    for name, layer in lora_layers(model, jump.adapter).items():
        group = jump.group_of[name]
        product = layer.lora_B[jump.adapter].weight @ layer.lora_A[jump.adapter].weight
        survivors[group] = survivors.get(group, 0) + int((product.abs() > jump.thresholds[group].exp()).sum())
        r, d_in = layer.lora_A[jump.adapter].weight.shape
        budget[group] = budget.get(group, 0) + r * (d_in + product.shape[0])
    assert len(survivors) == (1 if scope == "global" else 2)  # two transformer blocks in the tiny model
    assert survivors == budget


def test_schedule_resets_at_twenty_percent_and_ramps(tasks):
    model, method = prepared(tasks, num_steps=10)
    jump = method.update
    initial = jump.thresholds["model"].item()
    mixes = []
    for _ in range(10):
        method.after_step(model)
        mixes.append(jump.mix)
    assert jump.thresholds["model"].item() != initial  # reset when the ramp started (after step 2)
    assert mixes == pytest.approx([0, 0, 1 / 6, 2 / 6, 0.5, 4 / 6, 5 / 6, 1, 1, 1])


def test_merged_update_is_the_hard_gated_product_and_sparsity_is_reported(tasks):
    model, method = prepared(tasks)
    jump = method.update
    initial = jump.thresholds["model"].item()
    run_schedule(model, method)  # resets θ to the LoRA parameter budget when the ramp starts; ends on the hard gate
    assert jump.mix == 1 and jump.thresholds["model"].item() != initial
    expected = {}
    for name, layer in lora_layers(model, jump.adapter).items():
        product = layer.lora_B[jump.adapter].weight @ layer.lora_A[jump.adapter].weight
        threshold = jump.thresholds["model"].exp()
        expected[name] = (product * (product.abs() > threshold) * layer.scaling[jump.adapter]).detach()
    base = {name: layer.base_layer.weight.detach().clone() for name, layer in lora_layers(model, jump.adapter).items()}
    merged = method.finish(model, 0, tasks[0])
    weights = dict(merged.named_modules())
    for name, update in expected.items():
        torch.testing.assert_close(weights[name].weight - base[name], update)
    report = method.report()["sparsity"]
    assert report["surviving_entries"] == report["lora_parameters"] == sum(int(u.count_nonzero()) for u in expected.values())
    assert set(report["density_per_module"]) == set(expected)
    assert method.state_dict() == {}  # λ = 0: JumpLoRA on IncLoRA keeps no W_past


def test_jumplora_ella_accumulates_the_merged_gated_updates(tasks):
    model, tokenizer = tiny_model()
    base = {name: value.clone() for name, value in model.state_dict().items()}
    method = get_method("jumplora-ella", lam=100.0, lora_dropout=0.0)
    model, result = run_sequence(model, tokenizer, tasks, method,
                                 TrainingConfig(learning_rate=1e-2, batch_size=2, mixed_precision="no"),
                                 EvaluationConfig(mode="rank", zero_shot=False))
    weights = model.state_dict()
    w_past = method.parts["ella"].w_past
    assert sorted(w_past.modules) == sorted(f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qv")
    for name in w_past.modules:
        past = w_past.matrix(name)
        torch.testing.assert_close(past, weights[name + ".weight"] - base[name + ".weight"], rtol=0, atol=1e-6)
        assert (past == 0).any()  # sparse
    assert result.task_logs[1]["penalty_mean"] > 0
    assert 0 < result.task_logs[1]["sparsity"]["density"] < 1


@pytest.mark.parametrize("name", ["jumplora", "jumplora-ella"])
def test_finish_refuses_a_task_whose_schedule_did_not_run(tasks, name):
    """finish before after_step ran through every planned step leaves θ and the ramp short of the hard gate: refused,
    with nothing taken from the task (no W_past) and the LoRA still unmerged; after the whole schedule it merges."""
    model, method = prepared(tasks, num_steps=10, name=name, **(dict(lam=1.0) if name == "jumplora-ella" else {}))
    jump = method.update
    with pytest.raises(EllaError, match="schedule ran 0 of the task's 10 optimiser steps"):
        method.finish(model, 0, tasks[0])
    run_schedule(model, method, steps=9)
    with pytest.raises(EllaError, match="schedule ran 9 of the task's 10 optimiser steps"):
        method.finish(model, 0, tasks[0])
    assert method.state_dict() == {} and lora_layers(model, jump.adapter)  # nothing kept, nothing merged
    run_schedule(model, method, steps=1)
    assert jump.step == jump.num_steps == 10 and jump.mix == 1
    base = {name: layer.base_layer.weight.detach().clone() for name, layer in lora_layers(model, jump.adapter).items()}
    merged = method.finish(model, 0, tasks[0])
    assert not getattr(merged, "peft_config", None)  # merged: a plain model again
    assert method.report()["sparsity"]["surviving_entries"] > 0
    if name == "jumplora-ella":  # W_past holds the task's merged update once
        w_past = method.parts["ella"].w_past
        assert sorted(w_past.modules) == sorted(base)
        weights = dict(merged.named_modules())
        for module, weight in base.items():
            torch.testing.assert_close(w_past.matrix(module), weights[module].weight - weight, rtol=0, atol=1e-5)


def test_bad_jumplora_settings(tasks):
    with pytest.raises(EllaError, match="threshold_scope"):
        get_method("jumplora", threshold_scope="layer")
    with pytest.raises(EllaError, match="ramp_start < ramp_end"):
        get_method("jumplora", ramp_start=0.9, ramp_end=0.5)
    model, _ = tiny_model()
    method = get_method("jumplora")
    method.setup(model, tasks)
    with pytest.raises(EllaError, match="needs the task's data"):
        method.prepare(model, 0, tasks[0])

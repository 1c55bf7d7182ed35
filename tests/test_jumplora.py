import math

import pytest
import torch

from ella import EllaError, EvaluationConfig, TrainingConfig, get_method, run_sequence
from ella.methods import TaskData
from ella.methods.jumplora import jump_gate, ramp, ramp_steps
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


def test_ramp_runs_over_integer_steps_from_twenty_to_eighty_percent():
    # (int(0.2·N), int(0.8·N)), the start at least step 1 and the end at least one step later
    assert ramp_steps(10, 0.2, 0.8) == (2, 8)
    assert ramp_steps(12, 0.2, 0.8) == (2, 9)  # 2.4 and 9.6 rounded down
    assert ramp_steps(3, 0.2, 0.8) == (1, 2)  # int(0.6) = 0 would come before any optimiser step
    assert ramp_steps(1, 0.2, 0.8) == (1, 2)
    assert [ramp(step, 2, 8) for step in (1, 2, 5, 8, 9)] == pytest.approx([0, 0, 0.5, 1, 1])


def prepared(tasks, num_steps=10, name="jumplora", **hyperparameters):
    model, _ = tiny_model()
    method = get_method(name, **hyperparameters)
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


def surviving_and_budget(model, jump) -> tuple[int, int]:
    """Entries of B·A that pass the gate |x| > θ, and the LoRA parameter count Σ r·(d_in + d_out) (global θ)."""
    survivors = budget = 0
    for layer in lora_layers(model, jump.adapter).values():
        product = layer.lora_B[jump.adapter].weight @ layer.lora_A[jump.adapter].weight
        survivors += int((product.abs() > jump.thresholds["model"].exp()).sum())
        r, d_in = layer.lora_A[jump.adapter].weight.shape
        budget += r * (d_in + product.shape[0])
    return survivors, budget


@pytest.mark.parametrize("num_steps, reset_step, mixes", [
    (10, 2, [0, 0, 1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1, 1, 1]),  # 0.2·10 = 2 exactly: reset once, after step 2
    (12, 2, [0, 0, 1 / 7, 2 / 7, 3 / 7, 4 / 7, 5 / 7, 6 / 7, 1, 1, 1, 1]),  # int(2.4) = 2, int(9.6) = 9
    (3, 1, [0, 1, 1]),  # int(0.6) = 0 comes before any step: after step 1; the end int(2.4) = 2
])
def test_schedule_resets_once_and_ramps_over_integer_steps(tasks, num_steps, reset_step, mixes):
    model, method = prepared(tasks, num_steps=num_steps)
    jump = method.update
    resets = []  # (step, surviving entries, budget) at each reset
    reset = jump.reset_thresholds

    def recorded_reset(model):
        reset(model)
        resets.append((jump.step, *surviving_and_budget(model, jump)))

    jump.reset_thresholds = recorded_reset
    seen = []
    for _ in range(num_steps):
        method.after_step(model)
        seen.append(jump.mix)
    assert seen == pytest.approx(mixes)
    # r = 8 on q (32 -> 32) and v (32 -> 16) of two blocks; the reset keeps exactly that many entries
    budget = 2 * 8 * (32 + 32) + 2 * 8 * (32 + 16)
    assert resets == [(reset_step, budget, budget)]


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
    kept = sum(int(u.count_nonzero()) for u in expected.values())
    assert report["surviving_entries"] == report["lora_parameters"] == kept
    assert set(report["density_per_module"]) == set(expected)
    assert method.state_dict() == {}  # λ = 0: JumpLoRA on IncLoRA keeps no W_past


def test_jumplora_ella_accumulates_the_merged_gated_updates(tasks):
    model, tokenizer = tiny_model()
    base = {name: value.clone() for name, value in model.state_dict().items()}
    method = get_method("jumplora-ella", lam=100.0)
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


def test_a_reset_that_finds_the_update_all_zero_is_refused(tasks):
    """B still 0 when θ is reset (every step before it at learning rate 0): no budget to keep, refused."""
    model, method = prepared(tasks, num_steps=10)
    with torch.no_grad():
        for layer in lora_layers(model, method.update.adapter).values():
            layer.lora_B[method.update.adapter].weight.zero_()
    method.after_step(model)
    with pytest.raises(EllaError, match=r"reset after optimiser step 2 of 10 found the update B·A of 'model' still "
                                        r"all zero: .* more optimiser steps or a shorter warm-up"):
        method.after_step(model)


def test_the_ella_penalty_trains_a_and_b_through_the_gate_but_not_the_threshold(tasks):
    """λ·mean_m ‖ΔW_eff^m ⊙ W_past^m‖² on one nonzero module, by hand. A's row 0 starts [1, 2, 0...], B's column 0
    [1, 3, 0...] (all else 0), so B·A = [[1, 2], [3, 6]] in the corner; s = 32 / 8 = 4, a = 0.5, θ = 2.9998
    (the entry 3 within ε/2 of θ, where the forward's straight-through estimator does move θ), W_past = 1."""
    model, method = prepared(tasks, name="jumplora-ella", lam=1.0)
    jump, name = method.update, "model.layers.0.self_attn.q_proj"
    layers = lora_layers(model, jump.adapter)
    A, B = layers[name].lora_A[jump.adapter].weight, layers[name].lora_B[jump.adapter].weight
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_A[jump.adapter].weight.zero_()
            layer.lora_B[jump.adapter].weight.zero_()
        A[0, :2] = torch.tensor([1.0, 2.0])
        B[:2, 0] = torch.tensor([1.0, 3.0])
        jump.thresholds["model"].fill_(math.log(2.9998))
    jump.mix = 0.5
    for module, layer in layers.items():
        method.parts["ella"].w_past.add(module, torch.ones_like(layer.base_layer.weight))
    penalty = method.penalty(model)
    # the gate keeps [[0, 0], [3, 6]]: ΔW_eff = 4·(0.5·[[0, 0], [3, 6]] + 0.5·[[1, 2], [3, 6]]) = [[2, 4], [12, 24]];
    # the mean over the 4 modules: (4 + 16 + 144 + 576) / 4 = 185
    assert penalty.item() == pytest.approx(185.0)
    penalty.backward()
    assert jump.thresholds["model"].grad is None  # no gradient reaches θ from the penalty
    # ∂/∂ΔW_eff = 2·ΔW_eff / 4 = [[1, 2], [6, 12]]; ∂/∂(B·A) = 4·(0.5·1[|B·A| > θ] + 0.5)·that = [[2, 4], [24, 48]]
    # ∂/∂A = Bᵀ·∂(B·A): row 0 = 1·[2, 4] + 3·[24, 48] = [74, 148];  ∂/∂B = ∂(B·A)·Aᵀ: column 0 = [2 + 8, 24 + 96]
    expected_a, expected_b = torch.zeros_like(A), torch.zeros_like(B)
    expected_a[0, :2] = torch.tensor([74.0, 148.0])
    expected_b[:2, 0] = torch.tensor([10.0, 120.0])
    torch.testing.assert_close(A.grad, expected_a)
    torch.testing.assert_close(B.grad, expected_b)
    # the forward pass's gate, on the same update, does train θ (the entry 3 is within the estimator's band)
    gated = jump.gated_update(layers[name], jump.adapter, jump.thresholds["model"], jump.mix)
    gated.sum().backward()
    assert jump.thresholds["model"].grad.item() != 0


def test_the_gated_branch_has_no_dropout_by_default(tasks):
    model, method = prepared(tasks)
    assert method.update.config.lora_dropout == 0.0
    assert all(isinstance(layer.lora_dropout[method.update.adapter], torch.nn.Identity)
               for layer in lora_layers(model, method.update.adapter).values())


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

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from ella import EllaError, get_method
from ella.methods.lora import lora_layers
from ella.models import tiny_model


def randomize_adapter(model, adapter: str, seed: int) -> dict[str, torch.Tensor]:
    """Give the adapter non-zero A and B (B starts at zero) and return its weights."""
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    with torch.no_grad():
        for name, layer in lora_layers(model, adapter).items():
            for part in (layer.lora_A[adapter], layer.lora_B[adapter]):
                part.weight.copy_(torch.randn(part.weight.shape, generator=generator) * 0.1)
            weights[name] = (layer.lora_A[adapter].weight.clone(), layer.lora_B[adapter].weight.clone())
    return weights


def test_inclora_merge_equals_summing_frozen_adapters(tasks):
    model, _ = tiny_model()
    reference_base = copy.deepcopy(model)
    method = get_method("inclora", lora_r=4, lora_alpha=8, lora_dropout=0.0)
    method.setup(model, tasks)
    adapters = []
    for t, task in enumerate(tasks):
        model = method.prepare(model, t, task)
        adapters.append(randomize_adapter(model, f"task{t}", seed=t))
        model = method.finish(model, t, task)
    assert not hasattr(model, "peft_config") or not model.peft_config  # merged: a plain model again

    # the same two adapters kept separate, frozen and both active: W0 + ΔW_0 + ΔW_1
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    reference = get_peft_model(reference_base, config, adapter_name="a0")
    reference.add_adapter("a1", config)
    for adapter, weights in zip(("a0", "a1"), adapters):
        with torch.no_grad():
            for name, layer in lora_layers(reference, adapter).items():
                layer.lora_A[adapter].weight.copy_(weights[name][0])
                layer.lora_B[adapter].weight.copy_(weights[name][1])
    reference.base_model.set_adapter(["a0", "a1"])
    ids = torch.randint(3, 200, (2, 9))
    model.eval(), reference.eval()
    torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_seqlora_trains_one_adapter_through_the_sequence(tasks):
    model, _ = tiny_model()
    method = get_method("seqlora")
    method.setup(model, tasks)
    first = method.prepare(model, 0, tasks[0])
    first = method.finish(first, 0, tasks[0])
    second = method.prepare(first, 1, tasks[1])
    assert second is first and list(second.peft_config) == ["sequence"]
    trainable = {n for n, p in second.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_seqft_trains_every_weight(tasks):
    model, _ = tiny_model()
    model.requires_grad_(False)
    method = get_method("seqft")
    method.setup(model, tasks)
    model = method.prepare(model, 0, tasks[0])
    assert all(p.requires_grad for p in model.parameters())


def test_prepare_before_setup_says_to_call_setup(tasks):
    """Without setup a LoRA part has no target modules resolved: a clear error, not an AttributeError."""
    model, _ = tiny_model()
    with pytest.raises(EllaError, match=r"call method.setup\(model, tasks\) once before the first method.prepare"):
        get_method("inclora").prepare(model, 0, tasks[0])


def test_default_targets_are_attention_q_and_v(tasks):
    for seq2seq, expected in ((False, ["q_proj", "v_proj"]), (True, ["q", "v"])):
        model, _ = tiny_model(seq2seq=seq2seq)
        method = get_method("inclora")
        method.setup(model, tasks)
        assert sorted(method.update.target_modules) == expected


def test_missing_target_modules_are_named_with_the_alternatives(tasks):
    model, _ = tiny_model()
    with pytest.raises(EllaError, match=r"attn_q not found .* q_proj"):
        get_method("ella", target_modules=["attn_q", "v_proj"]).setup(model, tasks)

"""GPT-2-style models: attention dropout while training, and Conv1D layers (a stored weight d_in x d_out)."""

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

import ella
from ella import engine
from ella.errors import EllaError
from ella.models import byte_tokenizer

from conftest import toy_tasks


def tiny_gpt2():
    tokenizer = byte_tokenizer(False)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=256,
                        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                        bos_token_id=tokenizer.bos_token_id)  # attention dropout 0.1, as GPT-2's
    return GPT2LMHeadModel(config), tokenizer


def test_attention_with_dropout_gives_a_query_that_sees_no_key_zero_as_the_fused_kernel():
    """The reference formula that ella's dropout computes attention with (dropout_p > 0): a left-padded causal
    row's padding may see no key at all; the fused kernel returns 0 there, and so must the formula, with finite
    gradients, or NaN spreads to every row through the next layer's values."""
    torch.manual_seed(0)
    query, key, value = (torch.randn(2, 3, 4, 8, requires_grad=True) for _ in range(3))
    sees = torch.ones(2, 1, 4, 4, dtype=torch.bool).tril()
    sees[0, :, :, 0] = False  # row 0's first position is padding: its query 0 sees no key
    expected = F.scaled_dot_product_attention(query, key, value, attn_mask=sees)
    assert (expected[0, :, 0] == 0).all()
    with engine.training_dropout(engine.ProcessShare()):
        # p = 1e-9 rounds to a keep probability of 1 (a multiple of 1/65536): the formula without drops
        got = F.scaled_dot_product_attention(query, key, value, attn_mask=sees, dropout_p=1e-9)
    torch.testing.assert_close(got, expected)
    got.square().sum().backward()
    assert all(t.grad.isfinite().all() for t in (query, key, value))


@pytest.mark.parametrize("name", ["ella", "jumplora-ella"])
def test_lora_methods_merge_and_penalise_conv1d_layers(name):
    """GPT-2's c_attn is a Conv1D (32 -> 96, its weight stored 32 x 96): the penalty and W_past see each update as
    d_out x d_in, the merges add it transposed to the stored weight, so after two tasks W_past is the weights' change
    transposed, and the run trains without NaN."""
    model, tokenizer = tiny_gpt2()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("c_attn.weight")}
    method = ella.get_method(name, lam=1e3, w_past="dense")
    model, result = ella.run_sequence(model, tokenizer, toy_tasks(), method,
                                      ella.TrainingConfig(max_length=64, mixed_precision="no", batch_size=4),
                                      ella.EvaluationConfig())
    losses = [loss for log in result.task_logs for loss in log["steps"]["loss"]]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert result.task_logs[1]["penalty_mean"] > 0  # task 2 is penalised against task 1's update
    w_past = method.parts["ella"].w_past
    for parameter, weight in before.items():
        module = parameter.removesuffix(".weight")
        change = dict(model.named_parameters())[parameter].detach() - weight
        assert change.abs().max() > 0
        assert w_past.matrix(module).shape == (96, 32)
        torch.testing.assert_close(w_past.matrix(module), change.T, rtol=1e-4, atol=1e-6)


def test_sculpting_refuses_a_model_without_linear_targets():
    """peft's OSF tuner takes nn.Linear only: on GPT-2's Conv1D targets it adapts nothing, which ella says."""
    model, tokenizer = tiny_gpt2()
    with pytest.raises(EllaError, match="takes torch.nn.Linear layers only"):
        ella.run_sequence(model, tokenizer, toy_tasks(), ella.get_method("sculpting"),
                          ella.TrainingConfig(max_length=64, mixed_precision="no", batch_size=4),
                          ella.EvaluationConfig())

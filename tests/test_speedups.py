"""The speed-ups change no result: passes of similar length train as the whole micro-batch, and evaluating the
rests of prompts after a shared prefix's cache predicts and scores as the whole prompts."""

import contextlib

import pytest
import torch
from accelerate import Accelerator

from ella import engine, get_method
from ella.data import Example, Task, TaskEncoder, collate
from ella.engine import EvaluationConfig, TrainingConfig, dropout_mask, run_sequence, training_passes
from ella.evaluation import SharedPrefix, evaluate_task, option_log_likelihoods
from ella.models import frozen_weights_cast, tiny_model, training_attention


def test_a_micro_batch_that_fits_is_one_pass_in_its_order():
    assert training_passes([3, 0, 2], [10, 50, 20, 40], tokens_per_pass=150) == [[3, 0, 2]]  # 3 rows x 50


def test_a_larger_micro_batch_is_cut_longest_first_within_the_budget():
    lengths = [10, 30, 20, 40, 30]
    # longest first: 40 | 30, 30 (2 x 30 = 60) | 20, 10 (2 x 20 = 40; 3 x 20 = 60 with no third left)
    assert training_passes([0, 1, 2, 3, 4], lengths, tokens_per_pass=60) == [[3], [1, 4], [2, 0]]
    assert training_passes([0, 3], lengths, tokens_per_pass=5) == [[3], [0]]  # one example at least


def mixed_length_tasks() -> list[Task]:
    """Inputs of 1 to 40 characters: rows of very different lengths in every micro-batch."""
    words = ["red", "blue"]
    train = [Example("x" * (1 + (7 * i) % 40), words[i % 2]) for i in range(16)]
    test = [Example("y" * (1 + (5 * i) % 30), words[i % 2]) for i in range(4)]
    return [Task("colour", train, test, labels=words, prefix="Colour? ")]


def test_passes_train_as_the_whole_micro_batch():
    """Without dropout, the same steps: the same losses and the same merged weights, to float rounding."""
    results = []
    for tokens_per_pass in (10_000, 40):  # one pass per micro-batch of 8; passes of one to a few rows
        model, tokenizer = tiny_model()
        method = get_method("inclora", lora_dropout=0.0)
        training = TrainingConfig(batch_size=8, learning_rate=1e-2, mixed_precision="no",
                                  tokens_per_pass=tokens_per_pass)
        model, result = run_sequence(model, tokenizer, mixed_length_tasks(), method, training)
        results.append((result.task_logs[0]["steps"]["loss"], model.state_dict()))
    (losses, weights), (cut_losses, cut_weights) = results
    torch.testing.assert_close(cut_losses, losses, rtol=1e-5, atol=1e-6)
    for name, weight in weights.items():
        torch.testing.assert_close(cut_weights[name], weight, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_prompt_rests_after_the_shared_prefix_score_as_whole_prompts(tasks, attention):
    model, tokenizer = tiny_model()
    model.set_attn_implementation(attention)
    model.eval()
    task = tasks[1]
    encoder = TaskEncoder(tokenizer, task, max_length=64, seq2seq=False)
    prompts = encoder.generation(task.test)
    prefix = SharedPrefix(model, encoder.shared_prefix(), "cpu")
    assert prefix.ids.shape[1] == len(encoder.head) + len("Parity? ")  # the byte tokenizer: one token per byte
    options = [encoder.target_ids(label) for label in task.labels]
    with torch.no_grad():
        whole = option_log_likelihoods(model, collate(prompts, tokenizer.pad_token_id, False), options)
        rests = collate([prefix.rest(p) for p in prompts], tokenizer.pad_token_id, False)
        after_prefix = option_log_likelihoods(model, rests, options, prefix)
    torch.testing.assert_close(after_prefix, whole, rtol=1e-4, atol=1e-4)


def test_generation_after_the_shared_prefix_predicts_as_whole_prompts(tasks):
    """evaluate_task (prefix cache, batches of rests) against plain greedy generation of each whole prompt."""
    model, tokenizer = tiny_model(seed=3)  # its continuations differ from prompt to prompt
    task = tasks[0]
    encoder = TaskEncoder(tokenizer, task, max_length=64, seq2seq=False)
    score = evaluate_task(model, tokenizer, task, encoder, "generate", 4, Accelerator(cpu=True), max_new_tokens=6)
    expected = []
    for prompt in encoder.generation(task.test):
        ids = torch.tensor([prompt.input_ids])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        expected.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    assert score.predictions == expected
    assert len(set(expected)) > 1  # the prompts lead to different text: a prediction off its own prompt shows


def inclora_in_bf16(tasks, evaluation: EvaluationConfig, monkeypatch, without: str | None = None):
    """The tiny model (its head tied to the embedding, as SmolLM2's is) through IncLoRA under bf16 autocast;
    ``without``: the engine's speed-up of that name (a context manager) left out."""
    if without:
        monkeypatch.setattr(engine, without, lambda *args: contextlib.nullcontext())
    model, tokenizer = tiny_model()
    model.lm_head.weight = model.model.embed_tokens.weight
    training = TrainingConfig(batch_size=4, learning_rate=1e-2, mixed_precision="bf16")
    model, result = run_sequence(model, tokenizer, tasks, get_method("inclora"), training, evaluation)
    monkeypatch.undo()
    return model, result


def test_frozen_weights_cast_once_train_and_predict_bit_for_bit_as_autocast(monkeypatch, tasks):
    """Under bf16 autocast on a CPU, training with the frozen weights' bf16 copies made once gives exactly the
    losses, merged weights and predictions of autocast's casts at every product; the fp32 weights and the head's
    tie come back."""
    evaluation = EvaluationConfig(mode="generate", max_new_tokens=4)
    model, result = inclora_in_bf16(tasks, evaluation, monkeypatch)
    reference_model, reference = inclora_in_bf16(tasks, evaluation, monkeypatch, without="frozen_weights_cast")
    assert [log["steps"]["loss"] for log in result.task_logs] == [log["steps"]["loss"] for log in reference.task_logs]
    assert result.final_predictions == reference.final_predictions and result.matrix == reference.matrix
    for (name, weight), reference_weight in zip(model.state_dict().items(), reference_model.state_dict().values()):
        assert weight.dtype == torch.float32 and torch.equal(weight, reference_weight), name
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied again


def test_frozen_weights_cast_copies_only_frozen_linear_weights_and_puts_them_back():
    model, _ = tiny_model()
    model.lm_head.weight = model.model.embed_tokens.weight
    trained = model.model.layers[0].self_attn.q_proj.weight
    frozen = [p for name, p in model.named_parameters() if name != "model.layers.0.self_attn.q_proj.weight"]
    for weight in frozen:
        weight.requires_grad_(False)
    before = {name: weight for name, weight in model.named_parameters(remove_duplicate=False)}
    with frozen_weights_cast(model, "bf16", torch.device("cpu")):
        assert model.lm_head.weight.dtype == model.model.layers[1].mlp.up_proj.weight.dtype == torch.bfloat16
        assert torch.equal(model.lm_head.weight, before["lm_head.weight"].to(torch.bfloat16))
        assert model.model.embed_tokens.weight.dtype == torch.float32  # the embedding as autocast keeps it
        assert model.model.layers[0].self_attn.q_proj.weight is trained  # it trains: autocast caches its cast
    with frozen_weights_cast(model, "no", torch.device("cpu")):
        assert model.lm_head.weight.dtype == torch.float32
    assert all(weight is before[name] for name, weight in model.named_parameters(remove_duplicate=False))


@pytest.mark.parametrize("seq2seq", [False, True])
def test_training_attention_is_plain_products_under_cpu_bf16_only_and_comes_back(seq2seq):
    model, _ = tiny_model(seq2seq)
    assert model.config._attn_implementation == "sdpa"
    with training_attention(model, "bf16", torch.device("cpu")):
        assert model.config._attn_implementation == "eager"
    assert model.config._attn_implementation == "sdpa"
    with training_attention(model, "no", torch.device("cpu")):
        assert model.config._attn_implementation == "sdpa"
    with training_attention(model, "bf16", torch.device("cuda")):
        assert model.config._attn_implementation == "sdpa"


def test_training_with_plain_attention_products_learns_as_the_fused_kernel(monkeypatch, tasks):
    """Under bf16 autocast the plain products and torch's fused kernel train to the same losses and predictions up
    to bf16 rounding; the run ends with the model's own attention."""
    model, result = inclora_in_bf16(tasks, EvaluationConfig(mode="rank"), monkeypatch)
    _, reference = inclora_in_bf16(tasks, EvaluationConfig(mode="rank"), monkeypatch, without="training_attention")
    assert model.config._attn_implementation == "sdpa"
    losses = [loss for log in result.task_logs for loss in log["steps"]["loss"]]
    reference_losses = [loss for log in reference.task_logs for loss in log["steps"]["loss"]]
    assert losses != reference_losses  # the two paths ran: bf16 rounds them differently
    assert losses == pytest.approx(reference_losses, rel=2e-2)
    assert result.matrix == reference.matrix


def test_dropout_mask_drops_each_element_with_probability_p():
    """The fast mask: values 0 or 1/(1-p), a fraction p of zeros (within 5 standard errors over 400,000 draws),
    in every one of the four 16-bit lanes of each 64-bit draw, and the same mask for the same seed."""
    torch.manual_seed(0)
    mask = dropout_mask((1000, 400), 0.1, torch.float32, "cpu")
    assert mask.unique().tolist() == [0.0, pytest.approx(1 / 0.9)]
    lanes = (mask.flatten() == 0).float().view(-1, 4).mean(0)
    tolerance = 5 * (0.1 * 0.9 / 100_000) ** 0.5
    assert ((lanes - 0.1).abs() < tolerance).all(), lanes
    torch.manual_seed(0)
    assert torch.equal(dropout_mask((1000, 400), 0.1, torch.float32, "cpu"), mask)
    assert dropout_mask((3, 5), 0.5, torch.bfloat16, "cpu").dtype == torch.bfloat16

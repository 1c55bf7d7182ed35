import contextlib

import pytest
import torch
from accelerate import Accelerator
from transformers import MistralConfig, MistralForCausalLM

from ella import EllaError, evaluation, get_method
from ella.data import IGNORE_INDEX, Example, Task, TaskEncoder, collate
from ella.engine import EvaluationConfig, TrainingConfig, run_sequence
from ella.evaluation import answer_token_nll, evaluate_task, option_groups, option_log_likelihoods
from ella.scores import normalize_answer
from ella.models import tiny_model


def test_normalised_exact_match():
    assert normalize_answer("  Science  or Technology. ") == "science or technology"
    assert normalize_answer("Very-Negative!") == normalize_answer("verynegative")


def test_causal_encoding_masks_the_prompt_and_ends_with_eos(tasks):
    _, tokenizer = tiny_model()
    encoder = TaskEncoder(tokenizer, tasks[0], max_length=64, seq2seq=False)
    (item,) = encoder.training([Example("sky", "blue")])
    answer = [i for i, label in enumerate(item.labels) if label != IGNORE_INDEX]
    assert tokenizer.decode(item.input_ids) == "<s>Colour? sky\nAnswer: blue</s>"
    assert answer == list(range(answer[0], len(item.input_ids)))  # the answer is the end of the row
    assert tokenizer.decode([item.input_ids[i] for i in answer]) == " blue</s>"


def test_long_inputs_are_truncated_but_keep_the_answer_prefix(tasks):
    _, tokenizer = tiny_model()
    encoder = TaskEncoder(tokenizer, tasks[0], max_length=48, seq2seq=False)
    (item,) = encoder.training([Example("x" * 500, "blue")])  # the longest label fills the row exactly
    assert len(item.input_ids) == 48
    assert tokenizer.decode(item.input_ids).endswith("xx\nAnswer: blue</s>")
    with pytest.raises(EllaError, match="leaves no room for the inputs"):
        TaskEncoder(tokenizer, tasks[0], max_length=23, seq2seq=False)  # 1 + 8 + 8 + 6 tokens: none left


def test_seq2seq_encoding(tasks):
    _, tokenizer = tiny_model(seq2seq=True)
    (item,) = TaskEncoder(tokenizer, tasks[0], max_length=64, seq2seq=True).training([Example("sky", "blue")])
    assert tokenizer.decode(item.input_ids) == "Colour? sky\nAnswer:</s>"
    assert tokenizer.decode(item.labels) == "blue</s>"


def test_collate_pads_causal_rows_on_the_left():
    batch = collate([type("E", (), {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]})(),
                     type("E", (), {"input_ids": [8], "labels": [8]})()], pad_token_id=0, seq2seq=False)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, -100, 8]]


@pytest.mark.parametrize("seq2seq", [False, True])
def test_answer_nll_of_a_padded_batch_equals_one_example_at_a_time(tasks, seq2seq):
    """Left padding, position ids and logits of the last positions only must not change the loss."""
    model, tokenizer = tiny_model(seq2seq=seq2seq)
    model.eval()
    encoder = TaskEncoder(tokenizer, tasks[0], max_length=64, seq2seq=seq2seq)
    items = encoder.training([Example("a much longer input", "blue"), Example("s", "red")])
    batch = collate(items, tokenizer.pad_token_id, seq2seq)
    with torch.no_grad():
        nll, mask = answer_token_nll(model, batch)
        for row, item in enumerate(items):
            ids, labels = torch.tensor([item.input_ids]), torch.tensor([item.labels])
            if seq2seq:
                logits, targets = model(input_ids=ids, labels=labels).logits[0], labels[0]
            else:
                logits, targets = model(input_ids=ids).logits[0, :-1], labels[0, 1:]
            keep = targets != IGNORE_INDEX
            expected = torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="none")
            torch.testing.assert_close(nll[row][mask[row]], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("seq2seq", [False, True])
def test_batched_evaluation_matches_one_example_at_a_time(tasks, seq2seq):
    model, tokenizer = tiny_model(seq2seq=seq2seq)
    task = tasks[1]
    encoder = TaskEncoder(tokenizer, task, max_length=64, seq2seq=seq2seq)
    accelerator = Accelerator(cpu=True)
    for mode in ("generate", "rank"):
        batched = evaluate_task(model, tokenizer, task, encoder, mode, 4, accelerator, max_new_tokens=6)
        single = evaluate_task(model, tokenizer, task, encoder, mode, 1, accelerator, max_new_tokens=6)
        assert batched.predictions == single.predictions
        assert 0 <= batched.accuracy <= 100


@pytest.mark.parametrize("tokens_per_pass", [256, 1])  # all options in one pass; one pass per option
@pytest.mark.parametrize("seq2seq, attention", [(False, "sdpa"), (False, "eager"), (True, "sdpa")])
def test_rank_scores_are_each_options_log_likelihood(tasks, seq2seq, attention, tokens_per_pass, monkeypatch):
    """The prompt encoded once (cache / encoder output reused) and the options scored together (one continuation
    under a block-causal mask / one decoder batch) give the same log p(option) as scoring each prompt + option
    sequence in full, and the prediction is the most likely option."""
    monkeypatch.setattr("ella.evaluation.OPTION_TOKENS_PER_PASS", tokens_per_pass)
    model, tokenizer = tiny_model(seq2seq=seq2seq)
    model.set_attn_implementation(attention)
    model.eval()
    task = tasks[1]
    encoder = TaskEncoder(tokenizer, task, max_length=64, seq2seq=seq2seq)
    prompts = collate(encoder.generation(task.test), tokenizer.pad_token_id, seq2seq)
    options = [encoder.target_ids(label) for label in task.labels]
    with torch.no_grad():
        scores = option_log_likelihoods(model, prompts, options)
        for row, example in enumerate(task.test):
            full = encoder.training([Example(example.input, label) for label in task.labels])
            nll, mask = answer_token_nll(model, collate(full, tokenizer.pad_token_id, seq2seq))
            torch.testing.assert_close(scores[row], -(nll * mask).sum(1), rtol=1e-4, atol=1e-4)
    score = evaluate_task(model, tokenizer, task, encoder, "rank", 3, Accelerator(cpu=True))
    assert score.predictions == [task.labels[i] for i in scores.argmax(1).tolist()]
    assert score.accuracy == 100 * sum(p == e.output for p, e in zip(score.predictions, task.test)) / len(task.test)


def test_rank_scores_only_the_options_that_can_win(tasks, monkeypatch):
    """``only_the_best``: the argmax of every option scored in full, the best option's score exact, the others at
    their score or above it (a bound); the options whose bound falls below the best's score are not read."""
    model, tokenizer = tiny_model()
    training = TrainingConfig(batch_size=4, learning_rate=1e-2, epochs=20)  # a model sure of its labels
    model, _ = run_sequence(model, tokenizer, tasks[:1], get_method("seqft"), training, EvaluationConfig(mode="rank"))
    model.eval()
    task = tasks[0]
    encoder = TaskEncoder(tokenizer, task, max_length=64, seq2seq=False)
    prompts = collate(encoder.generation(task.test), tokenizer.pad_token_id, False)
    options = [encoder.target_ids(label) for label in task.labels]
    assert options[0][0] == options[1][0]  # both start with a space: the first token alone bounds nothing
    read = []
    continuation = evaluation._causal_continuation
    monkeypatch.setattr(evaluation, "_causal_continuation", lambda model, cache, mask, options, chosen, form:
                        read.append(chosen) or continuation(model, cache, mask, options, chosen, form))
    with torch.no_grad():
        full = option_log_likelihoods(model, prompts, options)
        assert len(read) == 1  # all options of all rows in one pass
        read.clear()
        best = option_log_likelihoods(model, prompts, options, only_the_best=True)
    rows = torch.arange(len(full))
    assert torch.equal(best.argmax(1), full.argmax(1)) and len(set(full.argmax(1).tolist())) == 2
    torch.testing.assert_close(best[rows, full.argmax(1)], full.max(1).values, rtol=0, atol=1e-5)
    assert (best >= full - 1e-5).all()
    leaders, rest = read  # the likeliest first token's option in every row, then what can still beat it
    assert leaders == [[0]] * len(full)  # a tie on the space: the first option leads
    assert rest == [[] if full[row].argmax() == 0 else [1] for row in range(len(full))]
    assert (best[:, 1] > full[:, 1] + 1e-4)[full.argmax(1) == 0].all()  # left with their bound


def test_processes_share_the_test_examples_and_gather_every_prediction(tasks, monkeypatch):
    """Two processes, simulated in turn: each predicts every other example, and the gathered predictions are those
    of one process predicting all of them, each at its example."""
    model, tokenizer = tiny_model()
    task = tasks[0]
    encoder = TaskEncoder(tokenizer, task, max_length=64, seq2seq=False)
    echo = lambda batch: tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)  # noqa: E731
    monkeypatch.setattr("ella.evaluation._generation_predictor", lambda *args: echo)  # "predicts" its prompt
    alone = evaluate_task(model, tokenizer, task, encoder, "generate", 2, Accelerator(cpu=True))
    assert all(example.input in prediction for example, prediction in zip(task.test, alone.predictions))

    class Process:  # what evaluate_task uses of an Accelerator
        def __init__(self, index):
            self.process_index, self.num_processes, self.device = index, 2, torch.device("cpu")
            self.is_local_main_process = index == 0

        def autocast(self):
            return contextlib.nullcontext()

    shares = {}
    for index in (1, 0):
        monkeypatch.setattr("ella.evaluation.gather_object", lambda share: shares.setdefault(index, share) and
                            [pair for i in sorted(shares) for pair in shares[i]])
        together = evaluate_task(model, tokenizer, task, encoder, "generate", 2, Process(index))
    assert sorted(i for i, _ in shares[0]) == list(range(0, len(task.test), 2))
    assert together.predictions == alone.predictions and together.accuracy == alone.accuracy


def test_option_groups_bound_the_tokens_of_one_pass(monkeypatch):
    monkeypatch.setattr("ella.evaluation.OPTION_TOKENS_PER_PASS", 5)
    assert option_groups([[1, 2], [3, 4, 5], [6], [7, 8, 9, 10, 11, 12], [13]]) == [[0, 1], [2], [3], [4]]


def test_rank_refuses_an_attention_without_custom_masks(tasks):
    model, tokenizer = tiny_model()
    model.config._attn_implementation = "flash_attention_2"  # not installed here: refused before any forward pass
    encoder = TaskEncoder(tokenizer, tasks[1], max_length=64, seq2seq=False)
    with pytest.raises(EllaError, match="attn_implementation='sdpa'.*--eval-mode generate"):
        evaluate_task(model, tokenizer, tasks[1], encoder, "rank", 4, Accelerator(cpu=True))


def test_rank_stays_within_a_sliding_attention_window(tasks):
    """A custom mask overrides a sliding window, so options are ranked only while prompt and option fit inside it
    (then they equal the full sequences' log-likelihoods under the model's own windowed mask), refused beyond."""
    _, tokenizer = tiny_model()
    task = tasks[1]
    encoder = TaskEncoder(tokenizer, task, max_length=64, seq2seq=False)
    prompts = collate(encoder.generation(task.test[:2]), tokenizer.pad_token_id, False)
    options = [encoder.target_ids(label) for label in task.labels]
    longest = int(prompts["attention_mask"].sum(1).max()) + max(map(len, options)) - 1
    config = MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                           eos_token_id=tokenizer.eos_token_id, sliding_window=longest)
    model = MistralForCausalLM(config).eval()
    with torch.no_grad():
        scores = option_log_likelihoods(model, prompts, options)
        full = encoder.training([Example(task.test[0].input, label) for label in task.labels])
        nll, mask = answer_token_nll(model, collate(full, tokenizer.pad_token_id, False))
        torch.testing.assert_close(scores[0], -(nll * mask).sum(1), rtol=1e-4, atol=1e-4)
        model.config.sliding_window = longest - 1
        with pytest.raises(EllaError, match=f"sliding attention window \\({longest - 1} tokens.*--eval-mode generate"):
            option_log_likelihoods(model, prompts, options)


def test_rank_needs_labels(tasks):
    model, tokenizer = tiny_model()
    task = tasks[0]
    task.labels = None
    encoder = TaskEncoder(tokenizer, task, max_length=64, seq2seq=False)
    with pytest.raises(EllaError, match="rank classification needs a label set"):
        evaluate_task(model, tokenizer, task, encoder, "rank", 4, Accelerator(cpu=True))


def test_a_task_that_keeps_its_input_end_loses_the_start():
    _, tokenizer = tiny_model()
    task = Task("code", [Example("x", "y")], [Example("x", "y")], suffix="", keep_input_end=True)
    (item,) = TaskEncoder(tokenizer, task, max_length=16, seq2seq=False).generation([Example("a" * 40 + "END", "y")])
    assert tokenizer.decode(item.input_ids).endswith("aaEND")

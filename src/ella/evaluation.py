"""Scoring answers: the answer-only loss, greedy-generation exact match, and rank classification.

- ``generate`` (default, the papers' protocol): greedy decoding of the continuation only, scored by the task's
  metric (``ella.scores``): the normalised exact match on the CL benchmark, ROUGE-L, SARI, ... elsewhere.
- ``rank``: the label option with the highest log-likelihood ``Σ log p(label tokens + EOS | prompt)`` wins;
  faster (one forward pass per option, no decoding loop) and never off the label set.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import IGNORE_INDEX, Example, Task, TaskEncoder, collate
from .errors import EllaError
from .models import is_seq2seq
from .scores import ANSWER_METRICS

EVAL_MODES = {
    "generate": "greedy generation, normalised exact match",
    "rank": "rank classification: the label option with the highest log-likelihood",
}
def hf_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under any DDP / peft wrapper."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def answer_token_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Negative log-likelihood of each answer token, (B, K), and the mask of real answer tokens, (B, K).

    Causal batches are left-padded, so all answers end at the last position: logits are computed for the last
    K+1 positions only (K = the longest answer), which skips the vocabulary projection of the whole prompt.
    """
    labels = batch["labels"]
    if is_seq2seq(model):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).logits
        targets = labels
    else:
        answer_columns = (labels != IGNORE_INDEX).any(0).nonzero()
        k = labels.shape[1] - int(answer_columns[0]) if len(answer_columns) else 1
        mask = batch["attention_mask"]
        keeps_logits = "logits_to_keep" in inspect.signature(hf_model(model).forward).parameters
        kept = {"logits_to_keep": k + 1} if keeps_logits else {}
        out = model(input_ids=batch["input_ids"], attention_mask=mask,
                    position_ids=(mask.cumsum(-1) - 1).clamp(min=0), **kept)
        logits = out.logits[:, -(k + 1):-1]
        targets = labels[:, -k:]
    nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                          reduction="none").view(targets.shape)
    return nll, targets != IGNORE_INDEX


@dataclass
class TaskScore:
    accuracy: float  # percent, by the task's metric (exact match unless the task says otherwise)
    predictions: list[str]


def batches(items: list, batch_size: int):
    """Indices of ``items`` in batches of similar length (longest first), to waste little on padding."""
    order = sorted(range(len(items)), key=lambda i: -len(items[i].input_ids))
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


@torch.no_grad()
def evaluate_task(model, tokenizer, task: Task, encoder: TaskEncoder, mode: str, batch_size: int,
                  accelerator, max_new_tokens: int | None = None, progress: str = "") -> TaskScore:
    """The score (%) of ``model`` on ``task.test`` by the task's metric, and the prediction for each example."""
    if mode not in EVAL_MODES:
        raise EllaError(f"unknown evaluation mode {mode!r}: choose one of {', '.join(EVAL_MODES)}")
    model.eval()
    if mode == "rank":
        predictions = _rank(model, tokenizer, task, encoder, batch_size, accelerator, progress)
    else:
        new_tokens = max_new_tokens or encoder.longest_target + 4  # room for trailing punctuation
        predictions = _generate(model, tokenizer, task, encoder, batch_size, accelerator, new_tokens, progress)
    score = ANSWER_METRICS[task.metric]
    return TaskScore(sum(score(p, e) for p, e in zip(predictions, task.test)) / len(task.test), predictions)


def _generate(model, tokenizer, task, encoder, batch_size, accelerator, max_new_tokens, progress) -> list[str]:
    seq2seq = is_seq2seq(model)
    config = copy.deepcopy(hf_model(model).generation_config)
    config.update(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, temperature=None, top_p=None,
                  top_k=None, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    prompts = encoder.generation(task.test)
    predictions = [""] * len(prompts)
    for indices in tqdm(list(batches(prompts, batch_size)), desc=progress, leave=False,
                        disable=not accelerator.is_local_main_process):
        batch = {k: v.to(accelerator.device) for k, v in
                 collate([prompts[i] for i in indices], tokenizer.pad_token_id, seq2seq).items()}
        with accelerator.autocast():
            out = model.generate(**batch, generation_config=config)
        continuation = out if seq2seq else out[:, batch["input_ids"].shape[1]:]
        for i, text in zip(indices, tokenizer.batch_decode(continuation, skip_special_tokens=True)):
            predictions[i] = text.strip()
    return predictions


def _rank(model, tokenizer, task, encoder, batch_size, accelerator, progress) -> list[str]:
    if not task.labels:
        raise EllaError(f"rank classification needs a label set, and task {task.name} has none; "
                        "give the task \"labels\" or use --eval-mode generate")
    options = [encoder.target_ids(label) for label in task.labels]
    prompts = encoder.generation(task.test)
    predictions = [""] * len(prompts)
    for indices in tqdm(list(batches(prompts, batch_size)), desc=progress, leave=False,
                        disable=not accelerator.is_local_main_process):
        batch = {k: v.to(accelerator.device) for k, v in
                 collate([prompts[i] for i in indices], tokenizer.pad_token_id, is_seq2seq(model)).items()}
        with accelerator.autocast():
            scores = option_log_likelihoods(model, batch, options)
        for i, best in zip(indices, scores.argmax(1).tolist()):
            predictions[i] = task.labels[best]
    return predictions


def option_log_likelihoods(model, batch: dict[str, torch.Tensor], options: list[list[int]]) -> torch.Tensor:
    """log p(option | prompt) for every prompt of the batch and every option (token ids ending with EOS), (E, K).

    The prompt is encoded once per batch, not once per option: a causal LM keeps its key/value cache and runs
    each option as a short continuation (then drops it from the cache); an encoder-decoder reuses the encoder
    output and runs the decoder on each option.
    """
    mask = batch["attention_mask"]
    rows = mask.shape[0]
    scores = torch.zeros(rows, len(options), device=mask.device)
    if is_seq2seq(model):
        encoded = model.get_encoder()(input_ids=batch["input_ids"], attention_mask=mask)
        for k, option in enumerate(options):
            labels = torch.tensor(option, device=mask.device).repeat(rows, 1)
            logits = model(encoder_outputs=encoded, attention_mask=mask, labels=labels).logits
            scores[:, k] = logits.float().log_softmax(-1).gather(-1, labels.unsqueeze(-1)).sum((1, 2))
        return scores
    lengths = mask.sum(1, keepdim=True)
    out = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                use_cache=True, logits_to_keep=1)
    first = out.logits[:, -1].float().log_softmax(-1)  # predicts each option's first token
    cache = out.past_key_values
    for k, option in enumerate(options):
        scores[:, k] = first[:, option[0]]
        if len(option) > 1:
            rest = torch.tensor(option, device=mask.device).repeat(rows, 1)
            steps = len(option) - 1
            logits = model(input_ids=rest[:, :-1], past_key_values=cache, use_cache=True,
                           attention_mask=torch.cat([mask, mask.new_ones(rows, steps)], 1),
                           position_ids=lengths + torch.arange(steps, device=mask.device)).logits
            scores[:, k] += logits.float().log_softmax(-1).gather(-1, rest[:, 1:].unsqueeze(-1)).sum((1, 2))
            cache.crop(-steps)  # back to the prompt alone for the next option
    return scores

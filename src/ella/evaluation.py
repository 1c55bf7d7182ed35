"""Scoring answers: the answer-only loss, greedy-generation exact match, and rank classification.

- ``generate`` (default, the papers' protocol): greedy decoding of the continuation only, scored by the task's
  metric (``ella.scores``): the normalised exact match on the CL benchmark, ROUGE-L, SARI, ... elsewhere.
- ``rank``: the label option with the highest log-likelihood ``Σ log p(label tokens + EOS | prompt)`` wins;
  the prompt and then the options in a few forward passes (no decoding loop), reading to their end only the options
  that can still win; never off the label set.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from accelerate.utils import gather_object
from tqdm.auto import tqdm
from transformers import DynamicCache

from .data import IGNORE_INDEX, Encoded, Task, TaskEncoder, collate
from .errors import EllaError
from .models import hf_model, is_seq2seq
from .scores import ANSWER_METRICS

EVAL_MODES = {
    "generate": "greedy generation, each answer scored by its task's metric",
    "rank": "rank classification: the label option with the highest log-likelihood",
}


def scoring_description(mode: str, task_metrics: dict[str, str]) -> str:
    """How the tasks were scored, in words: ``task_metrics`` maps each task to its metric."""
    if mode == "rank":
        return EVAL_MODES["rank"]
    if task_metrics and set(task_metrics.values()) == {"exact_match"}:
        return "greedy generation, normalised exact match"
    return "greedy generation; " + ", ".join(f"{task} {metric}" for task, metric in task_metrics.items())


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded rows: each row's first real token is at position 0."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def answer_token_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Negative log-likelihood of each answer token, (B, K), and the mask of real answer tokens, (B, K).

    Causal batches are left-padded, so all answers end at the last position: logits are computed only for the K
    positions that predict them (K = the longest answer), which skips the vocabulary projection of the whole
    prompt. The positions go to the model as a tensor: the hidden states it selects are then contiguous, and the
    projection is one matrix product (a slice of the last K+1 positions made it a batched product that repeats the
    vocabulary matrix for every row, many times slower on a CPU).
    """
    labels = batch["labels"]
    if is_seq2seq(model):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).logits
        targets = labels
    else:
        width = labels.shape[1]
        answer_columns = (labels != IGNORE_INDEX).any(0).nonzero()
        k = width - int(answer_columns[0]) if len(answer_columns) else 1
        mask = batch["attention_mask"]
        predicting = torch.arange(width - k - 1, width - 1, device=labels.device)
        keeps_logits = "logits_to_keep" in inspect.signature(hf_model(model).forward).parameters
        kept = {"logits_to_keep": predicting} if keeps_logits else {}
        logits = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions(mask),
                       **kept).logits
        logits = logits if keeps_logits else logits[:, predicting]
        targets = labels[:, -k:]
    return token_nll(logits, targets), targets != IGNORE_INDEX


@dataclass
class TaskScore:
    accuracy: float  # percent, by the task's metric (exact match unless the task says otherwise)
    predictions: list[str]
    example_scores: list[float]  # each test example's score (0-100): what a bootstrap over examples resamples


def batches(items: list, batch_size: int):
    """Indices of ``items`` in batches of similar length (longest first), to waste little on padding."""
    order = sorted(range(len(items)), key=lambda i: -len(items[i].input_ids))
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


@torch.no_grad()
def evaluate_task(model, tokenizer, task: Task, encoder: TaskEncoder, mode: str, batch_size: int,
                  accelerator, max_new_tokens: int | None = None, progress: str = "") -> TaskScore:
    """The score (%) of ``model`` on ``task.test`` by the task's metric, and the prediction for each example.

    Under several processes each one predicts its share of the examples and all of them receive every prediction.
    """
    if mode not in EVAL_MODES:
        raise EllaError(f"unknown evaluation mode {mode!r}: choose one of {', '.join(EVAL_MODES)}")
    model.eval()
    seq2seq = is_seq2seq(model)
    prompts = encoder.generation(task.test)
    # a prompt keeps one token after the prefix at least: the one that predicts the answer
    shared = encoder.shared_prefix()[:min(len(prompt.input_ids) for prompt in prompts) - 1]
    prefix = SharedPrefix(model, shared, accelerator.device) if shared and not seq2seq else None
    if mode == "rank":
        predict = _rank_predictor(model, task, encoder, prefix)
    else:
        new_tokens = max_new_tokens or encoder.longest_target + 4  # room for trailing punctuation
        predict = _generation_predictor(model, tokenizer, new_tokens, prefix)
    share = list(range(accelerator.process_index, len(prompts), accelerator.num_processes))
    predicted = []  # (example index, prediction) of this process's share
    for places in tqdm(list(batches([prompts[i] for i in share], batch_size)), desc=progress, leave=False,
                       disable=not accelerator.is_local_main_process):  # places: indices into the share
        indices = [share[p] for p in places]
        rests = [prompts[i] if prefix is None else prefix.rest(prompts[i]) for i in indices]
        batch = collate(rests, tokenizer.pad_token_id, seq2seq)
        with accelerator.autocast():
            predicted += zip(indices, predict({k: v.to(accelerator.device) for k, v in batch.items()}))
    predictions = [""] * len(prompts)
    for i, prediction in gather_object(predicted):
        predictions[i] = prediction
    score = ANSWER_METRICS[task.metric]
    example_scores = [score(p, e) for p, e in zip(predictions, task.test)]
    return TaskScore(sum(example_scores) / len(task.test), predictions, [round(s, 4) for s in example_scores])


class SharedPrefix:
    """The tokens every prompt of a causal task starts with (BOS and the instruction with its options: 30-55 of
    the CL benchmark's ~150), run through the model once per evaluation. A batch then runs only the rest of its
    prompts, after a copy of this key/value cache: the same attention and positions as the whole prompt (the left
    padding of the rests sits between prefix and rest, masked out)."""

    def __init__(self, model, ids: list[int], device):
        self.model, self.ids, self.cache = model, torch.tensor([ids], device=device), None

    def rest(self, prompt: Encoded) -> Encoded:
        return Encoded(prompt.input_ids[self.ids.shape[1]:])

    def batch(self, rests: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], DynamicCache]:
        """Whole prompts (prefix + left-padded rests) and a cache of the prefix for each of their rows."""
        rows = len(rests["input_ids"])
        whole = {"input_ids": torch.cat([self.ids.expand(rows, -1), rests["input_ids"]], 1),
                 "attention_mask": torch.cat([torch.ones_like(self.ids).expand(rows, -1), rests["attention_mask"]], 1)}
        if self.cache is None:  # at the first batch, after the predictor's checks of the model
            self.cache = DynamicCache()
            self.model(input_ids=self.ids, use_cache=True, logits_to_keep=1, **with_cache(self.model, self.cache))
        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(rows)
        return whole, cache


def _generation_predictor(model, tokenizer, max_new_tokens: int, prefix: SharedPrefix | None):
    """Batch (of prompt rests, after the prefix) -> greedy continuations, as text."""
    seq2seq = is_seq2seq(model)
    config = copy.deepcopy(hf_model(model).generation_config)
    config.update(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, temperature=None, top_p=None,
                  top_k=None, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)

    def predict(batch: dict[str, torch.Tensor]) -> list[str]:
        cache = {}
        if prefix is not None:
            batch, prefix_cache = prefix.batch(batch)
            cache = with_cache(model, prefix_cache)
        out = model.generate(**batch, **cache, generation_config=config)
        continuation = out if seq2seq else out[:, batch["input_ids"].shape[1]:]
        return [text.strip() for text in tokenizer.batch_decode(continuation, skip_special_tokens=True)]

    return predict


def _rank_predictor(model, task: Task, encoder: TaskEncoder, prefix: SharedPrefix | None):
    """Batch (of prompt rests, after the prefix) -> the most likely label of each prompt."""
    if not task.labels:
        raise EllaError(f"rank classification needs a label set, and task {task.name} has none; "
                        "give the task \"labels\" or use --eval-mode generate")
    options = [encoder.target_ids(label) for label in task.labels]

    def predict(batch: dict[str, torch.Tensor]) -> list[str]:
        scores = option_log_likelihoods(model, batch, options, prefix, only_the_best=True)
        return [task.labels[best] for best in scores.argmax(1).tolist()]

    return predict


OPTION_TOKENS_PER_PASS = 256  # scored option tokens per prompt in one forward pass: bounds the logits' memory


def option_log_likelihoods(model, batch: dict[str, torch.Tensor], options: list[list[int]],
                           prefix: SharedPrefix | None = None, only_the_best: bool = False) -> torch.Tensor:
    """log p(option | prompt) for every prompt of the batch and every option (token ids ending with EOS), (E, K);
    with a causal ``prefix``, the batch holds the prompts' rests after it.

    The prompt is encoded once, and the options are scored together, in one pass per group of options: a causal LM
    keeps the prompt's key/value cache and reads all options as one continuation whose attention mask lets each
    option token see the prompt and the earlier tokens of its own option only; an encoder-decoder runs its decoder
    on every (prompt, option) pair, reusing the encoder output.

    ``only_the_best`` (causal LMs): each row's argmax is exact, the other scores may stop early. Every further token
    adds a log-probability <= 0, so an option's score so far bounds its total from above. The option whose first
    token is likeliest is scored in full first; its pass also gives, where another option leaves its tokens, the
    log-probability of that option's next token, which bounds the other option's score; only the options whose
    bound reaches the first one's score are scored in full after it, the others keep their bound. A trained
    model's best option usually leaves no other in the running.
    """
    mask = batch["attention_mask"]
    scores = torch.zeros(mask.shape[0], len(options), device=mask.device)
    if is_seq2seq(model):
        encoded = model.get_encoder()(input_ids=batch["input_ids"], attention_mask=mask).last_hidden_state
        for group in option_groups(options):
            scores[:, group] = _seq2seq_option_scores(model, encoded, mask, [options[k] for k in group])
        return scores
    form = custom_mask_form(model)
    window = sliding_window(model)
    prefix_length = prefix.ids.shape[1] if prefix is not None else 0
    longest = prefix_length + int(mask.sum(1).max()) + max(map(len, options)) - 1  # prompt + option, less its EOS
    if window is not None and longest > window:
        raise EllaError(f"rank classification would let the label options see farther back than this model's "
                        f"sliding attention window ({window} tokens; prompt and option take {longest}): evaluate "
                        "with --eval-mode generate, or lower --max-length below the window")
    # Full cache layers even for sliding-window ones: each group of options is cropped off again after its pass.
    whole, cache = prefix.batch(batch) if prefix is not None else (batch, DynamicCache())
    mask, rest = whole["attention_mask"], batch["input_ids"]
    out = model(input_ids=rest, attention_mask=mask, position_ids=positions(mask)[:, -rest.shape[1]:], use_cache=True,
                logits_to_keep=1, **with_cache(model, cache))
    first = out.logits[:, -1].float().log_softmax(-1)  # predicts each option's first token
    scores += first[:, [option[0] for option in options]]
    if not only_the_best:
        _add_causal_option_scores(model, cache, mask, options, [range(len(options))] * len(mask), form, scores)
        return scores
    leaders = scores.argmax(1).tolist()
    log_probs, targets, _ = _causal_continuation(model, cache, mask, options, [[k] for k in leaders], form)
    # step j: the distribution the leader's token j comes from (step 0: after the prompt) and that token's log p
    log_probs = torch.cat([first[:, None], log_probs], 1) if log_probs.shape[1] else first[:, None]
    targets = torch.cat([torch.tensor([[options[k][0]] for k in leaders], device=mask.device), targets], 1)
    taken = target_log_probs(log_probs, targets)
    before = F.pad(taken.cumsum(1), (1, 0))  # log p of the leader's first j tokens
    in_the_running = []
    for row, leader in enumerate(leaders):
        scores[row, leader] = before[row, len(options[leader])]
        running = []
        for k, option in enumerate(options):
            shared = common_prefix_length(option, options[leader])
            if shared == len(option):  # the leader, or a copy of it
                scores[row, k] = scores[row, leader]
                continue
            scores[row, k] = before[row, shared] + log_probs[row, shared, option[shared]]  # its bound
            if scores[row, k] >= scores[row, leader] and len(option) > shared + 1:
                running.append(k)
        in_the_running.append(running)
    for row, running in enumerate(in_the_running):  # back to their first token's log p, the rest to add
        scores[row, running] = first[row, [options[k][0] for k in running]]
    _add_causal_option_scores(model, cache, mask, options, in_the_running, form, scores)
    return scores


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def option_groups(options: list[list[int]]) -> list[list[int]]:
    """Indices of ``options`` in consecutive groups of at most OPTION_TOKENS_PER_PASS tokens (one option at least)."""
    groups, tokens = [[]], 0
    for k, option in enumerate(options):
        if groups[-1] and tokens + len(option) > OPTION_TOKENS_PER_PASS:
            groups, tokens = groups + [[]], 0
        groups[-1].append(k)
        tokens += len(option)
    return groups


def _seq2seq_option_scores(model, encoded: torch.Tensor, mask: torch.Tensor, options: list[list[int]]) -> torch.Tensor:
    """Σ log p(option) for every (prompt, option) pair, one decoder batch over the repeated encoder output."""
    rows, width = mask.shape[0], max(map(len, options))
    labels = torch.tensor([option + [IGNORE_INDEX] * (width - len(option)) for option in options],
                          device=mask.device).repeat(rows, 1)  # row r * K + k: prompt r, option k
    logits = model(encoder_outputs=(encoded.repeat_interleave(len(options), 0),),
                   attention_mask=mask.repeat_interleave(len(options), 0), labels=labels).logits
    return -token_nll(logits, labels).sum(1).view(rows, len(options))


def _add_causal_option_scores(model, cache, mask: torch.Tensor, options: list[list[int]], chosen: list,
                              form: str, scores: torch.Tensor) -> None:
    """Adds Σ log p(option[1:]) after the cached prompt to ``scores`` for the options ``chosen`` for each row (its
    option indices), in passes of at most OPTION_TOKENS_PER_PASS tokens a row."""
    groups = [[[row_options[i] for i in group] for group in option_groups([options[k] for k in row_options])]
              for row_options in map(list, chosen)]
    for n in range(max(map(len, groups))):
        passed = [row[n] if n < len(row) else [] for row in groups]
        log_probs, targets, owner = _causal_continuation(model, cache, mask, options, passed, form)
        column = torch.where(owner >= 0, owner, len(options))  # filler steps add to a column dropped below
        scores += torch.zeros(len(mask), len(options) + 1, device=mask.device).scatter_add_(
            1, column, target_log_probs(log_probs, targets))[:, :-1]


def _causal_continuation(model, cache, mask: torch.Tensor, options: list[list[int]], chosen: list[list[int]],
                         form: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The options ``chosen`` for each row read after the cached prompt, a row's options as one continuation in
    which each token sees the prompt and the earlier tokens of its own option: log p(next token) at each of their
    tokens but the last (rows, steps, vocab), the token each step predicts and the option it belongs to (rows,
    steps; IGNORE_INDEX and a negative option on the steps that fill a shorter row). The cache is left as it was."""
    rows, device = mask.shape[0], mask.device
    layouts = [[(k, j, options[k][j], options[k][j + 1]) for k in row for j in range(len(options[k]) - 1)]
               for row in chosen]  # per row: (option, offset in it, input token, target token) at each step
    steps = max(map(len, layouts))
    if not steps:  # single-token options (EOS only after the prompt): nothing to read
        nothing = torch.zeros(rows, 0, dtype=torch.long, device=device)
        return torch.zeros(rows, 0, 1, device=device), nothing, nothing
    # a shorter row is filled with steps that predict nothing and see only themselves (a query that sees no key
    # at all turns to NaN, and NaN keys reach the other queries through their zero attention weights)
    filler = [(-1 - j, 0, options[0][0], IGNORE_INDEX) for j in range(steps)]
    owner, offset, inputs, targets = (torch.tensor(column, device=device).view(rows, steps) for column in
                                      zip(*(step for layout in layouts for step in layout + filler[len(layout):])))
    own_option = (owner[:, :, None] == owner[:, None, :]) & (offset[:, :, None] >= offset[:, None, :])
    sees = torch.cat([mask.bool()[:, None, None, :].expand(rows, 1, steps, -1), own_option[:, None]], -1)
    if form == "eager":
        dtype = hf_model(model).dtype
        sees = torch.zeros(sees.shape, dtype=dtype, device=sees.device).masked_fill(~sees, torch.finfo(dtype).min)
    logits = model(input_ids=inputs, **with_cache(model, cache), use_cache=True, attention_mask=sees,
                   position_ids=mask.sum(1, keepdim=True) + offset).logits
    cache.crop(-steps)  # back to the prompt alone for the next pass
    return logits.float().log_softmax(-1), targets, owner


def with_cache(model, cache: DynamicCache) -> dict:
    """The keyword that hands a key/value cache to the model: ``cache`` where the model takes it (transformers
    5.24, the version tested, warns about the older ``past_key_values``), else ``past_key_values``."""
    accepts_cache = "cache" in inspect.signature(hf_model(model).forward).parameters
    return {"cache" if accepts_cache else "past_key_values": cache}


def custom_mask_form(model) -> str:
    """How the model's attention takes a custom 4D mask: ``sdpa`` (boolean, True: may attend) or ``eager``
    (additive). Other kernels (flash attention) take none, so ranking fails here, before any work."""
    implementation = getattr(hf_model(model).config, "_attn_implementation", None) or "eager"
    if implementation not in ("sdpa", "eager"):
        raise EllaError(f"rank classification scores all label options of a prompt in one pass with a custom "
                        f"attention mask, which {implementation} attention does not take: load the model with "
                        "attn_implementation='sdpa' (or 'eager'), or evaluate with --eval-mode generate")
    return implementation


def sliding_window(model) -> int | None:
    """The window of the model's sliding-attention layers, None when every layer sees the whole sequence. A custom
    4D mask replaces the window in those layers, so ranking must stay within it."""
    config = hf_model(model).config
    window, layer_types = getattr(config, "sliding_window", None), getattr(config, "layer_types", None)
    if getattr(config, "use_sliding_window", True) is False or (layer_types and "sliding_attention" not in layer_types):
        return None
    return window


def target_log_probs(log_probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) at each position of (B, L, V) log-probabilities, (B, L); 0 where the target is IGNORE_INDEX."""
    return log_probs.gather(-1, targets.clamp(min=0)[..., None])[..., 0].masked_fill(targets == IGNORE_INDEX, 0)


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log p(target) at each position, (B, L); 0 where the target is IGNORE_INDEX."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="none").view(targets.shape)

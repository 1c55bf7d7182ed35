"""Token ids for training, generation and rank classification, and the collator that pads them.

Causal LMs see ``prompt + " " + target + EOS`` with the prompt masked out of the loss (labels = -100);
without EOS the model would run on after the label and exact match would fail. Encoder-decoders see the
prompt on the encoder side and ``target + EOS`` as labels. Causal batches are **left**-padded: batched greedy
generation needs it, and it puts every answer at the end of its row, so the loss needs logits only for the
last few positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import EllaError
from .tasks import Example, Task

IGNORE_INDEX = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int] | None = None  # None for a generation prompt


class TaskEncoder:
    """Tokenizes one task's examples; the input is truncated so that prompt + target fit ``max_length``
    (its end is cut, or its start for a task that ``keep_input_end``). A free-text target (a task without labels)
    is cut to ``max_length // 2`` tokens, EOS included, so that it leaves room for an input."""

    def __init__(self, tokenizer, task: Task, max_length: int, seq2seq: bool):
        if max_length < 8:
            raise EllaError(f"max_length must be at least 8 tokens (got {max_length})")
        self.tokenizer, self.task, self.seq2seq = tokenizer, task, seq2seq
        with_special = tokenizer("a").input_ids
        plain = tokenizer("a", add_special_tokens=False).input_ids
        start = next(i for i in range(len(with_special)) if with_special[i:i + len(plain)] == plain)
        self.head = with_special[:start]  # e.g. BOS
        self.tail = with_special[start + len(plain):] if seq2seq else []  # e.g. T5's </s> after the input
        self.prefix = self._ids(task.prefix)
        self.suffix = self._ids(task.suffix)
        outputs = task.labels or [example.output for example in task.train]
        self.target_budget = max_length // 2 if not task.labels else max_length
        self.longest_target = max(len(self.target_ids(output)) for output in outputs)
        reserved = 0 if seq2seq else self.longest_target  # causal targets share the context with the prompt
        self.input_budget = (max_length - reserved - len(self.head) - len(self.prefix) - len(self.suffix)
                             - len(self.tail))
        if self.input_budget < 1:
            raise EllaError(
                f"--max-length {max_length} leaves no room for the inputs of task {task.name}: its instruction, "
                f"options and answer take {max_length - self.input_budget} tokens; raise --max-length")

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids if text else []

    def target_ids(self, output: str) -> list[int]:
        text = output if self.seq2seq else " " + output  # causal: the natural continuation of "Answer:"
        return self._ids(text)[: self.target_budget - 1] + [self.tokenizer.eos_token_id]

    def shared_prefix(self) -> list[int]:
        """The tokens every prompt starts with (the instruction and options, after BOS)."""
        return self.head + self.prefix

    def prompts(self, examples: list[Example]) -> list[list[int]]:
        inputs = self.tokenizer([e.input for e in examples], add_special_tokens=False).input_ids if examples else []
        budget = self.input_budget
        return [self.head + self.prefix + (ids[-budget:] if self.task.keep_input_end else ids[:budget])
                + self.suffix + self.tail for ids in inputs]

    def training(self, examples: list[Example]) -> list[Encoded]:
        """Prompt and target for the loss (also used to score each label option)."""
        encoded = []
        for prompt, example in zip(self.prompts(examples), examples):
            target = self.target_ids(example.output)
            if self.seq2seq:
                encoded.append(Encoded(prompt, target))
            else:
                encoded.append(Encoded(prompt + target, [IGNORE_INDEX] * len(prompt) + target))
        return encoded

    def generation(self, examples: list[Example]) -> list[Encoded]:
        return [Encoded(prompt) for prompt in self.prompts(examples)]


def collate(batch: list[Encoded], pad_token_id: int, seq2seq: bool) -> dict[str, torch.Tensor]:
    """Pad to the longest row: left for causal LMs, right for encoder inputs; labels are padded with -100."""
    left = not seq2seq
    width = max(len(item.input_ids) for item in batch)

    def pad(ids: list[int], value: int, size: int) -> list[int]:
        filler = [value] * (size - len(ids))
        return filler + ids if left else ids + filler

    out = {
        "input_ids": torch.tensor([pad(item.input_ids, pad_token_id, width) for item in batch]),
        "attention_mask": torch.tensor([pad([1] * len(item.input_ids), 0, width) for item in batch]),
    }
    if batch[0].labels is not None:
        label_width = width if left else max(len(item.labels) for item in batch)
        out["labels"] = torch.tensor([pad(item.labels, IGNORE_INDEX, label_width) for item in batch])
    return out

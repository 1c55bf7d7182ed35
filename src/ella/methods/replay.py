"""Replay: a data policy that also trains each task on a small buffer of earlier tasks' examples; the ``replay``
method is ``seqlora+replay`` (one LoRA trained through all tasks), and any update part takes it
(``inclora+ella+replay``).

The buffer holds at most ``buffer_size`` tokenized training examples, shared equally among the tasks seen so far:
after task t each of the t + 1 tasks keeps ``buffer_size // (t + 1)`` of its examples (all of them if it has
fewer). Task t trains on its own examples plus the buffer, which then holds tasks 0 … t−1 only.

Each task's sample is a seeded random permutation of its examples, cut to the share; shrinking a sample later keeps
its first examples, which are again a uniform random subset.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data import Encoded, Task
from ..errors import EllaError
from .base import DATA, TaskData, hyperparameter, register_method, register_part


@dataclass
class ReplayHyperparameters:
    buffer_size: int = hyperparameter(200, "examples kept of the earlier tasks, shared equally among them")
    # not `seed`: the CLI already has --seed (training)
    buffer_seed: int = hyperparameter(42, "seed of the random choice of the examples kept in the buffer")

    def __post_init__(self):
        if self.buffer_size < 1:
            raise EllaError(f"buffer_size must be at least 1 (got {self.buffer_size})")


@register_part
class Replay:
    name, kind = "replay", DATA
    summary = "a small buffer of earlier tasks' examples trained with each task (experience replay)"
    config_class = ReplayHyperparameters

    def __init__(self, config: ReplayHyperparameters):
        self.config = config
        self.buffer: dict[int, list[Encoded]] = {}  # task index -> its kept examples, in random order
        self.task_items: list[Encoded] = []  # the current task's own examples, sampled from at its end

    def training_items(self, task_index: int, sequence: list[list[Encoded]]) -> list[Encoded]:
        # recorded for finish, which samples the task's own examples: its TaskData holds them mixed with the buffer
        self.task_items = sequence[task_index]
        return self.task_items + [item for kept in self.buffer.values() for item in kept]

    def check_finish(self) -> None:
        if not self.task_items:
            raise EllaError("replay's finish samples the task's own examples, which training_items(task_index, "
                            "sequence) records: call it before training the task (ella.run_sequence does this)")

    def finish(self, model: torch.nn.Module, task_index: int, task: Task, data: TaskData | None = None) -> None:
        share = self.config.buffer_size // (task_index + 1)
        order = torch.randperm(len(self.task_items),
                               generator=torch.Generator().manual_seed(self.config.buffer_seed + task_index))
        self.buffer[task_index] = [self.task_items[i] for i in order.tolist()]
        self.buffer = {task: kept[:share] for task, kept in self.buffer.items()}
        self.task_items = []  # taken: the next task's finish needs its own training_items call

    def report(self) -> dict:
        return {"replay_buffer": {task: len(kept) for task, kept in self.buffer.items()}}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The buffer as flat tensors: every kept example's ids and labels concatenated, with their lengths and
        task indices."""
        examples = [(task, item) for task, kept in self.buffer.items() for item in kept]
        if not examples:
            return {}
        return {
            "task": torch.tensor([task for task, _ in examples]),
            "input_ids": torch.tensor([i for _, item in examples for i in item.input_ids]),
            "input_lengths": torch.tensor([len(item.input_ids) for _, item in examples]),
            "labels": torch.tensor([i for _, item in examples for i in item.labels]),
            "label_lengths": torch.tensor([len(item.labels) for _, item in examples]),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        keys = {"task", "input_ids", "input_lengths", "labels", "label_lengths"}
        if state and set(state) != keys:
            raise EllaError(f"not a Replay state: expected the tensors {', '.join(sorted(keys))}, got "
                            f"{', '.join(sorted(state))}; load the method_state.safetensors of a replay run")
        self.buffer = {}
        if not state:
            return
        inputs = state["input_ids"].split(state["input_lengths"].tolist())
        labels = state["labels"].split(state["label_lengths"].tolist())
        for task, input_ids, label_ids in zip(state["task"].tolist(), inputs, labels):
            self.buffer.setdefault(task, []).append(Encoded(input_ids.tolist(), label_ids.tolist()))


register_method("replay", "seqlora+replay",
                "SeqLoRA that also trains on a small buffer of earlier tasks' examples (experience replay)")

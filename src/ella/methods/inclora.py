"""IncLoRA: a fresh LoRA for every task; finished adapters are frozen and summed at inference.

Summing frozen adapters equals merging each one into the base weights when its task ends,
W = W0 + Σ_t s·B_t·A_t, so ella merges: inference needs no task id and costs no more than the base model.
"""

from __future__ import annotations

import torch

from ..data import Task
from .base import TaskData, register
from .lora import LoraMethod, attach_lora


def task_adapter(task_index: int) -> str:
    return f"task{task_index}"


@register
class IncLoRA(LoraMethod):
    name = "inclora"
    summary = "a fresh LoRA per task; finished ones frozen and summed (merged into the weights)"

    def prepare(self, model: torch.nn.Module, task_index: int, task: Task,
                data: TaskData | None = None) -> torch.nn.Module:
        return attach_lora(model, self.config, self.target_modules, task_adapter(task_index))

    def finish(self, model: torch.nn.Module, task_index: int, task: Task,
               data: TaskData | None = None) -> torch.nn.Module:
        return model.merge_and_unload()

"""SeqFT: full fine-tuning of every weight, task after task, with nothing to protect earlier tasks."""

from __future__ import annotations

import torch

from ..data import Task
from .base import ContinualMethod, TaskData, register


@register
class SeqFT(ContinualMethod):
    name = "seqft"
    summary = "full fine-tuning of every weight through the sequence (lower bound, most memory)"
    default_learning_rate = 5e-5  # full fine-tuning diverges at the LoRA methods' 1e-3

    def prepare(self, model: torch.nn.Module, task_index: int, task: Task,
                data: TaskData | None = None) -> torch.nn.Module:
        return model.requires_grad_(True)

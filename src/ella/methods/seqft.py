"""SeqFT: full fine-tuning of every weight, task after task, with nothing to protect earlier tasks."""

from __future__ import annotations

import torch

from ..data import Task
from .base import UPDATE, NoHyperparameters, TaskData, register_method, register_part


@register_part
class FullFineTuning:
    name, kind = "seqft", UPDATE
    summary = "full fine-tuning of every weight through the sequence"
    config_class = NoHyperparameters
    default_learning_rate = 5e-5  # full fine-tuning diverges at the LoRA methods' 1e-3
    keeps_parameters = True  # the same trainable parameters through the sequence (EWC needs it)
    lora_per_task = False

    def __init__(self, config: NoHyperparameters):
        self.config = config

    def prepare(self, model: torch.nn.Module, task_index: int, task: Task,
                data: TaskData | None = None) -> torch.nn.Module:
        return model.requires_grad_(True)

    def finish(self, model: torch.nn.Module, task_index: int, task: Task,
               data: TaskData | None = None) -> torch.nn.Module:
        return model


register_method("seqft", "seqft", "full fine-tuning of every weight through the sequence (lower bound, most memory)")

"""SeqLoRA: one LoRA trained through all tasks, never reset or merged (the forgetting baseline)."""

from __future__ import annotations

import torch
from peft import PeftModel

from ..data import Task
from .base import TaskData, register
from .lora import LoraMethod, attach_lora


@register
class SeqLoRA(LoraMethod):
    name = "seqlora"
    summary = "one LoRA trained through all tasks (the forgetting baseline)"

    def prepare(self, model: torch.nn.Module, task_index: int, task: Task,
                data: TaskData | None = None) -> torch.nn.Module:
        if isinstance(model, PeftModel):  # the adapter of the first task, trained on
            return model
        return attach_lora(model, self.config, self.target_modules, adapter="sequence")

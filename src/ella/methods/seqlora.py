"""SeqLoRA: one LoRA trained through all tasks, never reset or merged (the forgetting baseline)."""

from __future__ import annotations

import torch
from peft import PeftModel

from ..data import Task
from .base import UPDATE, TaskData, register_method, register_part
from .lora import LoraHyperparameters, attach_lora, resolve_target_modules


@register_part
class SharedLoRA:
    name, kind = "seqlora", UPDATE
    summary = "one LoRA trained through all tasks"
    config_class = LoraHyperparameters
    default_learning_rate = 1e-3
    keeps_parameters = True  # the same trainable parameters through the sequence (EWC needs it)
    lora_per_task = False

    def __init__(self, config: LoraHyperparameters):
        self.config = config

    def setup(self, model: torch.nn.Module, tasks: list[Task]) -> None:
        self.target_modules = resolve_target_modules(model, self.config.target_modules)

    def prepare(self, model: torch.nn.Module, task_index: int, task: Task,
                data: TaskData | None = None) -> torch.nn.Module:
        if isinstance(model, PeftModel):  # the adapter of the first task, trained on
            return model
        return attach_lora(model, self.config, self.target_modules, adapter="sequence")

    def finish(self, model: torch.nn.Module, task_index: int, task: Task,
               data: TaskData | None = None) -> torch.nn.Module:
        return model


register_method("seqlora", "seqlora", "one LoRA trained through all tasks (the forgetting baseline)")

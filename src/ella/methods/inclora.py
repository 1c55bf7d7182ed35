"""IncLoRA: a fresh LoRA for every task; finished adapters are frozen and summed at inference.

Summing frozen adapters equals merging each one into the base weights when its task ends,
W = W0 + Σ_t s·B_t·A_t, so ella merges: inference needs no task id and costs no more than the base model.

The part exposes the task's update ΔW_t = s·B·A of every adapted module (``task_updates``), which regularisers such
as ELLA penalise, and the LoRA layers of the task's adapter (``layers``), whose factors O-LoRA reads.
"""

from __future__ import annotations

import torch
from peft.tuners.lora import LoraLayer

from ..data import Task
from .base import UPDATE, TaskData, register_method, register_part
from .lora import LoraHyperparameters, attach_lora, lora_layers, resolve_target_modules
from .w_past import LowRank


def task_adapter(task_index: int) -> str:
    return f"task{task_index}"


@register_part
class TaskLoRA:
    name, kind = "inclora", UPDATE
    summary = "a fresh LoRA per task, merged into the weights when the task ends"
    config_class = LoraHyperparameters
    default_learning_rate = 1e-3
    keeps_parameters = False
    lora_per_task = True  # a fresh adapter per task, with task_updates and layers (ELLA and O-LoRA need it)
    low_rank_updates = True  # task_updates are LowRank factors

    def __init__(self, config: LoraHyperparameters):
        self.config = config
        self.adapter = ""

    def setup(self, model: torch.nn.Module, tasks: list[Task]) -> None:
        self.target_modules = resolve_target_modules(model, self.config.target_modules)

    def prepare(self, model: torch.nn.Module, task_index: int, task: Task,
                data: TaskData | None = None) -> torch.nn.Module:
        self.adapter = task_adapter(task_index)
        return attach_lora(model, self.config, self.target_modules, self.adapter)

    def layers(self, model: torch.nn.Module) -> dict[str, LoraLayer]:
        """The LoRA layers of the task's adapter, keyed by the module's name in the base model."""
        return lora_layers(model, self.adapter)

    def task_updates(self, model: torch.nn.Module) -> dict[str, torch.Tensor | LowRank]:
        """ΔW_t = s·B·A of every adapted module, kept as the factors (s·B, Aᵀ): d_out x d_in, the layout of
        ``F.linear``'s weight, also for a GPT-2 ``Conv1D``, whose stored weight is its transpose."""
        return {name: LowRank(layer.lora_B[self.adapter].weight * layer.scaling[self.adapter],
                              layer.lora_A[self.adapter].weight.T)
                for name, layer in self.layers(model).items()}

    def merged_updates(self, model: torch.nn.Module) -> dict[str, torch.Tensor | LowRank]:
        """What ``finish`` adds to the weights: the same s·B·A."""
        return self.task_updates(model)

    def finish(self, model: torch.nn.Module, task_index: int, task: Task,
               data: TaskData | None = None) -> torch.nn.Module:
        return model.merge_and_unload()


register_method("inclora", "inclora",
                "a fresh LoRA per task; finished ones frozen and summed (merged into the weights)")

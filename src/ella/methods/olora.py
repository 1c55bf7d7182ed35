"""O-LoRA: orthogonal subspace learning (Wang et al., "Orthogonal Subspace Learning for Language Model Continual
Learning", Findings of EMNLP 2023).

A regulariser: each task trains a fresh LoRA (the ``olora`` method is ``inclora+olora``) under the loss

    L = CE + λ1 · Σ_m Σ_ij |(A_past^m A_t^mᵀ)_ij| + λ2 · Σ_m (‖A_t^m‖_F + ‖B_t^m‖_F)

where A_t^m (r x d_in) and B_t^m are the current task's LoRA factors of module m and A_past^m (Σr x d_in) stacks the
frozen A's of all earlier tasks. After task t: A_past^m ← [A_past^m; A_t^m], then the LoRA is merged into the model
(equal to keeping the earlier adapters frozen and summed).

Why it works: the rows of A_past span the input directions the earlier tasks' updates read. With A_t A_pastᵀ = 0 the
new update ΔW_t = s·B_t·A_t maps every x in that span to zero, ΔW_t x = s·B_t·(A_t x) = 0, so the new task leaves
those inputs' outputs as the earlier adapters left them. The L1 form pulls every overlap towards zero with the same
force, however small it already is. λ1 = 0.5 and λ2 = 0 are the values of the standard CL benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data import Task
from ..errors import EllaError
from .base import REGULARISER, TaskData, device_of, hyperparameter, register_method, register_part, zero
from .lora import check_state_fits


@dataclass
class OLoRAHyperparameters:
    lambda1: float = hyperparameter(0.5, "weight λ1 of the orthogonality loss Σ|A_past A_newᵀ| between the new "
                                         "task's LoRA A and the earlier tasks' (0: IncLoRA)")
    lambda2: float = hyperparameter(0.0, "weight λ2 of the L2 norms ‖A_new‖ + ‖B_new‖ of the new task's LoRA")

    def __post_init__(self):
        for name in ("lambda1", "lambda2"):
            if not getattr(self, name) >= 0:
                raise EllaError(f"{name} must be non-negative (got {getattr(self, name)}); 0 switches its term off")


def orthogonality_loss(a_past: torch.Tensor, a_new: torch.Tensor) -> torch.Tensor:
    """Σ_ij |(A_past A_newᵀ)_ij|: the element-wise L1 norm of the (Σr x r) overlaps of the new rows with the old."""
    return (a_past @ a_new.T).abs().sum()


@register_part
class OLoRA:
    name, kind = "olora", REGULARISER
    summary = "λ1·Σ|A_past A_newᵀ|: each task's LoRA A kept orthogonal to the earlier tasks' A's"
    config_class = OLoRAHyperparameters

    @staticmethod
    def check_update(update: type) -> None:
        if not update.lora_per_task or update.name == "inflora":  # inflora's A is designed and frozen
            raise EllaError(f"olora keeps each task's trained LoRA A orthogonal to the earlier ones, but {update.name} "
                            "has no LoRA A that trains per task: combine it with inclora or jumplora")

    def __init__(self, config: OLoRAHyperparameters):
        self.config = config
        self.a_past: dict[str, torch.Tensor] = {}  # module name -> the earlier tasks' A's, stacked (Σr x d_in)
        self.figures: dict[str, float] = {}

    def prepare(self, model: torch.nn.Module, task_index: int, task: Task, data: TaskData | None = None) -> None:
        check_state_fits(self.name, {name: (None, a.shape[1]) for name, a in self.a_past.items()},
                         self.update.layers(model))
        device = device_of(model)
        self.a_past = {name: a.float().to(device) for name, a in self.a_past.items()}

    def penalty(self, model: torch.nn.Module) -> torch.Tensor:
        lambda1, lambda2, adapter = self.config.lambda1, self.config.lambda2, self.update.adapter
        terms = []
        for name, layer in self.update.layers(model).items():
            a_new = layer.lora_A[adapter].weight.float()
            if lambda1 > 0 and name in self.a_past:  # not on the first task: no earlier A's yet
                terms.append(lambda1 * orthogonality_loss(self.a_past[name], a_new))
            if lambda2 > 0:
                terms.append(lambda2 * (a_new.norm() + layer.lora_B[adapter].weight.float().norm()))
        return torch.stack(terms).sum() if terms else zero(model)

    @torch.no_grad()
    def finish(self, model: torch.nn.Module, task_index: int, task: Task, data: TaskData | None = None) -> None:
        had_past, overlap = bool(self.a_past), 0.0
        for name, layer in self.update.layers(model).items():
            a_new = layer.lora_A[self.update.adapter].weight.float().clone()
            if name in self.a_past:
                overlap += orthogonality_loss(self.a_past[name], a_new).item()
                a_new = torch.cat([self.a_past[name], a_new])
            self.a_past[name] = a_new
        self.figures = {"orthogonality_loss_end": overlap} if had_past else {}

    def report(self) -> dict:
        return self.figures

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.a_past)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.a_past = dict(state)


register_method("olora", "inclora+olora",
                "IncLoRA + λ1·Σ|A_past A_newᵀ|: each task's LoRA A kept orthogonal to the earlier tasks' A's")

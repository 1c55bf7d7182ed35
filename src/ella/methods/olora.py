"""O-LoRA: orthogonal subspace learning (Wang et al., "Orthogonal Subspace Learning for Language Model Continual
Learning", Findings of EMNLP 2023).

Each task trains a fresh LoRA (IncLoRA) under the loss

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
from .base import TaskData, hyperparameter, register
from .inclora import IncLoRA, task_adapter
from .lora import LoraHyperparameters, check_state_fits, lora_layers


@dataclass
class OLoRAHyperparameters(LoraHyperparameters):
    lambda1: float = hyperparameter(0.5, "weight λ1 of the orthogonality loss Σ|A_past A_newᵀ| between the new "
                                         "task's LoRA A and the earlier tasks' (0: IncLoRA)")
    lambda2: float = hyperparameter(0.0, "weight λ2 of the L2 norms ‖A_new‖ + ‖B_new‖ of the new task's LoRA")

    def __post_init__(self):
        super().__post_init__()
        for name in ("lambda1", "lambda2"):
            if not getattr(self, name) >= 0:
                raise EllaError(f"{name} must be non-negative (got {getattr(self, name)}); 0 switches its term off")


def orthogonality_loss(a_past: torch.Tensor, a_new: torch.Tensor) -> torch.Tensor:
    """Σ_ij |(A_past A_newᵀ)_ij|: the element-wise L1 norm of the (Σr x r) overlaps of the new rows with the old."""
    return (a_past @ a_new.T).abs().sum()


@register
class OLoRA(IncLoRA):
    name = "olora"
    summary = "IncLoRA + λ1·Σ|A_past A_newᵀ|: each task's LoRA A kept orthogonal to the earlier tasks' A's"
    config_class = OLoRAHyperparameters

    def __init__(self, config=None, **hyperparameters):
        super().__init__(config, **hyperparameters)
        self.a_past: dict[str, torch.Tensor] = {}  # module name -> the earlier tasks' A's, stacked (Σr x d_in)
        self.adapter = ""
        self.figures: dict[str, float] = {}

    def prepare(self, model: torch.nn.Module, task_index: int, task: Task,
                data: TaskData | None = None) -> torch.nn.Module:
        self.adapter = task_adapter(task_index)
        model = super().prepare(model, task_index, task, data)
        check_state_fits(self.name, {name: (None, a.shape[1]) for name, a in self.a_past.items()},
                         lora_layers(model, self.adapter))
        device = next(model.parameters()).device
        self.a_past = {name: a.float().to(device) for name, a in self.a_past.items()}
        return model

    def penalty(self, model: torch.nn.Module) -> torch.Tensor:
        lambda1, lambda2 = self.config.lambda1, self.config.lambda2
        terms = []
        device_type = next(model.parameters()).device.type
        with torch.autocast(device_type, enabled=False):  # the overlaps and norms in fp32, also under mixed precision
            for name, layer in lora_layers(model, self.adapter).items():
                a_new = layer.lora_A[self.adapter].weight.float()
                if lambda1 > 0 and name in self.a_past:  # not on the first task: no earlier A's yet
                    terms.append(lambda1 * orthogonality_loss(self.a_past[name], a_new))
                if lambda2 > 0:
                    terms.append(lambda2 * (a_new.norm() + layer.lora_B[self.adapter].weight.float().norm()))
        return torch.stack(terms).sum() if terms else super().penalty(model)

    @torch.no_grad()
    def finish(self, model: torch.nn.Module, task_index: int, task: Task,
               data: TaskData | None = None) -> torch.nn.Module:
        had_past, overlap = bool(self.a_past), 0.0
        for name, layer in lora_layers(model, self.adapter).items():
            a_new = layer.lora_A[self.adapter].weight.float().clone()
            if name in self.a_past:
                overlap += orthogonality_loss(self.a_past[name], a_new).item()
                a_new = torch.cat([self.a_past[name], a_new])
            self.a_past[name] = a_new
        self.figures = {"orthogonality_loss_end": overlap} if had_past else {}
        return super().finish(model, task_index, task, data)

    def report(self) -> dict:
        return self.figures

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.a_past)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.a_past = dict(state)

"""ELLA: selective subspace de-correlation (Efficient Lifelong Learning for Adapters).

Each task trains a fresh LoRA (IncLoRA) under the penalty

    L = CE + λ · Σ_m ‖ΔW_t^m ⊙ W_past^m‖_F²        (⊙ element-wise; m runs over the adapted modules)

where ΔW_t^m = s·B·A is the current task's update and W_past^m the sum of all earlier tasks' updates.
After task t: W_past^m ← W_past^m + ΔW_t^m, then the LoRA is merged into the model.

Why it works: with energy E = |W_past| + ε the penalised step is ΔW*_ij = G_ij / (1 + λ E_ij²), so coordinates
that earlier tasks used heavily shrink and unused ones stay free (forward transfer); the interference is
bounded, |⟨ΔW*, W_past⟩_F| ≤ ‖G‖_F / (2√λ) · ‖E⁻¹ ⊙ W_past‖_F. λ too high: new tasks stay near chance;
λ too low: behaves like SeqLoRA after a few tasks. The right λ depends on the model's weight scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data import Task
from ..errors import EllaError
from .base import TaskData, hyperparameter, parse_bool, register
from .inclora import IncLoRA, task_adapter
from .lora import LoraHyperparameters, check_state_fits, lora_layers
from .w_past import REPRESENTATIONS, LowRank, PastUpdates, dense

REDUCTIONS = ("sum", "mean")


def parse_lambdas(text: str) -> float | list[float]:
    """``3e4`` (every task) or ``0,3e4,1e5,1e5`` (one per task)."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise EllaError(f"--lam takes a number or comma-separated numbers, one per task (got {text!r})") from None
    return values[0] if len(values) == 1 else values


@dataclass
class ELLAHyperparameters(LoraHyperparameters):
    lam: float | list[float] = hyperparameter(
        3e4, "penalty weight λ: one value, or one per task (comma-separated); the paper used 3e4 on "
             "T5-large; the right value depends on the model's weight scale", parse_lambdas)
    penalty_reduction: str = hyperparameter("sum", "combine the modules' penalties by 'sum' (paper) or 'mean'")
    w_past: str = hyperparameter("factors", "how W_past is kept: 'factors' (exact low-rank factors, growing by r per "
                                            "task up to the dense size), 'dense' (d_out x d_in per module) or 'svd' "
                                            "(truncated to --w-past-rank: small and constant, approximate)")
    w_past_rank: int = hyperparameter(64, "rank R that the 'svd' representation keeps")
    w_past_cache: bool = hyperparameter(True, "keep W_past² dense on the device during a task: the fastest penalty; "
                                              "'no' rebuilds it every step from the stored form (least memory)",
                                        parse_bool)

    def __post_init__(self):
        super().__post_init__()
        lams = self.lam if isinstance(self.lam, list) else [self.lam]
        if not lams or any(not lam >= 0 for lam in lams):
            raise EllaError(f"λ must be non-negative (got {self.lam}); λ = 0 is IncLoRA")
        if self.penalty_reduction not in REDUCTIONS:
            raise EllaError(f"penalty_reduction must be one of {REDUCTIONS} (got {self.penalty_reduction!r})")
        if self.w_past not in REPRESENTATIONS:
            raise EllaError(f"w_past must be one of {REPRESENTATIONS} (got {self.w_past!r})")
        if self.w_past_rank < 1:
            raise EllaError(f"w_past_rank must be at least 1 (got {self.w_past_rank})")


def interference_figures(update: torch.Tensor, past: torch.Tensor, lam: float,
                         epsilon: float = 1e-8) -> tuple[float, float, float, float]:
    """How an update ΔW relates to W_past (one module):

    - the interference ⟨ΔW, W_past⟩_F and the paper's bound on its size, ‖G‖_F / (2√λ) · ‖E⁻¹ ⊙ W_past‖_F, with
      E = |W_past| + ε and G = ΔW ⊙ (1 + λE²), the unpenalised step that the shrinkage maps to ΔW;
    - the energy ‖ΔW‖² on W_past's high-energy coordinates (its top 10 % by |W_past|), and in all.
    """
    energy = past.abs() + epsilon
    interference = (update * past).sum()
    bound = (update * (1 + lam * energy.square())).norm() / (2 * lam ** 0.5) * (past / energy).norm()
    cutoff = energy.flatten().kthvalue(max(1, int(0.9 * energy.numel()))).values
    high = update[energy > cutoff].square().sum()
    return interference.item(), bound.item(), high.item(), update.square().sum().item()


@register
class ELLA(IncLoRA):
    name = "ella"
    summary = "IncLoRA + λ·Σ‖ΔW ⊙ W_past‖²: shrinks updates where earlier tasks wrote (constant memory)"
    config_class = ELLAHyperparameters

    def __init__(self, config=None, **hyperparameters):
        super().__init__(config, **hyperparameters)
        # module name -> Σ of finished tasks' ΔW
        self.w_past = PastUpdates(self.config.w_past, self.config.w_past_rank, self.config.w_past_cache)
        self.lam_now = 0.0
        self.adapter = ""
        self.diagnostics: dict = {}

    def setup(self, model: torch.nn.Module, tasks: list[Task]) -> None:
        super().setup(model, tasks)
        if isinstance(self.config.lam, list) and len(self.config.lam) != len(tasks):
            raise EllaError(f"{len(self.config.lam)} λ values for {len(tasks)} tasks: give one λ, "
                            "or exactly one per task")

    def prepare(self, model: torch.nn.Module, task_index: int, task: Task,
                data: TaskData | None = None) -> torch.nn.Module:
        lam = self.config.lam
        self.lam_now = lam[task_index] if isinstance(lam, list) else lam
        self.adapter = task_adapter(task_index)
        self.w_past.to(next(model.parameters()).device)
        model = super().prepare(model, task_index, task, data)
        check_state_fits(self.name, self.w_past.shapes(), lora_layers(model, self.adapter))
        return model

    def penalty(self, model: torch.nn.Module) -> torch.Tensor:
        if not self.w_past or self.lam_now == 0:  # the first task: W_past = 0
            return super().penalty(model)
        device_type = next(model.parameters()).device.type
        with torch.autocast(device_type, enabled=False):  # ΔW and its square in fp32, also under mixed precision
            return self.lam_now * self.w_past.penalty(self.task_updates(model), self.config.penalty_reduction)

    def task_updates(self, model: torch.nn.Module, merged: bool = False) -> dict[str, torch.Tensor | LowRank]:
        """ΔW_t of every adapted module: what the penalty sees while training, and (``merged``) what the merge adds
        to the weights. For plain LoRA both are s·B·A, kept as the factors (s·B, Aᵀ) in the base weight's layout."""
        updates = {}
        for name, layer in lora_layers(model, self.adapter).items():
            left = layer.lora_B[self.adapter].weight * layer.scaling[self.adapter]
            right = layer.lora_A[self.adapter].weight.T
            updates[name] = LowRank(right, left) if layer.fan_in_fan_out else LowRank(left, right)
        return updates

    def finish(self, model: torch.nn.Module, task_index: int, task: Task,
               data: TaskData | None = None) -> torch.nn.Module:
        self.diagnostics = self.mechanism(model) if self.w_past and self.lam_now > 0 else {}
        lams = self.config.lam if isinstance(self.config.lam, list) else [self.config.lam]
        if max(lams) > 0:  # W_past serves only the penalty: with λ = 0 throughout, keep nothing
            self.accumulate(model)
        return super().finish(model, task_index, task, data)

    @torch.no_grad()
    def mechanism(self, model: torch.nn.Module) -> dict:
        """``interference_figures`` of the task's update against W_past, summed over the modules."""
        sums = [0.0, 0.0, 0.0, 0.0]
        for name, update in self.task_updates(model, merged=True).items():
            figures = interference_figures(dense(update).float(), self.w_past.matrix(name), self.lam_now)
            sums = [a + b for a, b in zip(sums, figures)]
        interference, bound, high, total = sums
        return {"lambda": self.lam_now, "interference": interference, "bound": bound,
                "update_energy_in_high_energy_coordinates": high / total if total else 0.0}

    def report(self) -> dict:
        return {"diagnostics": self.diagnostics} if self.diagnostics else {}

    @torch.no_grad()
    def accumulate(self, model: torch.nn.Module) -> None:
        """W_past^m ← W_past^m + ΔW_t^m (the update being merged)."""
        for name, update in self.task_updates(model, merged=True).items():
            self.w_past.add(name, update)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.w_past.tensors()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.w_past.load(state)

"""ELLA: selective subspace de-correlation (Efficient Lifelong Learning for Adapters), a regulariser.

Each task trains a fresh LoRA (the ``ella`` method is ``inclora+ella``) under the penalty

    L = CE + λ · (1/M) Σ_m ‖ΔW_t^m ⊙ W_past^m‖_F²      (⊙ element-wise; m runs over the M adapted modules)

where ΔW_t^m = s·B·A is the current task's update and W_past^m the sum of all earlier tasks' updates. The mean over
modules is the reference code's (``compute_ella_penalty_from_model``), the one the paper's λ values go with;
``penalty_reduction="sum"`` drops the 1/M (M times stronger at the same λ).
After task t: W_past^m ← W_past^m + ΔW_t^m, then the LoRA is merged into the model.

Why it works: with energy E = |W_past| + ε the penalised step is ΔW*_ij = G_ij / (1 + λ E_ij²), so coordinates
that earlier tasks used heavily shrink and unused ones stay free (forward transfer); the interference is
bounded, |⟨ΔW*, W_past⟩_F| ≤ ‖G‖_F / (2√λ) · ‖E⁻¹ ⊙ W_past‖_F (G: the unpenalised step). λ too high:
new tasks stay near chance; λ too low: behaves like SeqLoRA after a few tasks. The right λ depends on the
model's weight scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data import Task
from ..errors import EllaError
from .base import REGULARISER, TaskData, device_of, hyperparameter, parse_bool, register_method, register_part, zero
from .lora import check_state_fits
from .w_past import REPRESENTATIONS, PastUpdates, dense

REDUCTIONS = ("sum", "mean")


def parse_lambdas(text: str) -> float | list[float]:
    """``3e4`` (every task) or ``0,3e4,1e5,1e5`` (one per task)."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise EllaError(f"--lam takes a number or comma-separated numbers, one per task (got {text!r})") from None
    return values[0] if len(values) == 1 else values


@dataclass
class ELLAHyperparameters:
    lam: float | list[float] = hyperparameter(
        3e4, "penalty weight λ: one value, or one per task (comma-separated); the paper used 3e4 on "
             "T5-large (with the mean over modules); the right value depends on the model's weight scale",
        parse_lambdas)
    penalty_reduction: str = hyperparameter(
        "mean", "combine the modules' penalties by their 'mean' (the reference code's, for which the paper's λ "
                "3e4...5e8 hold) or their 'sum' (M modules: M times stronger at the same λ)")
    w_past: str = hyperparameter("factors", "how W_past is kept: 'factors' (exact low-rank factors, growing by r per "
                                            "task up to the dense size), 'dense' (d_out x d_in per module) or 'svd' "
                                            "(truncated to --w-past-rank: small and constant, approximate)")
    w_past_rank: int = hyperparameter(64, "rank R that the 'svd' representation keeps")
    w_past_cache: bool = hyperparameter(True, "keep W_past² dense on the device during a task: the fastest penalty; "
                                              "'no' rebuilds it every step from the stored form (least memory)",
                                        parse_bool)

    def __post_init__(self):
        lams = self.lam if isinstance(self.lam, list) else [self.lam]
        if not lams or any(not lam >= 0 for lam in lams):
            raise EllaError(f"λ must be non-negative (got {self.lam}); λ = 0 is IncLoRA")
        if self.penalty_reduction not in REDUCTIONS:
            raise EllaError(f"penalty_reduction must be one of {REDUCTIONS} (got {self.penalty_reduction!r})")
        if self.w_past not in REPRESENTATIONS:
            raise EllaError(f"w_past must be one of {REPRESENTATIONS} (got {self.w_past!r})")
        if self.w_past_rank < 1:
            raise EllaError(f"w_past_rank must be at least 1 (got {self.w_past_rank})")


def interference_figures(update: torch.Tensor, past: torch.Tensor) -> tuple[float, float, float]:
    """How an update ΔW relates to W_past (one module): the interference ⟨ΔW, W_past⟩_F, the energy ‖ΔW‖² on
    W_past's high-energy coordinates (its top 10 % by |W_past|), and the energy in all.

    The paper's bound on the interference is not reported: it needs G, the unpenalised gradient step, which a
    trained update does not reveal (rebuilding G from ΔW itself makes the bound hold for any ΔW, a check that
    cannot fail)."""
    magnitude = past.abs()
    interference = (update * past).sum()
    cutoff = magnitude.flatten().kthvalue(max(1, int(0.9 * magnitude.numel()))).values
    high = update[magnitude > cutoff].square().sum()
    return interference.item(), high.item(), update.square().sum().item()


@register_part
class ELLA:
    """The penalty λ·mean_m ‖ΔW_t^m ⊙ W_past^m‖²_F (or the sum) on the update part's ``task_updates``; W_past
    accumulates its ``merged_updates`` after every task."""

    name, kind = "ella", REGULARISER
    summary = "λ·mean‖ΔW ⊙ W_past‖² over the modules: shrinks updates where earlier tasks wrote"
    config_class = ELLAHyperparameters

    @staticmethod
    def check_update(update: type) -> None:
        if not update.lora_per_task:
            raise EllaError(f"ella penalises each task's own update, which {update.name} does not build: combine it "
                            "with inclora, inflora or jumplora")

    def __init__(self, config: ELLAHyperparameters):
        self.config = config
        # module name -> Σ of finished tasks' ΔW
        self.w_past = PastUpdates(self.config.w_past, self.config.w_past_rank, self.config.w_past_cache)
        self.lam_now = 0.0
        self.diagnostics: dict = {}

    def setup(self, model: torch.nn.Module, tasks: list[Task]) -> None:
        if self.config.w_past == "factors" and not self.update.low_rank_updates:
            raise EllaError(f"the 'factors' W_past representation needs low-rank updates, but {self.update.name}'s "
                            "are dense: pass --w-past dense (exact) or --w-past svd (truncated)")
        if isinstance(self.config.lam, list) and len(self.config.lam) != len(tasks):
            raise EllaError(f"{len(self.config.lam)} λ values for {len(tasks)} tasks: give one λ, "
                            "or exactly one per task")

    def prepare(self, model: torch.nn.Module, task_index: int, task: Task, data: TaskData | None = None) -> None:
        lam = self.config.lam
        self.lam_now = lam[task_index] if isinstance(lam, list) else lam
        self.w_past.to(device_of(model))
        layers = self.update.layers(model)
        check_state_fits(self.name, self.w_past.shapes(), layers)
        # in the model's order, which a loaded state (in its file's order) lacks: the penalty sums in this order
        self.w_past.modules = {name: self.w_past.modules[name] for name in layers if name in self.w_past.modules}

    def penalty(self, model: torch.nn.Module) -> torch.Tensor:
        if not self.w_past or self.lam_now == 0:  # the first task: W_past = 0
            return zero(model)
        return self.lam_now * self.w_past.penalty(self.update.task_updates(model), self.config.penalty_reduction)

    def finish(self, model: torch.nn.Module, task_index: int, task: Task, data: TaskData | None = None) -> None:
        self.diagnostics = self.mechanism(model) if self.w_past and self.lam_now > 0 else {}
        lams = self.config.lam if isinstance(self.config.lam, list) else [self.config.lam]
        if max(lams) > 0:  # W_past serves only the penalty: with λ = 0 throughout, keep nothing
            self.accumulate(model)

    @torch.no_grad()
    def mechanism(self, model: torch.nn.Module) -> dict:
        """``interference_figures`` of the task's update against W_past, summed over the modules."""
        sums = [0.0, 0.0, 0.0]
        for name, update in self.update.merged_updates(model).items():
            figures = interference_figures(dense(update).float(), self.w_past.matrix(name))
            sums = [a + b for a, b in zip(sums, figures)]
        interference, high, total = sums
        return {"lambda": self.lam_now, "interference": interference,
                "update_energy_in_high_energy_coordinates": high / total if total else 0.0}

    def report(self) -> dict:
        return {"diagnostics": self.diagnostics} if self.diagnostics else {}

    @torch.no_grad()
    def accumulate(self, model: torch.nn.Module) -> None:
        """W_past^m ← W_past^m + ΔW_t^m (the update being merged)."""
        for name, update in self.update.merged_updates(model).items():
            self.w_past.add(name, update)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.w_past.tensors()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.w_past.load(state)


register_method("ella", "inclora+ella", "IncLoRA + λ·mean‖ΔW ⊙ W_past‖²: shrinks updates where earlier tasks "
                                        "wrote (W_past kept as exact factors by default, at most the dense size)")

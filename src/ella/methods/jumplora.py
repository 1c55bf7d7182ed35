"""JumpLoRA: sparse LoRA updates through JumpReLU gating, an update part: a fresh LoRA per task (as ``inclora``)
whose update is gated; alone (``jumplora``) or under ELLA's penalty (``jumplora-ella`` = ``jumplora+ella``).

Each adapted matrix receives a gated version of its LoRA product P = B·A, element-wise:

    ΔW_eff = s·(a·J_θ(P) + (1 − a)·P),      J_θ(x) = x·1[|x| > θ]   (symmetric: both signs survive)

θ = exp(log θ): one for the whole model (``--threshold-scope global``) or one per transformer block (``block``),
starting at exp(−4.7). θ learns from the task loss alone (no sparsity penalty) through straight-through
estimators with bandwidth ε: with m = |x| and g the gradient reaching J,

    ∂J/∂m = 1[m > θ]·g,        ∂J/∂θ = −(θ/ε)·mean(rect((m − θ)/ε)·g),      rect(u) = 1[|u| < ½]

Of a task's N optimiser steps, counted after each step (as the reference's JumpInterpCallback reads the Trainer's
global_step in on_step_end), the ramp starts after step first = int(0.2·N) (at least 1) and ends after step
last = int(0.8·N) (at least first + 1): a = clamp((step − first) / (last − first), 0, 1), restarting at 0 for
every task. After step first, once, θ is reset to the (k+1)-th largest |P| of its group, k = the group's LoRA
parameter count Σ r·(d_in + d_out), so that exactly k entries survive. After the task the hard-gated update
s·J_θ(P) is merged into the weights (equivalent to IncLoRA's frozen sum). A regulariser sees ΔW_eff as the task's
update while training (``task_updates``, through a gate that passes no gradient to θ) and the merged s·J_θ(P) at
the end (``merged_updates``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import LoraLayer, LoraVariant
from peft.utils.other import transpose

from ..data import Task
from ..errors import EllaError
from .base import UPDATE, TaskData, device_of, hyperparameter, register_method, register_part, require_data
from .inclora import TaskLoRA
from .lora import LoraHyperparameters, block_of

SCOPES = ("global", "block")


class JumpReLU(torch.autograd.Function):
    """J(m) = m·1[m > θ] on magnitudes m ≥ 0, with the straight-through estimators of the module docstring."""

    @staticmethod
    def forward(ctx, magnitude: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(magnitude, threshold)
        ctx.bandwidth = bandwidth
        return magnitude * (magnitude > threshold)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        magnitude, threshold = ctx.saved_tensors
        near_threshold = ((magnitude - threshold) / ctx.bandwidth).abs() < 0.5  # rect((m − θ)/ε)
        grad_threshold = -(threshold / ctx.bandwidth) * (near_threshold * grad).mean()
        return grad * (magnitude > threshold), grad_threshold.reshape(threshold.shape), None


def jump_gate(x: torch.Tensor, log_threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """J_θ(x) = x·1[|x| > θ], θ = exp(log θ): JumpReLU on |x|, sign restored."""
    return torch.sign(x) * JumpReLU.apply(x.abs(), log_threshold.exp(), bandwidth)


def lora_parameters(layer: LoraLayer, adapter: str) -> int:
    """r·(d_in + d_out), the module's LoRA parameter count: its share of the budget of surviving entries."""
    return layer.lora_A[adapter].weight.numel() + layer.lora_B[adapter].weight.numel()


def ramp_steps(num_steps: int, start: float, end: float) -> tuple[int, int]:
    """The optimiser steps after which the ramp starts (θ's reset) and ends: int(start·N) and int(end·N), as in the
    reference, except that the start is at least step 1 (the reference's int(start·N) = 0 for N < 1 / start is a step
    its callback never sees, so its θ is never reset) and the end at least one step after the start."""
    first = max(int(start * num_steps), 1)
    return first, max(int(end * num_steps), first + 1)


def ramp(step: int, first: int, last: int) -> float:
    """a after optimiser step ``step``: 0 up to ``first``, 1 from ``last`` on, linear in between."""
    return min(1.0, max(0.0, (step - first) / (last - first)))


@dataclass
class JumpLoRAHyperparameters(LoraHyperparameters):
    lora_dropout: float = hyperparameter(0.0, "dropout on the LoRA branch's input while training (the reference's "
                                              "gated branch has none)")
    threshold_scope: str = hyperparameter("global", "one threshold θ for the model ('global') or one per "
                                                    "transformer block ('block')")
    log_threshold_init: float = hyperparameter(-4.7, "initial log θ")
    bandwidth: float = hyperparameter(1e-3, "ε, the bandwidth of the straight-through estimator of ∂/∂θ")
    ramp_start: float = hyperparameter(0.2, "fraction of each task's steps after which the dense-to-sparse ramp "
                                            "starts (and θ is reset to the LoRA parameter budget)")
    ramp_end: float = hyperparameter(0.8, "fraction of each task's steps after which the ramp reaches the hard gate")

    def __post_init__(self):
        super().__post_init__()
        if self.threshold_scope not in SCOPES:
            raise EllaError(f"threshold_scope must be one of {SCOPES} (got {self.threshold_scope!r})")
        if not self.bandwidth > 0:
            raise EllaError(f"bandwidth must be positive (got {self.bandwidth})")
        if not 0 <= self.ramp_start < self.ramp_end <= 1:
            raise EllaError(f"need 0 <= ramp_start < ramp_end <= 1 (got {self.ramp_start}, {self.ramp_end})")


class GatedUpdate(LoraVariant):
    """peft LoRA variant: the layer adds x·ΔW_effᵀ, the gated dense update, instead of s·B(A(x))."""

    def __init__(self, method: "JumpLoRA", log_threshold: torch.nn.Parameter):
        self.method, self.log_threshold = method, log_threshold

    @staticmethod
    def init(module: LoraLayer, adapter_name: str, **kwargs) -> None:
        pass  # installed on a layer whose LoRA is already initialised

    def forward(self, module: LoraLayer, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs):
        update = self.method.gated_update(module, active_adapter, self.log_threshold, self.method.mix)
        return result + F.linear(module.lora_dropout[active_adapter](x), update)

    def merge_safe(self, module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight + self.stored_update(module, active_adapter).to(orig_weight.dtype)

    def merge_unsafe(self, module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data += self.stored_update(module, active_adapter).to(orig_weight.dtype)

    def unmerge(self, module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight - self.stored_update(module, active_adapter).to(orig_weight.dtype)

    def hard_update(self, module: LoraLayer, active_adapter: str) -> torch.Tensor:
        return self.method.gated_update(module, active_adapter, self.log_threshold, mix=1.0)

    def stored_update(self, module: LoraLayer, active_adapter: str) -> torch.Tensor:
        """The hard-gated update in the stored weight's layout (transposed for a GPT-2 ``Conv1D``)."""
        return transpose(self.hard_update(module, active_adapter), module.fan_in_fan_out)


@register_part
class JumpLoRA:
    name, kind = "jumplora", UPDATE
    summary = "a fresh LoRA per task whose update is gated by a learned JumpReLU threshold into a sparse one"
    config_class = JumpLoRAHyperparameters
    default_learning_rate = 1e-3
    keeps_parameters = False
    lora_per_task = True
    low_rank_updates = False  # a gated update is sparse, not low-rank

    def __init__(self, config: JumpLoRAHyperparameters):
        self.config = config
        self.lora = TaskLoRA(config)  # the task's LoRA, which the gate reads
        self.mix = 0.0  # the interpolation a
        self.step = self.num_steps = 0
        self.first_step = self.last_step = 0  # the ramp's start (θ's reset) and end, in optimiser steps
        self.thresholds: dict[str, torch.nn.Parameter] = {}  # group -> log θ
        self.group_of: dict[str, str] = {}  # module name -> its threshold's group
        self.sparsity: dict = {}

    @property
    def adapter(self) -> str:
        return self.lora.adapter

    @property
    def target_modules(self) -> list[str]:
        return self.lora.target_modules

    def setup(self, model: torch.nn.Module, tasks: list[Task]) -> None:
        self.lora.setup(model, tasks)

    def layers(self, model: torch.nn.Module) -> dict[str, LoraLayer]:
        return self.lora.layers(model)

    def prepare(self, model: torch.nn.Module, task_index: int, task: Task,
                data: TaskData | None = None) -> torch.nn.Module:
        data = require_data(data, self.name, "for its schedule (the number of optimiser steps of the task)")
        model = self.lora.prepare(model, task_index, task, data)
        self.step, self.num_steps, self.mix = 0, data.num_steps, 0.0
        self.first_step, self.last_step = ramp_steps(data.num_steps, self.config.ramp_start, self.config.ramp_end)
        device = device_of(model)
        self.thresholds, self.group_of = {}, {}
        for name, layer in self.layers(model).items():
            group = self.group_of[name] = "model" if self.config.threshold_scope == "global" else block_of(name)
            if group not in self.thresholds:
                self.thresholds[group] = torch.nn.Parameter(torch.tensor(self.config.log_threshold_init, device=device))
            layer.register_parameter("jump_log_threshold", self.thresholds[group])  # so the optimiser trains it
            layer.lora_variant[self.adapter] = GatedUpdate(self, self.thresholds[group])
        return model

    def gated_update(self, layer: LoraLayer, adapter: str, log_threshold: torch.Tensor,
                     mix: float) -> torch.Tensor:
        """ΔW_eff = s·(a·J_θ(B·A) + (1 − a)·B·A), d_out x d_in (``F.linear``'s layout)."""
        product = layer.lora_B[adapter].weight @ layer.lora_A[adapter].weight
        if mix > 0:
            product = mix * jump_gate(product, log_threshold, self.config.bandwidth) + (1 - mix) * product
        return product * layer.scaling[adapter]

    def task_updates(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The dense ΔW_eff of each module, for a regulariser's penalty. Its gate passes no gradient to θ (a detached
        θ), so that θ learns from the task loss alone, as in the reference (``collect_lora_deltas`` masks with
        |ΔW| > θ); A and B get the gated gradient 1[|B·A| > θ]·g as in the forward pass."""
        return {name: self.gated_update(layer, self.adapter, layer.jump_log_threshold.detach(), self.mix)
                for name, layer in self.layers(model).items()}

    def merged_updates(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The hard-gated s·J_θ(B·A) that ``finish`` merges."""
        return {name: layer.lora_variant[self.adapter].hard_update(layer, self.adapter)
                for name, layer in self.layers(model).items()}

    def after_step(self, model: torch.nn.Module) -> None:
        self.step += 1
        if self.step == self.first_step:
            self.reset_thresholds(model)
        self.mix = ramp(self.step, self.first_step, self.last_step)

    @torch.no_grad()
    def reset_thresholds(self, model: torch.nn.Module) -> None:
        """θ ← the (k+1)-th largest |B·A| of each group, k = Σ r·(d_in + d_out) over the group's modules, so that
        exactly the k largest entries pass the strict gate |x| > θ."""
        magnitudes: dict[str, list[torch.Tensor]] = {}
        budgets: dict[str, int] = {}
        for name, layer in self.layers(model).items():
            group = self.group_of[name]
            product = layer.lora_B[self.adapter].weight @ layer.lora_A[self.adapter].weight
            magnitudes.setdefault(group, []).append(product.abs().flatten())
            budgets[group] = budgets.get(group, 0) + lora_parameters(layer, self.adapter)
        for group, parts in magnitudes.items():
            values = torch.cat(parts)
            # Refused, not warned: no step before the reset changed B (a learning rate of 0 on all of them), so θ
            # would keep its arbitrary initial value and the task would merge an update of arbitrary sparsity,
            # unnoticed in a long run. ella run's default warm-up, int(0.1·N) steps, never reaches it.
            if not values.any():
                raise EllaError(
                    f"jumplora's threshold reset after optimiser step {self.step} of {self.num_steps} found the update "
                    f"B·A of {group!r} still all zero: no optimiser step before it changed B (a learning rate of 0, "
                    "as in a warm-up's first step; a Trainer rounds a fractional warmup_steps up), so θ cannot be set "
                    "to keep the LoRA parameter budget. Give each task more optimiser steps or a shorter warm-up "
                    "(run_sequence_with_trainer(warmup_ratio=...) rounds it down, as ella run does)")
            if budgets[group] >= values.numel():
                continue  # every entry fits the budget: nothing to cut
            threshold = values.topk(budgets[group] + 1).values[-1]
            # 0 when at most k entries are non-zero: all of them pass a θ just above 0 (as the reference clamps)
            self.thresholds[group].fill_(threshold.clamp_min(1e-12).log())

    def check_finish(self) -> None:
        if self.step != self.num_steps:
            raise EllaError(f"jumplora's schedule ran {self.step} of the task's {self.num_steps} optimiser steps, so "
                            "its threshold and ramp are not where the task should end: call method.after_step(model) "
                            "after every optimiser step and give prepare the task's real number of steps (ella's "
                            "run_sequence and Trainer integration do both)")

    def finish(self, model: torch.nn.Module, task_index: int, task: Task,
               data: TaskData | None = None) -> torch.nn.Module:
        with torch.no_grad():
            merged = self.merged_updates(model)
            kept = sum(int(update.count_nonzero()) for update in merged.values())
            budget = sum(lora_parameters(layer, self.adapter) for layer in self.layers(model).values())
            self.sparsity = {
                "surviving_entries": kept,
                "lora_parameters": budget,
                "density": kept / sum(update.numel() for update in merged.values()),
                "density_per_module": {name: int(u.count_nonzero()) / u.numel() for name, u in merged.items()},
                "thresholds": {group: float(p.exp()) for group, p in self.thresholds.items()},
            }
        return self.lora.finish(model, task_index, task, data)

    def report(self) -> dict:
        return {"sparsity": self.sparsity}


register_method("jumplora", "jumplora",
                "IncLoRA whose updates are gated by a learned JumpReLU threshold into sparse ones (JumpLoRA)")
register_method("jumplora-ella", "jumplora+ella",
                "JumpLoRA's sparse gated updates under ELLA's penalty λ·mean‖ΔW_eff ⊙ W_past‖²", w_past="dense")

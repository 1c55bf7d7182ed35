"""Sculpting Subspaces: adaptive-SVD constrained full fine-tuning (no adapters), on peft's OSF tuner; an update part.

At the start of every task each target matrix is decomposed afresh, W = U Σ Vᵀ. Its top-k singular directions
(U_hi, Σ_hi, V_hi) are frozen and the rest (U_lo, Σ_lo, V_lo) trains: W = U_hi Σ_hi V_hiᵀ + U_lo Σ_lo V_loᵀ
(peft's OSF parametrisation). The retained fraction k / min(d_out, d_in) is chosen per transformer block from its
importance I = mean over the task's tokens of cos(h, block(h)) (the block's input and output hidden states),
normalised to mean 1 over the blocks:

    retained fraction = mrr + I·(trr − mrr)        (mrr = 0.1, trr = 0.8)

so a block of mean importance keeps trr and one above the mean keeps more; the fraction is kept at least mrr and
below 1 by one direction of the model's narrowest linear layer, so that every adapted matrix trains in some
direction.
Importance is measured per block, the "layer" of the paper's cos(x, W x) read as a transformer layer (its input and
output have the same width). The released code's adaptive variant, commented out there, measures it per matrix
with the first min(d_out, d_in) coordinates of x and W x; its active path keeps a fixed ratio.

After every backward pass the gradients are projected off the frozen directions (peft's hooks):
dU_lo −= U_hi(U_hiᵀ dU_lo), dV_lo −= (dV_lo V_hiᵀ) V_hi. AdamW's per-coordinate scaling and weight decay do not
respect that projection, so after every optimiser step the parameters are re-projected as well:
U_lo ← (I − U_hi U_hiᵀ) U_lo, V_lo ← V_lo (I − V_hiᵀ V_hi). The merged update then satisfies U_hiᵀ ΔW = 0 and
ΔW V_hiᵀ = 0: nothing moves in the directions the model relied on most.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft import OSFConfig, get_peft_model
from peft.tuners.osf.layer import OSFLayer
from peft.utils.constants import TRANSFORMERS_MODELS_TO_OSF_TARGET_MODULES_MAPPING

from ..data import Task
from ..errors import EllaError
from .base import (UPDATE, TaskData, hyperparameter, observe, parse_names, register_method, register_part,
                   require_data)
from .lora import block_of, check_target_modules


@dataclass
class SculptingHyperparameters:
    target_modules: list[str] | None = hyperparameter(
        None, "comma-separated linear layers to train (default: attention q,k,v,o and the MLP matrices as peft's "
              "OSF names them for the model type; every linear layer for other types)", parse_names)
    min_retained: float = hyperparameter(0.1, "mrr: the retained (frozen) fraction of a block of importance 0")
    max_retained: float = hyperparameter(0.8, "trr: the retained (frozen) fraction of a block of mean importance "
                                              "(more above the mean)")
    importance_examples: int = hyperparameter(32, "training examples of the task that measure block importance")

    def __post_init__(self):
        if not 0 < self.min_retained <= self.max_retained < 1:
            raise EllaError(f"need 0 < min_retained <= max_retained < 1 "
                            f"(got {self.min_retained}, {self.max_retained})")
        if self.importance_examples < 1:
            raise EllaError(f"importance_examples must be at least 1 (got {self.importance_examples})")
        if self.target_modules is not None and not self.target_modules:
            raise EllaError("target_modules is empty; name at least one linear layer")


def block_importance(model: torch.nn.Module, batches) -> dict[str, float]:
    """Mean cos(h, block(h)) over the tokens of ``batches`` for every transformer block (its input vs. output)."""
    blocks = {block_of(name): module for name, module in model.named_modules()
              if block_of(name) == name and any(part.isdigit() for part in name.split("."))}
    totals = {name: [0.0, 0] for name in blocks}

    def record(name):
        def hook(module, args, kwargs, output):
            hidden_in = args[0] if args else kwargs["hidden_states"]
            hidden_out = output[0] if isinstance(output, tuple) else output
            cos = F.cosine_similarity(hidden_in.float(), hidden_out.float(), dim=-1)
            totals[name][0] += cos.sum().item()
            totals[name][1] += cos.numel()
        return hook

    observe(model, [(module, record(name)) for name, module in blocks.items()], batches, with_kwargs=True)
    return {name: total / count for name, (total, count) in totals.items() if count}


def retained_fractions(importance: dict[str, float], mrr: float, trr: float, most: float) -> dict[str, float]:
    """mrr + I·(trr − mrr) with I normalised to mean 1 over the blocks, clipped to [mrr, most]."""
    mean = sum(importance.values()) / len(importance)
    if not mean > 0:  # the normalisation would divide by it, or reverse the blocks' order
        raise EllaError(f"sculpting measured a mean block importance (cos of a block's input and output) of "
                        f"{mean:.3g}; it needs a positive one to normalise the blocks' importances by (a residual "
                        "block's output follows its input: the mean is near 1 in the models it was made for)")
    return {block: min(most, max(mrr, mrr + (value / mean) * (trr - mrr))) for block, value in importance.items()}


@torch.no_grad()
def reproject(layer: OSFLayer, adapter: str) -> None:
    """U_lo ← (I − U_hi U_hiᵀ) U_lo and V_lo ← V_lo (I − V_hiᵀ V_hi), with peft's stored factors: where a factor is
    square, peft keeps the complement's basis (U_lo at the start of the task) instead of U_hi, and
    I − U_hi U_hiᵀ = U_lo,0 U_lo,0ᵀ."""
    params = layer.osf_svd_params[adapter]
    u, v = params["U_low"], params["V_low"]
    if adapter in layer._osf_U_high:
        u_high = layer._osf_U_high[adapter]
        u.sub_(u_high @ (u_high.T @ u))
    else:
        u_low_init = layer._osf_U_low_init[adapter]
        u.copy_(u_low_init @ (u_low_init.T @ u))
    if adapter in layer._osf_V_high:
        v_high = layer._osf_V_high[adapter]
        v.sub_((v @ v_high.T) @ v_high)
    else:
        v_low_init = layer._osf_V_low_init[adapter]
        v.copy_((v @ v_low_init.T) @ v_low_init)


@register_part
class SculptingSubspaces:
    name, kind = "sculpting", UPDATE
    summary = "full fine-tuning kept off each matrix's top singular directions (adaptive SVD, per-block rank)"
    config_class = SculptingHyperparameters
    default_learning_rate = 1e-4
    keeps_parameters = False  # OSF decomposes every target afresh each task
    lora_per_task = False
    adapter = "sculpting"

    def __init__(self, config: SculptingHyperparameters):
        self.config = config
        self.retained: dict[str, float] = {}

    def setup(self, model: torch.nn.Module, tasks: list[Task]) -> None:
        if self.config.target_modules is not None:
            check_target_modules(model, self.config.target_modules)

    def prepare(self, model: torch.nn.Module, task_index: int, task: Task,
                data: TaskData | None = None) -> torch.nn.Module:
        data = require_data(data, self.name, "to measure each block's importance")
        importance = block_importance(model, data.batches(batch_size=1, limit=self.config.importance_examples))
        if not importance:
            raise EllaError(f"found no numbered transformer blocks in this {model.config.model_type} model "
                            "to measure importance on")
        # peft keeps int(fraction · min(d_out, d_in)) directions: below 1 by one direction of the narrowest linear
        # layer (adapted or not), no adapted matrix keeps them all
        narrowest = min(min(module.weight.shape) for module in model.modules() if isinstance(module, torch.nn.Linear))
        self.retained = retained_fractions(importance, self.config.min_retained, self.config.max_retained,
                                           most=1 - 1 / narrowest)
        targets = (self.config.target_modules
                   or TRANSFORMERS_MODELS_TO_OSF_TARGET_MODULES_MAPPING.get(model.config.model_type, "all-linear"))
        config = OSFConfig(target_modules=targets, effective_rank=self.config.max_retained,
                           rank_pattern={rf"{re.escape(block)}\..*": fraction
                                         for block, fraction in self.retained.items()})
        model = get_peft_model(model, config, adapter_name=self.adapter)  # decomposes every target afresh
        if not self.layers(model):
            raise EllaError(f"sculpting adapted none of this {model.config.model_type} model's target modules "
                            f"({', '.join(targets) if isinstance(targets, list) else targets}): peft's OSF tuner, "
                            "which it is built on, takes torch.nn.Linear layers only (not GPT-2's Conv1D); name "
                            "linear layers with --target-modules")
        return model

    def after_step(self, model: torch.nn.Module) -> None:
        for layer in self.layers(model):
            reproject(layer, self.adapter)

    def finish(self, model: torch.nn.Module, task_index: int, task: Task,
               data: TaskData | None = None) -> torch.nn.Module:
        return model.merge_and_unload()

    def layers(self, model: torch.nn.Module) -> list[OSFLayer]:
        return [module for module in model.modules() if isinstance(module, OSFLayer)]

    def report(self) -> dict:
        return {"retained_fraction_per_block": self.retained}


register_method("sculpting", "sculpting",
                "full fine-tuning kept off each matrix's top singular directions (adaptive SVD, per-block rank)")

"""What the LoRA methods share: their hyper-parameters and the peft plumbing.

LoRA adds ΔW = s·B·A to a frozen linear layer W0 (d_out x d_in), with A (r x d_in) Kaiming-initialised,
B (d_out x r) zero-initialised and s = alpha / r (peft's defaults are exactly this).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

from ..errors import EllaError
from ..models import is_seq2seq
from .base import hyperparameter, parse_names


@dataclass
class LoraHyperparameters:
    lora_r: int = hyperparameter(8, "LoRA rank r")
    lora_alpha: float = hyperparameter(32.0, "LoRA alpha; the update is (alpha / r)·B·A")
    lora_dropout: float = hyperparameter(0.1, "dropout on the LoRA branch's input while training")
    target_modules: list[str] | None = hyperparameter(
        None, "comma-separated names of the linear layers to adapt (default: attention q and v, "
              "as peft names them for the model type, e.g. q_proj,v_proj for LLaMA, q,v for T5)", parse_names)

    def __post_init__(self):
        if self.lora_r < 1:
            raise EllaError(f"lora_r must be a positive rank (got {self.lora_r})")
        if self.lora_alpha <= 0:
            raise EllaError(f"lora_alpha must be positive (got {self.lora_alpha})")
        if not 0 <= self.lora_dropout < 1:
            raise EllaError(f"lora_dropout must be in [0, 1) (got {self.lora_dropout})")
        if self.target_modules is not None and not self.target_modules:
            raise EllaError("target_modules is empty; name at least one linear layer, e.g. q_proj,v_proj")


def resolve_target_modules(model: torch.nn.Module, targets: list[str] | None) -> list[str]:
    """The LoRA target module names (default: peft's attention q and v for the model type), checked."""
    model_type = model.config.model_type
    if targets is None:
        targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
        if targets is None:
            raise EllaError(f"no default LoRA target modules for model type {model_type!r}; "
                            "pass --target-modules, e.g. --target-modules q_proj,v_proj")
    check_target_modules(model, targets)
    return list(targets)


def check_target_modules(model: torch.nn.Module, targets: list[str]) -> None:
    """Every target must match a module whose path ends with it (peft's rule); else name the alternatives."""
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                         if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"})
        raise EllaError(f"target module(s) {', '.join(missing)} not found in this {model.config.model_type} model; "
                        f"its linear layers are named: {', '.join(linear)}")


def attach_lora(model: torch.nn.Module, h: LoraHyperparameters, targets: list[str], adapter: str) -> PeftModel:
    """Wrap ``model`` with a fresh trainable LoRA named ``adapter``; everything else is frozen."""
    config = LoraConfig(r=h.lora_r, lora_alpha=h.lora_alpha, lora_dropout=h.lora_dropout, target_modules=targets,
                        task_type=TaskType.SEQ_2_SEQ_LM if is_seq2seq(model) else TaskType.CAUSAL_LM)
    return get_peft_model(model, config, adapter_name=adapter)


def lora_layers(model: PeftModel, adapter: str) -> dict[str, LoraLayer]:
    """The LoRA layers holding ``adapter``, keyed by the module's name in the base model."""
    return {name: module for name, module in model.get_base_model().named_modules()
            if isinstance(module, LoraLayer) and adapter in module.lora_A}


def block_of(module_name: str) -> str:
    """The transformer block a module belongs to: its path up to the first layer index
    (``model.layers.3.self_attn.q_proj`` -> ``model.layers.3``; T5: ``decoder.block.1``)."""
    parts = module_name.split(".")
    index = next((i for i, part in enumerate(parts) if part.isdigit()), len(parts) - 1)
    return ".".join(parts[: index + 1])


def check_state_fits(method: str, shapes: dict[str, tuple[int | None, int | None]],
                     layers: dict[str, LoraLayer]) -> None:
    """Every module of a loaded state (name -> the (d_out, d_in) it fixes, None where it fixes none) must be an
    adapted module of this model with that shape."""
    wrong = sorted(name for name, (d_out, d_in) in shapes.items()
                   if name not in layers or d_out not in (None, layers[name].out_features)
                   or d_in not in (None, layers[name].in_features))
    if wrong:
        raise EllaError(f"the {method} state does not fit this model: {len(wrong)} module(s), e.g. {wrong[0]}, are not "
                        f"adapted here or differ in shape; load the method_state.safetensors of a {method} run "
                        "with the same model and target modules")

"""Continual-learning methods. Each is one file here with a ``@register``-ed ``ContinualMethod``;
importing it below is its registration."""

from . import ella, inclora, seqft, seqlora  # noqa: F401  (registers the methods)
from .base import METHODS, ContinualMethod, NoHyperparameters, get_method, hyperparameter, register
from .ella import ELLA, ELLAHyperparameters, ella_penalty
from .inclora import IncLoRA
from .lora import LoraHyperparameters, LoraMethod
from .seqft import SeqFT
from .seqlora import SeqLoRA

__all__ = ["ELLA", "METHODS", "ContinualMethod", "ELLAHyperparameters", "IncLoRA", "LoraHyperparameters",
           "LoraMethod", "NoHyperparameters", "SeqFT", "SeqLoRA", "ella_penalty", "get_method", "hyperparameter",
           "register"]

"""Continual-learning methods. Each is one file here with a ``@register``-ed ``ContinualMethod``;
importing it below is its registration."""

from . import ella  # noqa: F401
from . import ewc  # noqa: F401
from . import inclora  # noqa: F401
from . import inflora  # noqa: F401
from . import jumplora  # noqa: F401
from . import mtl  # noqa: F401
from . import olora  # noqa: F401
from . import replay  # noqa: F401
from . import sculpting  # noqa: F401
from . import seqft  # noqa: F401
from . import seqlora  # noqa: F401
from .base import METHODS, ContinualMethod, NoHyperparameters, TaskData, get_method, hyperparameter, register
from .ella import ELLA, ELLAHyperparameters
from .inclora import IncLoRA
from .lora import LoraHyperparameters, LoraMethod
from .seqft import SeqFT
from .seqlora import SeqLoRA

__all__ = ["ELLA", "METHODS", "ContinualMethod", "ELLAHyperparameters", "IncLoRA", "LoraHyperparameters",
           "LoraMethod", "NoHyperparameters", "SeqFT", "SeqLoRA", "TaskData", "get_method",
           "hyperparameter", "register"]

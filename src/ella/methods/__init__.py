"""Continual-learning methods as compositions of parts (see ``base``). Each part is one file here; importing it
below registers the part and the methods (recipes) it defines."""

from . import inclora  # noqa: F401  (first: the update part most recipes use)
from . import ella  # noqa: F401
from . import ewc  # noqa: F401
from . import inflora  # noqa: F401
from . import jumplora  # noqa: F401
from . import mtl  # noqa: F401
from . import olora  # noqa: F401
from . import replay  # noqa: F401
from . import sculpting  # noqa: F401
from . import seqft  # noqa: F401
from . import seqlora  # noqa: F401
from .base import (METHODS, PARTS, ContinualMethod, NoHyperparameters, TaskData, get_method, hyperparameter,
                   method_fields, register_method, register_part)
from .lora import LoraHyperparameters

__all__ = ["METHODS", "PARTS", "ContinualMethod", "LoraHyperparameters", "NoHyperparameters", "TaskData",
           "get_method", "hyperparameter", "method_fields", "register_method", "register_part"]

"""MTL: the multi-task upper bound, a data policy. The first task trains jointly on every task's examples, shuffled
together; the later tasks train nothing, so their rows of the accuracy matrix repeat the first one. The ``mtl``
method is ``inclora+mtl``: one LoRA merged into the weights. It sees all tasks' data at once: not a continual method,
the reference that the continual methods are measured against.
"""

from __future__ import annotations

from ..data import Encoded
from .base import DATA, NoHyperparameters, register_method, register_part


@register_part
class MultiTask:
    name, kind = "mtl", DATA
    summary = "every task's data at the first task"
    config_class = NoHyperparameters

    def __init__(self, config: NoHyperparameters):
        self.config = config

    def training_items(self, task_index: int, sequence: list[list[Encoded]]) -> list[Encoded]:
        if task_index > 0:
            return []  # learnt with the first task; an empty list skips the training
        return [item for items in sequence for item in items]


register_method("mtl", "inclora+mtl",
                "multi-task upper bound, not a continual method: one LoRA trained jointly on every task's data at once")

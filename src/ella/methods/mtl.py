"""MTL: the multi-task upper bound. One LoRA trains jointly on every task's examples, shuffled together, at the
first task, and is merged into the weights (IncLoRA with a single adapter); the later tasks train nothing, so their
rows of the accuracy matrix repeat the first one. It sees all tasks' data at once: not a continual method, the
reference that the continual methods are measured against.
"""

from __future__ import annotations

from ..data import Encoded
from .base import register
from .inclora import IncLoRA


@register
class MTL(IncLoRA):
    name = "mtl"
    summary = "multi-task upper bound, not a continual method: one LoRA trained jointly on every task's data at once"

    def training_items(self, task_index: int, sequence: list[list[Encoded]]) -> list[Encoded]:
        if task_index > 0:
            return []  # learnt with the first task; an empty list skips the training
        return [item for items in sequence for item in items]

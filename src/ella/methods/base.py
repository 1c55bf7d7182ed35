"""The one extension point: a continual-learning method is a ``ContinualMethod`` subclass in one file,
registered with ``@register``. The engine calls the hooks below and never branches on which method runs.

For task t of a sequence the engine calls, in order::

    items = method.training_items(t, sequence)          # what to train on (Replay adds its buffer)
    model = method.prepare(model, t, task, data)        # attach / select adapters, choose what trains
    for each batch:
        loss = task_loss + method.penalty(model)         # extra loss term (fp32, outside autocast)
        loss.backward(); method.after_backward(model)    # edit gradients
        optimizer.step(); method.after_step(model)       # edit parameters
    model = method.finish(model, t, task, data)         # accumulate state, merge
    log.update(method.report())                         # the method's own figures for the task

``setup(model, tasks)`` runs once before the first task to check the configuration, so that a mistake is
reported before any training. ``data`` (a ``TaskData``) lets a method read the task's training examples, e.g. a
pass over them before training (InfLoRA, Sculpting) or after it (EWC), and the number of optimiser steps planned.
``state_dict()`` holds what the method keeps beyond the model's weights (ELLA: W_past); it is saved with
safetensors after every task.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator

import torch

from ..data import Encoded, Task
from ..errors import EllaError

METHODS: dict[str, type["ContinualMethod"]] = {}


def register(cls: type["ContinualMethod"]) -> type["ContinualMethod"]:
    """Class decorator: make a method available by its ``name`` to the CLI and ``get_method``."""
    METHODS[cls.name] = cls
    return cls


def get_method(name: str, **hyperparameters: Any) -> "ContinualMethod":
    """A method by registered name, e.g. ``get_method("ella", lam=3e4, lora_r=8)``."""
    if name not in METHODS:
        raise EllaError(f"unknown method {name!r}: choose one of {', '.join(sorted(METHODS))} "
                        "(`ella methods` describes them)")
    return METHODS[name](**hyperparameters)


def hyperparameter(default: Any, help: str, parse: Callable[[str], Any] | None = None) -> Any:
    """A config field with the help text the CLI shows; ``parse`` turns the command-line string into a value."""
    return dataclasses.field(default=default, metadata={"help": help, "parse": parse})


def parse_bool(text: str) -> bool:
    """Command-line booleans: yes/no, true/false, on/off, 1/0."""
    value = text.strip().lower()
    if value not in ("yes", "no", "true", "false", "on", "off", "1", "0"):
        raise EllaError(f"expected yes or no (or true/false, on/off, 1/0), got {text!r}")
    return value in ("yes", "true", "on", "1")


@dataclass
class NoHyperparameters:
    pass


@dataclass
class TaskData:
    """What a method may read of the current task besides its ``Task``."""

    items: list[Encoded]  # the task's tokenized training examples
    num_steps: int  # optimiser steps planned for the task
    batches: Callable[..., Iterator[dict[str, torch.Tensor]]]  # batches(batch_size=1, limit=None), on the device



@torch.no_grad()
def observe(model: torch.nn.Module, hooks: list[tuple[torch.nn.Module, Callable]], batches,
            pre: bool = False, with_kwargs: bool = False) -> None:
    """Run ``model`` over ``batches`` in eval mode (no dropout), without gradients, with temporary forward hooks
    (``pre``: forward pre-hooks) on the given modules; the model's training mode is restored afterwards."""
    register = "register_forward_pre_hook" if pre else "register_forward_hook"
    handles = [getattr(module, register)(hook, with_kwargs=with_kwargs) for module, hook in hooks]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)


def require_data(data: TaskData | None, method: str, purpose: str) -> TaskData:
    """``data``, or an error for a user's own loop that called a hook without it."""
    if data is None:
        raise EllaError(f"{method} needs the task's data {purpose}: pass data=TaskData(...) to the hook "
                        "(ella.run_sequence does this for you)")
    return data


class ContinualMethod:
    name: ClassVar[str]
    summary: ClassVar[str]  # one line for `ella methods`
    config_class: ClassVar[type] = NoHyperparameters
    default_learning_rate: ClassVar[float] = 1e-3

    def __init__(self, config: Any = None, **hyperparameters: Any):
        if config is not None and hyperparameters:
            raise TypeError("pass either a config object or keyword hyper-parameters, not both")
        if config is None:
            known = {f.name for f in dataclasses.fields(self.config_class)}
            unknown = sorted(set(hyperparameters) - known)
            if unknown:
                raise EllaError(f"{', '.join(unknown)}: not a hyper-parameter of {self.name} "
                                f"(it has: {', '.join(sorted(known)) or 'none'})")
            config = self.config_class(**hyperparameters)
        self.config = config

    def setup(self, model: torch.nn.Module, tasks: list[Task]) -> None:
        """Check the configuration against the model and the sequence before anything trains."""

    def training_items(self, task_index: int, sequence: list[list[Encoded]]) -> list[Encoded]:
        """The examples to train on for task ``task_index``: by default its own. ``sequence`` holds every task's
        examples; only the MTL upper bound may look past ``task_index``. An empty list skips the task's training."""
        return sequence[task_index]

    def prepare(self, model: torch.nn.Module, task_index: int, task: Task,
                data: TaskData | None = None) -> torch.nn.Module:
        """Return the model to train on this task, with exactly the trainable parameters set."""
        return model

    def penalty(self, model: torch.nn.Module) -> torch.Tensor:
        """The method's extra loss term for the current step (already weighted)."""
        return next(model.parameters()).new_zeros(())

    def after_backward(self, model: torch.nn.Module) -> None:
        """Edit gradients after each backward pass (gradient projection)."""

    def after_step(self, model: torch.nn.Module) -> None:
        """Edit parameters after each optimiser step (re-projection)."""

    def finish(self, model: torch.nn.Module, task_index: int, task: Task,
               data: TaskData | None = None) -> torch.nn.Module:
        """Close the task: accumulate the method's state, merge what should be merged; return the model."""
        return model

    def report(self) -> dict:
        """Figures of the task just finished for the task's log (e.g. JumpLoRA's sparsity)."""
        return {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise EllaError(f"{self.name} keeps no state, but a saved state with {len(state)} tensors was given")

    def describe(self) -> dict:
        """Name and hyper-parameters, for results.json."""
        return {"name": self.name, **dataclasses.asdict(self.config)}

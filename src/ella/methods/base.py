"""Continual-learning methods as compositions of small parts, and the hooks the engine calls.

A method is one **update** part, zero or more **regularisers** and at most one **data** policy:

- the update part builds each task's update and merges it: ``seqft`` (every weight), ``seqlora`` (one LoRA through
  all tasks), ``inclora`` (a fresh LoRA per task), ``inflora`` (InfLoRA's designed A), ``jumplora`` (a JumpReLU-gated
  LoRA per task), ``sculpting`` (peft's OSF);
- a regulariser adds a penalty on that update: ``ella`` (λ·mean‖ΔW ⊙ W_past‖²), ``olora`` (orthogonal A's),
  ``ewc``;
- a data policy chooses what a task trains on: ``replay`` (a buffer of earlier examples), ``mtl`` (every task at once).

A registered name is a recipe of parts (``ella`` = ``inclora+ella``, ``ewc`` = ``seqlora+ewc``); a name with ``+``
lists parts and composes any valid combination, e.g. ``get_method("inclora+ella+replay")``. Each part is one file
here: a class with a ``name``, a ``kind``, a ``summary``, a ``config_class`` (its hyper-parameters) and the hooks it
needs, decorated with ``@register_part``; the composed ``ContinualMethod`` calls them. For task t the engine calls::

    items = method.training_items(t, sequence)          # the data policy (default: the task's own examples)
    model = method.prepare(model, t, task, data)        # the update part, then each regulariser
    for each batch:
        loss = task_loss + method.penalty(model)         # Σ of the regularisers' penalties, fp32, once per step
        loss.backward(); method.after_backward(model)    # edit gradients
        optimizer.step(); method.after_step(model)       # edit parameters, advance schedules
    model = method.finish(model, t, task, data)         # every part's check_finish, then the regularisers and the
                                                        # data policy take what they keep, then the update merges
    log.update(method.report())                         # every part's own figures for the task

``setup(model, tasks)`` runs once before the first task to check the configuration against the model, so a mistake
is reported before any training. ``data`` (a ``TaskData``) lets a part read the task's training examples (InfLoRA,
Sculpting, EWC) and the number of optimiser steps planned (JumpLoRA). ``state_dict()`` holds what the parts keep
beyond the model's weights (ELLA: W_past), each part's tensors under ``<part>.``; it is saved with safetensors after
every task.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from ..data import Encoded, Task
from ..errors import EllaError

UPDATE, REGULARISER, DATA = "update", "regulariser", "data"
PARTS: dict[str, type] = {}  # part name -> its class
METHODS: dict[str, "Recipe"] = {}  # registered method name -> its recipe


def register_part(cls: type) -> type:
    """Class decorator: make a part available by its ``name`` in method names such as ``inclora+ella``."""
    if cls.kind not in (UPDATE, REGULARISER, DATA):
        raise ValueError(f"part {cls.name}: kind must be {UPDATE!r}, {REGULARISER!r} or {DATA!r}")
    PARTS[cls.name] = cls
    return cls


@dataclass(frozen=True)
class Recipe:
    """A registered method: its parts (by name), one line for `ella methods`, and the defaults it changes."""

    parts: tuple[str, ...]
    summary: str
    defaults: dict[str, Any] = dataclasses.field(default_factory=dict)


def register_method(name: str, parts: str, summary: str, **defaults: Any) -> None:
    """Register ``name`` as the recipe ``parts`` (``"inclora+ella"``), with hyper-parameter defaults of its own."""
    METHODS[name] = Recipe(tuple(parts.split("+")), summary, defaults)


def hyperparameter(default: Any, help: str, parse: Callable[[str], Any] | None = None) -> Any:
    """A config field with the help text the CLI shows; ``parse`` turns the command-line string into a value."""
    return dataclasses.field(default=default, metadata={"help": help, "parse": parse})


def parse_names(text: str) -> list[str]:
    """Command-line lists: comma-separated names (``q_proj,v_proj``), blanks ignored."""
    return [name.strip() for name in text.split(",") if name.strip()]


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
    """What a part may read of the current task besides its ``Task``."""

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


def require_data(data: TaskData | None, part: str, purpose: str) -> TaskData:
    """``data``, or an error for a user's own loop that called a hook without it."""
    if data is None:
        raise EllaError(f"{part} needs the task's data {purpose}: pass data=TaskData(...) to the hook "
                        "(ella.run_sequence and ella's Trainer integration do this for you)")
    return data


def device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def zero(model: torch.nn.Module) -> torch.Tensor:
    """The penalty of a step with nothing to penalise."""
    return next(model.parameters()).new_zeros(())


def resolve_parts(name: str) -> tuple[list[str], dict[str, Any], str]:
    """The part names, the recipe defaults and the summary of a method name: a registered recipe, or parts (and
    recipes) joined by ``+``; checked: one update part, at most one data policy, each regulariser fits the update."""
    if "+" not in name:
        if name not in METHODS:
            raise EllaError(f"unknown method {name!r}: choose one of {', '.join(sorted(METHODS))}, or combine parts "
                            f"with + (parts: {', '.join(sorted(PARTS))}); `ella methods` describes them")
        recipe = METHODS[name]
        return list(recipe.parts), dict(recipe.defaults), recipe.summary
    parts: list[str] = []
    defaults: dict[str, Any] = {}
    for token in name.split("+"):
        if token in PARTS:  # in a combination, a name that is a part means that part alone
            parts.append(token)
        elif token in METHODS:
            parts += METHODS[token].parts
            defaults.update(METHODS[token].defaults)
        else:
            raise EllaError(f"{token!r} in {name!r} is neither a part ({', '.join(sorted(PARTS))}) nor a method "
                            f"({', '.join(sorted(METHODS))})")
    repeated = sorted({p for p in parts if parts.count(p) > 1})
    if repeated:
        raise EllaError(f"{name!r} names {', '.join(repeated)} twice")
    kinds = {kind: [p for p in parts if PARTS[p].kind == kind] for kind in (UPDATE, REGULARISER, DATA)}
    if len(kinds[UPDATE]) != 1:
        choices = ", ".join(sorted(p for p, cls in PARTS.items() if cls.kind == UPDATE))
        raise EllaError(f"{name!r} has {len(kinds[UPDATE])} update parts ({', '.join(kinds[UPDATE]) or 'none'}); a "
                        f"method has exactly one, which builds each task's update: one of {choices}")
    if len(kinds[DATA]) > 1:
        raise EllaError(f"{name!r} has two data policies ({', '.join(kinds[DATA])}); choose one")
    update = PARTS[kinds[UPDATE][0]]
    for regulariser in kinds[REGULARISER]:
        PARTS[regulariser].check_update(update)
    summary = " + ".join(PARTS[p].summary for p in kinds[UPDATE] + kinds[REGULARISER] + kinds[DATA])
    return kinds[UPDATE] + kinds[REGULARISER] + kinds[DATA], defaults, summary


def method_fields(name: str) -> dict[str, tuple[dataclasses.Field, Callable, Any]]:
    """The hyper-parameters of a method: field name -> (the field, its command-line parser, the method's default)."""
    parts, defaults, _ = resolve_parts(name)
    fields = {}
    for part in parts:
        config_class = PARTS[part].config_class
        hints = typing.get_type_hints(config_class)
        for f in dataclasses.fields(config_class):
            if f.name in fields:
                raise EllaError(f"{name!r}: the hyper-parameter {f.name} belongs to two of its parts")
            fields[f.name] = (f, f.metadata.get("parse") or hints[f.name], defaults.get(f.name, f.default))
    return fields


def get_method(name: str, **hyperparameters: Any) -> "ContinualMethod":
    """A method by name, e.g. ``get_method("ella", lam=3e4, lora_r=8)`` or ``get_method("inclora+ella+replay")``."""
    parts, defaults, summary = resolve_parts(name)
    known = method_fields(name)
    unknown = sorted(set(hyperparameters) - set(known))
    if unknown:
        raise EllaError(f"{', '.join(unknown)}: not a hyper-parameter of {name} "
                        f"(it has: {', '.join(sorted(known)) or 'none'})")
    values = {**defaults, **hyperparameters}
    built = []
    for part in parts:
        cls = PARTS[part]
        own = {f.name for f in dataclasses.fields(cls.config_class)}
        built.append(cls(cls.config_class(**{k: v for k, v in values.items() if k in own})))
    return ContinualMethod(name, summary, built)


class ContinualMethod:
    """A method composed of parts; the engine's only view of it. ``parts`` maps each part's name to the part."""

    def __init__(self, name: str, summary: str, parts: list):
        self.name, self.summary = name, summary
        self.parts = {part.name: part for part in parts}
        self.update = next(part for part in parts if part.kind == UPDATE)
        self.regularisers = [part for part in parts if part.kind == REGULARISER]
        self.data_policy = next((part for part in parts if part.kind == DATA), None)
        for regulariser in self.regularisers:
            regulariser.update = self.update  # the update it penalises
        self.default_learning_rate = self.update.default_learning_rate
        self.set_up = False

    def _call(self, hook: str, parts: list, *args) -> None:
        for part in parts:
            if hasattr(part, hook):
                getattr(part, hook)(*args)

    def setup(self, model: torch.nn.Module, tasks: list[Task]) -> None:
        """Check the configuration against the model and the sequence before anything trains."""
        self._call("setup", list(self.parts.values()), model, tasks)
        self.set_up = True

    def training_items(self, task_index: int, sequence: list[list[Encoded]]) -> list[Encoded]:
        """The examples to train on for task ``task_index``: the data policy's, else the task's own. ``sequence``
        holds every task's examples; only the MTL upper bound looks past ``task_index``. An empty list skips the
        task's training."""
        if self.data_policy is None:
            return sequence[task_index]
        return self.data_policy.training_items(task_index, sequence)

    def prepare(self, model: torch.nn.Module, task_index: int, task: Task,
                data: TaskData | None = None) -> torch.nn.Module:
        """Return the model to train on this task, with exactly the trainable parameters set."""
        if not self.set_up:
            raise EllaError(f"call method.setup(model, tasks) once before the first method.prepare: {self.name} "
                            "resolves its target modules and checks its settings against the model and the "
                            "sequence there")
        model = self.update.prepare(model, task_index, task, data)
        self._call("prepare", self.regularisers, model, task_index, task, data)
        return model

    def penalty(self, model: torch.nn.Module) -> torch.Tensor:
        """The regularisers' penalty for the current step (weighted), in fp32 also under mixed precision."""
        if not self.regularisers:
            return zero(model)
        with torch.autocast(device_of(model).type, enabled=False):
            total = None
            for regulariser in self.regularisers:
                term = regulariser.penalty(model)
                total = term if total is None else total + term
            return total

    def after_backward(self, model: torch.nn.Module) -> None:
        """Edit gradients after each backward pass (gradient projection)."""
        self._call("after_backward", [self.update], model)

    def after_step(self, model: torch.nn.Module) -> None:
        """Edit parameters after each optimiser step (re-projection), advance per-step schedules."""
        self._call("after_step", [self.update], model)

    def finish(self, model: torch.nn.Module, task_index: int, task: Task,
               data: TaskData | None = None) -> torch.nn.Module:
        """Close the task: the regularisers and the data policy take what they keep from the task's update (ELLA:
        W_past), then the update part merges it; returns the model."""
        self._call("check_finish", list(self.parts.values()))  # a part that refuses does so before any part acts
        others = self.regularisers + ([self.data_policy] if self.data_policy else [])
        self._call("finish", others, model, task_index, task, data)
        return self.update.finish(model, task_index, task, data)

    def report(self) -> dict:
        """Figures of the task just finished for the task's log (e.g. JumpLoRA's sparsity)."""
        figures = {}
        for part in self.parts.values():
            figures.update(part.report() if hasattr(part, "report") else {})
        return figures

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What the parts keep beyond the model's weights, each part's tensors under ``<part>.``."""
        return {f"{name}.{key}": value for name, part in self.parts.items() if hasattr(part, "state_dict")
                for key, value in part.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        owners = {name for name, part in self.parts.items() if hasattr(part, "state_dict")}
        foreign = sorted({key.split(".", 1)[0] for key in state} - owners)
        if foreign:
            raise EllaError(f"the saved state holds tensors of {', '.join(foreign)}, which {self.name} does not "
                            f"have (its parts with a state: {', '.join(sorted(owners)) or 'none'}); load the "
                            "method_state.safetensors of a run of the same method (ella before 0.3 saved states "
                            "without the part's prefix: such an unfinished run cannot resume, start it again)")
        for name in owners:
            prefix = name + "."
            self.parts[name].load_state_dict({key[len(prefix):]: value for key, value in state.items()
                                              if key.startswith(prefix)})

    def describe(self) -> dict:
        """Name and hyper-parameters (and the resolved LoRA target modules), for results.json."""
        described = {"name": self.name}
        for part in self.parts.values():
            described.update(dataclasses.asdict(part.config))
        if getattr(self.update, "target_modules", None) is not None:
            described["target_modules"] = self.update.target_modules
        return described

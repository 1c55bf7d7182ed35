"""ella's continual-learning methods inside Hugging Face ``Trainer`` (and trainers built on it, such as TRL's
``SFTTrainer``), with the user's own arguments, datasets and collator.

A method's hooks go where ``ella run`` calls them (see ``ella.methods.base``):

- ``ContinualCallback`` (a ``TrainerCallback``): ``after_step`` after every optimiser step, and a check at the start
  of training that the Trainer takes as many optimiser steps as the method planned for (``TaskData.num_steps``:
  JumpLoRA's ramp is scheduled over them).
- ``continual(TrainerClass)`` / ``ContinualTrainer``: what a callback cannot do. A callback can change neither the
  loss nor the gradients between the backward pass and the clipping (``on_pre_optimizer_step`` comes after the
  clipping), so the trainer class adds ``method.penalty(model)`` to the loss of the last micro-batch of every
  optimiser step (in fp32, outside autocast, counted once per step whatever the gradient accumulation), and calls
  ``after_backward`` after that micro-batch's backward pass, before the clipping. Its training steps draw
  dropout masks as ``ella run`` does (``engine.dropout_mask``, 4x faster than torch's on a CPU).
- ``task_data``: the ``TaskData`` that ``prepare`` and ``finish`` read (the task's tokenized examples, the
  optimiser steps planned, batches on the model's device), from ella's encoded examples or from tokenized rows.
- ``run_sequence_with_trainer``: the whole sequence: per task ``prepare``, a new Trainer on the prepared model
  (``prepare`` and ``finish`` replace the model object: peft wraps it, the merge unwraps it), ``train()``,
  ``finish``; and optionally ella's evaluation of every task after every task (or as its schedule says), as
  ``run_sequence`` returns it.
"""

from __future__ import annotations

import copy
import math
import random
import time
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from transformers import Trainer, TrainerCallback, TrainingArguments

from . import engine
from .data import IGNORE_INDEX, Encoded, Task, TaskEncoder, collate
from .errors import EllaError
from .evaluation import positions
from .methods import ContinualMethod, TaskData
from .models import is_seq2seq

__all__ = ["ContinualCallback", "ContinualTrainer", "EncodedDataset", "EpochOrderSampler", "answer_collator",
           "continual", "run_sequence_with_trainer", "task_data", "trainer_steps", "training_arguments"]


# ---------------------------------------------------------------- the task's data, as the hooks read it


def as_encoded(row: Any, seq2seq: bool = False) -> Encoded:
    """One training example as ella's ``Encoded``: an ``Encoded`` as it is, or a row with ``input_ids`` and
    optionally ``labels`` (-100 where there is no loss), ``completion_mask`` (TRL's: 1 on the tokens to learn) and
    ``attention_mask`` (padding, which is dropped). Without labels or completion mask, every token is a target."""
    if isinstance(row, Encoded):
        return row
    try:
        ids = row["input_ids"]
    except (KeyError, TypeError, IndexError):
        raise EllaError("a training example must be ella's Encoded or a row with input_ids (tokenized), got "
                        f"{type(row).__name__}") from None

    def as_list(value) -> list[int]:
        return value.tolist() if hasattr(value, "tolist") else list(value)

    ids = as_list(ids)
    labels = row.get("labels") if hasattr(row, "get") else None
    completion = row.get("completion_mask") if hasattr(row, "get") else None
    mask = row.get("attention_mask") if hasattr(row, "get") else None
    if labels is not None:
        labels = as_list(labels)
    elif completion is not None:
        labels = [token if keep else IGNORE_INDEX for token, keep in zip(ids, as_list(completion))]
    else:
        labels = list(ids)
    if mask is not None:
        keep = [bool(m) for m in as_list(mask)]
        if not seq2seq:  # causal labels are aligned with the inputs
            labels = [label for label, k in zip(labels, keep) if k]
        ids = [token for token, k in zip(ids, keep) if k]
    if seq2seq:
        while labels and labels[-1] == IGNORE_INDEX:  # the decoder side's padding
            labels.pop()
    return Encoded(ids, labels)


def task_data(examples: Iterable, tokenizer, model: torch.nn.Module, num_steps: int) -> TaskData:
    """The ``TaskData`` a method's ``prepare`` and ``finish`` read, built as ``ella run`` builds it.

    ``examples``: the task's training examples, as ella's ``Encoded`` items or tokenized rows (a
    ``datasets.Dataset``, a list of dicts) with ``input_ids`` and ``labels`` or ``completion_mask``; see
    ``as_encoded``. ``num_steps``: the optimiser steps the task will take (``trainer_steps`` computes a Trainer's;
    JumpLoRA schedules its ramp over them). The batches it yields are on the model's device."""
    seq2seq = is_seq2seq(model)
    items = [as_encoded(row, seq2seq) for row in examples]
    if tokenizer.pad_token_id is None:
        raise EllaError("the tokenizer has no pad token: set tokenizer.pad_token (e.g. to its EOS token)")
    device = next(model.parameters()).device
    return engine.task_data(items, num_steps, tokenizer, seq2seq, device)


def trainer_steps(num_examples: int, args: TrainingArguments) -> int:
    """The optimiser steps a ``Trainer`` takes over ``num_examples`` examples with ``args`` (as
    ``Trainer.set_initial_training_values`` counts them: per-process batches, the last step of an epoch may
    accumulate fewer micro-batches). ``ContinualCallback`` checks the count when the training starts."""
    if args.max_steps > 0:
        return args.max_steps
    world = max(1, args.world_size)
    batches = num_examples // args.per_device_train_batch_size if args.dataloader_drop_last \
        else math.ceil(num_examples / args.per_device_train_batch_size)
    batches = math.ceil(batches / world)  # accelerate's even batches: the processes share the global batches
    per_epoch = max(math.ceil(batches / args.gradient_accumulation_steps), 1)
    return math.ceil(args.num_train_epochs * per_epoch)


# ---------------------------------------------------------------- the hooks in a Trainer


class ContinualCallback(TrainerCallback):
    """Calls ``method.after_step(model)`` after every optimiser step of a ``Trainer`` and checks, when the
    training starts, that the Trainer takes the ``data.num_steps`` optimiser steps the method was prepared for.

    Alone, with a plain ``Trainer``, it runs no penalty and no ``after_backward``: a callback can change neither the
    loss nor the gradients before the clipping. ``ContinualTrainer`` (or ``continual(YourTrainer)``) adds both, and
    this callback, itself."""

    def __init__(self, method: ContinualMethod, data: TaskData | None = None):
        self.method, self.data = method, data
        self.with_trainer = False  # set by ContinualTrainer, which runs the penalty and after_backward

    def on_train_begin(self, args, state, control, **kwargs):
        if self.data is not None and state.max_steps != self.data.num_steps:
            raise EllaError(
                f"the Trainer will take {state.max_steps} optimiser steps, but {self.method.name} was prepared for "
                f"{self.data.num_steps} (TaskData.num_steps): build the task data with "
                "num_steps=ella.trainer_steps(len(train_dataset), args), after any filtering of the dataset")
        if not self.with_trainer:
            warnings.warn(f"ContinualCallback alone calls only {self.method.name}'s after_step: its penalty and "
                          "after_backward need ella.ContinualTrainer or ella.continual(YourTrainerClass)",
                          stacklevel=2)

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.method.after_step(model)  # the Trainer's model: the one prepare returned, without a DDP wrapper


class EpochOrderSampler(Sampler[int]):
    """The examples of each epoch in a given order: ``orders[epoch]`` (the Trainer sets the epoch)."""

    def __init__(self, orders: Sequence[Sequence[int]]):
        self.orders, self.epoch = [list(order) for order in orders], 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(self.orders[min(self.epoch, len(self.orders) - 1)])

    def __len__(self) -> int:
        return len(self.orders[min(self.epoch, len(self.orders) - 1)])


class ContinualTrainerMixin:
    """The part of the method that a callback cannot run; see ``continual``."""

    def __init__(self, *args, method: ContinualMethod, task_data: TaskData | None = None,
                 train_sampler: Sampler | None = None, **kwargs):
        self.ella_method = method
        self.ella_callback = ContinualCallback(method, task_data)
        self.ella_callback.with_trainer = True
        self.ella_train_sampler = train_sampler
        self.ella_steps = {"loss": [], "penalty": [], "learning_rate": []}  # one entry per optimiser step
        self._ella_step_loss = 0.0
        self._ella_penalty = 0.0
        callbacks = [*(kwargs.pop("callbacks", None) or []), self.ella_callback]
        super().__init__(*args, callbacks=callbacks, **kwargs)

    def _ella_loss_divisor(self, num_items_in_batch) -> int:
        """What ``Trainer.training_step`` will divide this micro-batch's loss by (its gradient-accumulation
        scaling), so that the penalty, multiplied by it, counts once per optimiser step."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) \
                or self.compute_loss_func is not None
        return 1 if scaled else self.current_gradient_accumulation_steps

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        if not (model.training and self.accelerator.sync_gradients):
            return result  # not the last micro-batch of an optimiser step, or an evaluation
        loss, outputs = result if return_outputs else (result, None)
        raw = self.accelerator.unwrap_model(model)
        with torch.autocast(next(raw.parameters()).device.type, enabled=False):
            penalty = self.ella_method.penalty(raw)
        self._ella_penalty = float(penalty.detach())
        if not math.isfinite(self._ella_penalty):
            raise engine.TrainingDiverged(
                f"{self.ella_method.name}'s penalty is {self._ella_penalty:g} at step {self.state.global_step + 1}: "
                "lower the penalty weight (or the learning rate) and start the task again")
        loss = loss + penalty * self._ella_loss_divisor(num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        with engine.training_dropout(engine.ProcessShare()):  # ella's dropout masks, as in ``ella run``
            step_loss = super().training_step(model, inputs, num_items_in_batch)
        self._ella_step_loss = self._ella_step_loss + step_loss.detach()  # on the device: no sync per micro-batch
        if self.accelerator.sync_gradients and model.training:  # the step's last micro-batch: before clipping
            self.ella_method.after_backward(self.accelerator.unwrap_model(model))
            self.ella_steps["loss"].append(float(self._ella_step_loss) - self._ella_penalty)
            self.ella_steps["penalty"].append(self._ella_penalty)
            self.ella_steps["learning_rate"].append(self.lr_scheduler.get_last_lr()[0])
            self._ella_step_loss = self._ella_penalty = 0.0
        return step_loss

    def get_train_dataloader(self) -> DataLoader:
        """With ``train_sampler``: the examples in its order, and a DataLoader with its own generator, so that
        iterating it draws nothing from the global random state (dropout masks then match ``ella run``'s)."""
        if self.ella_train_sampler is None:
            return super().get_train_dataloader()
        loader = DataLoader(self.train_dataset, batch_size=self.args.per_device_train_batch_size,
                            sampler=self.ella_train_sampler, collate_fn=self.data_collator,
                            num_workers=self.args.dataloader_num_workers,
                            pin_memory=self.args.dataloader_pin_memory and self.args.device.type != "cpu",
                            drop_last=self.args.dataloader_drop_last, generator=torch.Generator())
        return self.accelerator.prepare(loader)


_CONTINUAL_CLASSES: dict[type, type] = {}


def continual(trainer_class: type = Trainer) -> type:
    """``trainer_class`` (``Trainer`` or a subclass, e.g. TRL's ``SFTTrainer``) with an ella method in it: it takes
    ``method=`` (and optionally ``task_data=``, ``train_sampler=``) besides its own arguments, adds the method's
    penalty to the loss once per optimiser step, calls ``after_backward`` before the gradient clipping and (through
    ``ContinualCallback``) ``after_step`` after every optimiser step. Train a model that ``method.prepare``
    returned, then pass ``trainer.model`` to ``method.finish``."""
    if not (isinstance(trainer_class, type) and issubclass(trainer_class, Trainer)):
        raise EllaError(f"continual() takes a transformers.Trainer class, got {trainer_class!r}")
    if issubclass(trainer_class, ContinualTrainerMixin):
        return trainer_class
    if trainer_class not in _CONTINUAL_CLASSES:
        _CONTINUAL_CLASSES[trainer_class] = type(f"Continual{trainer_class.__name__}",
                                                 (ContinualTrainerMixin, trainer_class),
                                                 {"__module__": __name__, "__doc__": continual.__doc__})
    return _CONTINUAL_CLASSES[trainer_class]


ContinualTrainer = continual(Trainer)


# ---------------------------------------------------------------- ella's data in a Trainer


class EncodedDataset(Dataset):
    """ella's encoded examples as a map-style dataset of ``{"input_ids", "labels"}`` rows."""

    def __init__(self, items: list[Encoded]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        item = self.items[index]
        return {"input_ids": item.input_ids, "labels": item.labels}


def answer_collator(tokenizer, seq2seq: bool = False) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
    """ella's batches, as ``ella run`` trains on them: causal rows left-padded with their position ids (each row's
    first real token at position 0), encoder-decoder inputs right-padded; labels -100 off the answer."""

    def collate_rows(rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = collate([as_encoded(row, seq2seq) for row in rows], tokenizer.pad_token_id, seq2seq)
        if not seq2seq:
            batch["position_ids"] = positions(batch["attention_mask"])
        return batch

    return collate_rows


def training_arguments(training: engine.TrainingConfig, method: ContinualMethod, output_dir: str,
                       **overrides: Any) -> TrainingArguments:
    """``TrainingArguments`` that train as ``ella run`` does with ``training``: AdamW (``adamw_torch``) with its
    learning rate (or the method's default) and weight decay, a constant rate after a linear warm-up, its batch
    size, gradient accumulation, epochs, clipping, seed and precision; no checkpoints, no reports. The warm-up
    length is set per task by ``run_sequence_with_trainer(warmup_ratio=...)``: a Trainer rounds a fractional
    ``warmup_steps`` up, ``ella run`` rounds ``warmup_ratio × steps`` down. ``overrides`` go to TrainingArguments."""
    precision = engine.resolve_mixed_precision(training.mixed_precision)
    settings = dict(output_dir=output_dir, learning_rate=training.learning_rate or method.default_learning_rate,
                    per_device_train_batch_size=training.batch_size, gradient_accumulation_steps=training.grad_accum,
                    num_train_epochs=training.epochs, weight_decay=training.weight_decay,
                    max_grad_norm=training.max_grad_norm, seed=training.seed,
                    optim="adamw_torch", lr_scheduler_type="constant_with_warmup",
                    warmup_steps=training.warmup_ratio, bf16=precision == "bf16", fp16=precision == "fp16",
                    save_strategy="no", report_to="none", logging_strategy="no")
    settings.update(overrides)
    return TrainingArguments(**settings)


# ---------------------------------------------------------------- a whole sequence


@contextmanager
def _keep_random_state():
    """Undo what the block does to the global random state (a Trainer reseeds it when it is built)."""
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
              torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if states[3] is not None:
            torch.cuda.set_rng_state_all(states[3])


def _as_tasks(tasks: Sequence[Task | str]) -> list[Task]:
    return [task if isinstance(task, Task) else Task(str(task), [], []) for task in tasks]


def run_sequence_with_trainer(model, tokenizer, tasks: Sequence[Task | str], method: ContinualMethod,
                              args: TrainingArguments, *, train_datasets: Sequence | None = None,
                              data_collator: Callable | None = None, trainer_class: type = Trainer,
                              evaluation: engine.EvaluationConfig | None = None, max_length: int = 512,
                              warmup_ratio: float | None = None, **trainer_kwargs: Any):
    """Learn ``tasks`` in order with ``method``, each task trained by a new ``continual(trainer_class)`` with
    ``args``; returns ``(model, SequenceResult)``.

    Data: with ``train_datasets`` (one per task: any dataset the trainer takes, e.g. a tokenized
    ``datasets.Dataset`` with ``input_ids`` and ``labels``) and your ``data_collator``, the Trainer trains on them
    as it would without ella (its sampler, its loss); the method's ``TaskData`` is read from the same rows.
    ``tasks`` may then be bare names. Without ``train_datasets``, each ``Task``'s training examples are encoded as
    ``ella run`` encodes them (``max_length``), in ``ella run``'s order (a seeded shuffle per task and epoch) and
    batches (``answer_collator``), so that with ``training_arguments(...)`` and ``warmup_ratio`` the training is
    ``ella run``'s.

    The sequence is seeded once, with ``args.seed``, as ``ella run`` seeds it; the reseeding each task's Trainer
    does when it is built is undone, so the tasks draw one continuing random stream (LoRA initialisations, dropout).
    A method that trains on other examples than the task's own (Replay's buffer, MTL) gets them as
    ``{"input_ids", "labels"}`` rows, which your collator must take. ``warmup_ratio``: warm up each task over
    ``int(warmup_ratio × its steps)`` optimiser steps (``ella run``'s rounding) instead of ``args.warmup_steps``.
    ``evaluation``: evaluate every task (their ``test`` examples) before training and after each task, as
    ``run_sequence`` does (following ``evaluation.schedule``); without it the result has no matrix.
    ``trainer_kwargs`` go to every Trainer (e.g. ``processing_class``, ``eval_dataset``)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    tasks = _as_tasks(tasks)
    if not tasks:
        raise EllaError("the task sequence is empty")
    if train_datasets is not None and len(train_datasets) != len(tasks):
        raise EllaError(f"{len(train_datasets)} training datasets for {len(tasks)} tasks: give one per task")
    if evaluation is not None and not all(task.test for task in tasks):
        raise EllaError("evaluation needs every task's test examples: give ella Tasks with test examples")
    if train_datasets is None and not all(task.train for task in tasks):
        raise EllaError("without train_datasets every task needs its training examples (Task.train)")
    trainer_class = continual(trainer_class)
    set_seed(args.seed)
    precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "no"
    accelerator = Accelerator(mixed_precision=precision, cpu=args.use_cpu)
    model = model.to(accelerator.device)
    method.setup(model, tasks)
    seq2seq = is_seq2seq(model)
    encoders = [TaskEncoder(tokenizer, task, max_length, seq2seq) for task in tasks] \
        if train_datasets is None or evaluation is not None else None
    if train_datasets is None:
        sequence = [encoder.training(task.train) for task, encoder in zip(tasks, encoders)]
    else:
        sequence = [[as_encoded(row, seq2seq) for row in dataset] for dataset in train_datasets]
    result = engine.SequenceResult([task.name for task in tasks], (evaluation or engine.EvaluationConfig()).mode)
    started = time.perf_counter()
    if evaluation is not None and evaluation.zero_shot:
        scores = engine.evaluate_sequence(model, tokenizer, tasks, encoders, evaluation, accelerator, "zero-shot")
        result.zero_shot = [score.accuracy for score in scores]
    for t, task in enumerate(tasks):
        items = method.training_items(t, sequence)
        log = {"task": task.name, "examples": len(items)}
        if items:
            model, trained = _train_task(model, tokenizer, method, t, task, items, sequence[t], args, seq2seq,
                                         train_datasets[t] if train_datasets is not None else None,
                                         data_collator, trainer_class, warmup_ratio, trainer_kwargs)
            log.update(trained)
        else:  # e.g. the MTL upper bound, which learns every task at the first one
            log["optimizer_steps"] = 0
        result.task_logs.append(log)
        if evaluation is not None:
            eval_start = time.perf_counter()
            scores = engine.evaluate_after_task(model, tokenizer, tasks, encoders, evaluation, accelerator, t)
            result.eval_seconds.append(time.perf_counter() - eval_start)
            result.add_row(scores)
    result.seconds = time.perf_counter() - started
    return model, result


def _train_task(model, tokenizer, method, t, task, items, own_items, args, seq2seq, dataset, data_collator,
                trainer_class, warmup_ratio, trainer_kwargs):
    start = time.perf_counter()
    sampler, collator = None, data_collator
    if dataset is None:  # ella's examples, in ella run's order and batches
        dataset = EncodedDataset(items)
        collator = data_collator or answer_collator(tokenizer, seq2seq)
        config = engine.TrainingConfig(epochs=math.ceil(args.num_train_epochs),
                                       batch_size=args.per_device_train_batch_size,
                                       grad_accum=args.gradient_accumulation_steps, seed=args.seed)
        schedule = engine.training_schedule(len(items), config, t)
        per_epoch = len(schedule) // config.epochs
        sampler = EpochOrderSampler([[i for step in schedule[e * per_epoch:(e + 1) * per_epoch]
                                      for micro in step for i in micro] for e in range(config.epochs)])
    elif len(items) != len(own_items) or any(a is not b for a, b in zip(items, own_items)):
        dataset = EncodedDataset(items)  # the method trains on other examples than the task's own (Replay, MTL)
    num_steps = trainer_steps(len(dataset), args)
    data = task_data(items, tokenizer, model, num_steps)
    model = method.prepare(model, t, task, data)
    task_args = args
    if warmup_ratio is not None:
        task_args = copy.copy(args)
        task_args.warmup_steps = int(warmup_ratio * num_steps)
    with _keep_random_state():
        trainer = trainer_class(model=model, args=task_args, train_dataset=dataset, data_collator=collator,
                                method=method, task_data=data, train_sampler=sampler, **trainer_kwargs)
    trainer.train()
    steps = trainer.ella_steps
    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    trainer.accelerator.free_memory()  # drop the task's optimizer state
    del trainer
    trained = time.perf_counter()
    model = method.finish(model, t, task, data)
    return model, engine.task_summary(steps, start, trained, method)

"""The task loop: for each task the method prepares the model, the model trains on the task (task loss + the
method's penalty), the method closes the task, and every task of the sequence is evaluated, seen or not: one
row of the accuracy matrix (an evaluation schedule other than ``full`` evaluates only the task just learnt after
some tasks). A zero-shot row before any training is the reference of FWT.

accelerate places the model and batches on the device and runs mixed precision, so the same code runs on a CPU
or a GPU. Under ``accelerate launch`` (or ``torchrun``) the training is data-parallel: every process computes the
same global batches and trains on its share of each, so the training is the one a single process would run (to
float rounding; tested on two CPU processes, not yet on several GPUs), and the processes share the test examples.
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import json
import math
import os
import platform
import resource
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from importlib.metadata import version
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from tqdm.auto import tqdm
from transformers import get_constant_schedule_with_warmup

from . import checkpoint, metrics, provenance, zero_shot_cache
from .data import IGNORE_INDEX, Encoded, Task, TaskEncoder, collate
from .errors import EllaError
from .evaluation import EVAL_MODES, TaskScore, answer_token_nll, evaluate_task, scoring_description
from .methods import ContinualMethod, TaskData
from .models import frozen_weights_cast, is_seq2seq, training_attention

MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
EVAL_SCHEDULES = {
    "full": "every task after every task (N x N evaluations)",
    "diagonal": "after each task only that task, and every task after the last one",
    "every:K": "diagonal, and every task after every K-th task",
}


def schedule_period(schedule: str) -> int | None:
    """Every how many tasks the evaluation schedule evaluates every task: full 1, every:K K, diagonal None."""
    if schedule == "full":
        return 1
    if schedule == "diagonal":
        return None
    name, _, period = schedule.partition(":")
    if name == "every" and period.isdigit() and int(period) >= 1:
        return int(period)
    raise EllaError(f"evaluation schedule {schedule!r}: choose full, diagonal or every:K with K a whole number >= 1 "
                    "(e.g. every:5: every task after tasks 5, 10, ... and after the last)")


def evaluates_every_task(schedule: str, task_index: int, num_tasks: int) -> bool:
    """Whether the row after task ``task_index`` (0-based) is full; the last row always is (OA, BWT need it)."""
    period = schedule_period(schedule)
    return task_index == num_tasks - 1 or (period is not None and (task_index + 1) % period == 0)


@dataclass
class TrainingConfig:
    epochs: int = 1
    learning_rate: float | None = None  # None: the method's default (1e-3 for the LoRA methods)
    batch_size: int = 8  # examples per micro-batch, over all processes: the results do not depend on their number
    grad_accum: int = 1  # micro-batches per optimiser step
    max_length: int = 512  # tokens of prompt + answer: the input text is cut, and a free-text answer (a task
    # without labels) to max_length // 2 tokens; the instruction, options and label answers stay
    warmup_ratio: float = 0.1  # linear warm-up over this fraction of each task's steps, then constant
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 disables clipping
    seed: int = 42
    mixed_precision: str = "auto"  # bf16 where the hardware has it, else fp32
    # Padded tokens of one forward/backward pass per process. A micro-batch larger than this is cut into passes
    # of examples of similar length (less padding, bounded activations); the step's loss stays the same.
    tokens_per_pass: int = 512

    def __post_init__(self):
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
                    "tokens_per_pass": self.tokens_per_pass}
        for name, value in positive.items():
            if value < 1:
                raise EllaError(f"{name} must be at least 1 (got {value})")
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise EllaError(f"the learning rate must be positive (got {self.learning_rate})")
        if not 0 <= self.warmup_ratio < 1:
            raise EllaError(f"warmup_ratio must be in [0, 1) (got {self.warmup_ratio})")
        if self.mixed_precision not in MIXED_PRECISION:
            raise EllaError(f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}")


@dataclass
class EvaluationConfig:
    mode: str = "generate"  # see evaluation.EVAL_MODES
    batch_size: int = 8  # faster than 16 on 2 AVX2 cores for 150-token prompts, slower for 90 (results/speed.md)
    max_new_tokens: int | None = None  # None: the task's longest answer + 4
    zero_shot: bool = True  # evaluate before training: the reference of FWT
    schedule: str = "full"  # see EVAL_SCHEDULES; the zero-shot row is always full (FWT needs every task's)

    def __post_init__(self):
        schedule_period(self.schedule)
        if self.mode not in EVAL_MODES:
            raise EllaError(f"unknown evaluation mode {self.mode!r}: choose one of {', '.join(EVAL_MODES)}")
        if self.batch_size < 1:
            raise EllaError(f"the evaluation batch size must be at least 1 (got {self.batch_size})")


@dataclass
class SequenceResult:
    tasks: list[str]
    eval_mode: str
    zero_shot: list[float] | None = None
    matrix: list[list[float]] = field(default_factory=list)  # matrix[i][j]: accuracy on task j after task i
    task_logs: list[dict] = field(default_factory=list)  # one training log per task
    eval_seconds: list[float] = field(default_factory=list)
    seconds: float = 0.0  # wall time of the whole sequence so far, across resumptions
    final_predictions: list[list[str]] = field(default_factory=list)  # per task, after the last task
    task_metrics: dict[str, str] = field(default_factory=dict)  # task -> how its answers are scored
    # with validation samples: validation[i][j], the accuracy on task j's validation sample after task i, measured
    # where selection and validation BWT need it (row i: task i; the final row: every task), None elsewhere
    validation: list[list[float | None]] = field(default_factory=list)
    # example_scores[i][j]: the per-example scores behind matrix[i][j] (None where not measured), in the order of
    # the task's test examples: the same examples for every method at one seed, so differences can be bootstrapped
    example_scores: list[list[list[float] | None]] = field(default_factory=list)
    # task -> the run that measured its zero-shot accuracy, for the tasks whose accuracy a cache gave (see
    # ella.zero_shot_cache); empty when this run measured them all
    zero_shot_reused: dict[str, str | None] = field(default_factory=dict)

    @classmethod
    def from_record(cls, record: dict) -> "SequenceResult":
        """The result stored in a results.json (without the predictions)."""
        return cls(record["tasks"], record["evaluation"]["mode"], record["zero_shot"], record["accuracy_matrix"],
                   record["task_logs"], record["eval_seconds"], record["total_seconds"],
                   task_metrics={d["name"]: d["metric"] for d in record.get("task_details", [])},
                   validation=record.get("validation", {}).get("accuracy", []),
                   # records made before 0.5 have none
                   example_scores=record.get("example_scores") or [[None] * len(r) for r in record["accuracy_matrix"]],
                   zero_shot_reused=record.get("zero_shot_reused_from", {}))

    @classmethod
    def continued(cls, record: dict, tasks: list[Task], eval_mode: str) -> "SequenceResult":
        """A finished run's result extended to ``tasks`` (its own first): the cells it never measured, its rows'
        cells of the new tasks and their zero-shot accuracy, are None."""
        old = cls.from_record(record)
        pad = [None] * (len(tasks) - len(old.tasks))
        return cls([task.name for task in tasks], eval_mode, None if old.zero_shot is None else old.zero_shot + pad,
                   [row + pad for row in old.matrix], old.task_logs, old.eval_seconds, old.seconds,
                   task_metrics={task.name: task.metric for task in tasks},
                   example_scores=[row + pad for row in old.example_scores], zero_shot_reused=old.zero_shot_reused)

    @property
    def complete(self) -> bool:
        return len(self.matrix) == len(self.tasks)

    def metrics_cells(self) -> dict | None:
        """Over which cells the metrics are computed, for a matrix with unmeasured (None) cells: an evaluation
        schedule's rows that hold only the task just learnt, a continued run's earlier rows."""
        if not any(v is None for row in [self.zero_shot or [], *self.matrix] for v in row):
            return None
        n = len(self.tasks)
        with_zero_shot = sum(v is not None for v in self.zero_shot or [])
        measured_before_last = sum(row[j] is not None for i, row in enumerate(self.matrix[:-1]) for j in range(i + 1))
        return {"null cells": "not measured: under an evaluation schedule other than full, a row that is not full "
                              "holds only the task just learnt (a[i][i]); a continued run's earlier rows have none "
                              "for the tasks added later, and a task added by continuing has no zero-shot accuracy "
                              "(the base model is not evaluated again)",
                "OA": f"the final row, all {n} tasks (always measured)",
                "BWT": f"the first {n - 1} tasks: the final row minus each task's own a[j][j] (always measured)",
                "FWT": f"the {with_zero_shot} of {n} tasks with a zero-shot accuracy: a[j][j] - zero-shot[j]",
                "forgetting": f"the first {n - 1} tasks: the best measured a[i][j] with j <= i < {n - 1} (the "
                              f"{measured_before_last} measured cells on or below the diagonal before the final row) "
                              "minus the final row's a[N-1][j]"}

    def metrics(self) -> dict | None:
        return metrics.summarize(self.matrix, self.zero_shot) if self.complete else None

    def validation_metrics(self) -> dict | None:
        """OA and BWT on the validation samples (they read only the final row and the diagonal, both measured)."""
        if not (self.complete and self.validation):
            return None
        return {"OA": metrics.average_accuracy(self.validation), "BWT": metrics.backward_transfer(self.validation)}

    def add_row(self, scores: list[TaskScore | None]) -> None:
        """The row after the next task (None where a task was not evaluated); a full row's predictions are kept,
        so that the final row's are."""
        self.matrix.append([None if score is None else score.accuracy for score in scores])
        self.example_scores.append([None if score is None else score.example_scores for score in scores])
        if all(score is not None for score in scores):
            self.final_predictions = [score.predictions for score in scores]

    def to_dict(self) -> dict:
        validation = {"validation": {
            "accuracy": self.validation,
            "cells": "accuracy[i][j]: on task j's validation sample (examples of its training split outside its "
                     "training sample; task_details gives their number) after task i; measured for j = i and, after "
                     "the last task, for every j; null elsewhere. Apart from accuracy_matrix, which is on the test "
                     "examples",
            "metrics": self.validation_metrics()}} if self.validation else {}
        return {
            "tasks": self.tasks,
            "evaluation": {"mode": self.eval_mode,
                           "description": scoring_description(self.eval_mode, self.task_metrics)},
            "zero_shot": self.zero_shot,
            "accuracy_matrix": self.matrix,
            "metrics": self.metrics(),
            "fwt_reference": "zero-shot accuracy of the base model before any training",
            **({"zero_shot_reused_from": self.zero_shot_reused} if self.zero_shot_reused else {}),
            **({"metrics_cells": cells} if (cells := self.metrics_cells()) else {}),
            "task_logs": self.task_logs,
            "eval_seconds": self.eval_seconds,
            "total_seconds": self.seconds,
            **validation,
            "example_scores": self.example_scores,
        }


def resolve_mixed_precision(choice: str) -> str:
    if choice != "auto":
        return choice
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    cpu_has_bf16 = any(getattr(torch.cpu, probe, lambda: False)()
                       for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return "bf16" if cpu_has_bf16 else "no"


def make_accelerator(training: TrainingConfig) -> Accelerator:
    """Devices and mixed precision. Gradient accumulation is ella's own (``train_task``), not accelerate's."""
    return Accelerator(mixed_precision=resolve_mixed_precision(training.mixed_precision))


def task_data(items: list[Encoded], num_steps: int, tokenizer, seq2seq: bool, device) -> TaskData:
    def batches(batch_size: int = 1, limit: int | None = None):
        """The task's examples in order; batch size 1 (the default) means no padding at all."""
        chosen = items[:limit] if limit else items
        for start in range(0, len(chosen), batch_size):
            batch = collate(chosen[start:start + batch_size], tokenizer.pad_token_id, seq2seq)
            yield {key: value.to(device) for key, value in batch.items()}

    return TaskData(items, num_steps, batches)


def training_schedule(num_items: int, config: TrainingConfig, task_index: int) -> list[list[list[int]]]:
    """The task's optimiser steps, each a list of micro-batches of example indices: every epoch a seeded shuffle
    (the permutations of a ``DataLoader(shuffle=True)`` with this generator), cut into micro-batches of
    ``batch_size``, ``grad_accum`` of them per step (the last step of an epoch may have fewer).

    The batches are global: under data parallelism every process computes the same schedule and trains on its
    share of each micro-batch, so the training does not depend on the number of processes."""
    generator = torch.Generator().manual_seed(config.seed + task_index)
    steps = []
    for _ in range(config.epochs):
        # the draws of a DataLoader's epoch: its base seed, the permutation, a last (empty) one of RandomSampler
        torch.empty((), dtype=torch.int64).random_(generator=generator)
        order = torch.randperm(num_items, generator=generator).tolist()
        torch.randperm(num_items, generator=generator)
        micro = [order[i:i + config.batch_size] for i in range(0, num_items, config.batch_size)]
        steps += [micro[i:i + config.grad_accum] for i in range(0, len(micro), config.grad_accum)]
    return steps


def training_passes(indices: list[int], lengths: list[int], tokens_per_pass: int) -> list[list[int]]:
    """A micro-batch (example indices) as forward/backward passes of at most ``tokens_per_pass`` padded tokens each
    (one example at least): as it is when it fits, else longest first in runs of similar length, so that padding
    costs little. The passes' gradients add up to the micro-batch's (dropout draws its masks pass by pass)."""
    if len(indices) * max(lengths[i] for i in indices) <= tokens_per_pass:
        return [indices]
    passes = []
    for i in sorted(indices, key=lambda i: -lengths[i]):  # stable: equal lengths keep their order
        if passes and (len(passes[-1]) + 1) * lengths[passes[-1][0]] <= tokens_per_pass:
            passes[-1].append(i)
        else:
            passes.append([i])
    return passes


class ProcessShare:
    """This process's rows of a global pass: a contiguous slice, as even as possible. A process left without
    a row (a batch smaller than the number of processes) runs the batch's first row with weight 0, so that it still
    takes part in the gradient averaging. Without an accelerator: one process, all rows."""

    def __init__(self, accelerator: Accelerator | None = None):
        self.rank, self.processes = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
        self.rows, self.global_rows, self.weight = slice(0, 0), 0, 1.0

    def select(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        size = len(batch["input_ids"])
        start, end = (size * self.rank) // self.processes, (size * (self.rank + 1)) // self.processes
        self.global_rows, self.weight = size, 1.0 if end > start else 0.0
        self.rows = slice(start, end) if end > start else slice(0, 1)
        return {key: value[self.rows] for key, value in batch.items()}


def dropout_mask(shape: tuple[int, ...], p: float, dtype: torch.dtype, device) -> torch.Tensor:
    """Dropout's mask, 0 with probability ``p`` (rounded to a multiple of 1/65536) else 1 / (1 - p), drawn as
    16-bit random integers, four to each 64-bit draw of the device's generator: 4x faster on a CPU than torch's own
    dropout, whose Bernoulli draw costs about 15 ns an element and, on SmolLM2's LoRA, 6 % of a training step."""
    size = math.prod(shape)
    bits = torch.empty((size + 3) // 4, dtype=torch.int64, device=device).random_(-2 ** 63, 2 ** 63 - 1)
    kept = bits.view(torch.int16)[:size].view(shape) >= round(p * 65536) - 32768
    return kept.to(dtype).mul_(1 / (1 - p))


@contextmanager
def training_dropout(share: ProcessShare):
    """Dropout for the duration of a task's training: masks from ``dropout_mask``, and masks that do not depend
    on the number of processes.

    Under data parallelism ``torch.nn.functional.dropout`` draws the mask of the whole global batch, exactly as a
    single process would (the processes' random states are the same), and applies this process's rows of it; this
    covers ``nn.Dropout`` layers (LoRA's) and models that call it directly. Attention dropout inside the fused
    ``scaled_dot_product_attention`` kernel draws its own masks, so while training, an attention with dropout
    (T5's and GPT-2's, ``dropout_p > 0``) is computed by SDPA's reference formula, softmax(QKᵀ·scale + mask) →
    dropout → ·V, on any number of processes. Attention without dropout (LLaMA's, SmolLM2's) keeps the fused kernel."""
    real_dropout, real_attention = F.dropout, F.scaled_dot_product_attention

    def dropout(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False):
        if not training or p == 0 or p == 1:
            return real_dropout(input, p, training, inplace)
        if share.processes == 1:
            mask = dropout_mask(tuple(input.shape), p, input.dtype, input.device)
        elif input.shape[0] != share.rows.stop - share.rows.start:
            raise RuntimeError(f"a dropout input of shape {tuple(input.shape)} is not batch-first; ella's "
                               "data-parallel dropout needs the batch as the first dimension")
        else:
            global_shape = (share.global_rows, *input.shape[1:])
            mask = dropout_mask(global_shape, p, input.dtype, input.device)[share.rows]
        return input.mul_(mask) if inplace else input * mask

    def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if dropout_p == 0:
            return real_attention(query, key, value, attn_mask=attn_mask, dropout_p=0.0, is_causal=is_causal,
                                  scale=scale, enable_gqa=enable_gqa)
        if enable_gqa:
            key = key.repeat_interleave(query.shape[-3] // key.shape[-3], -3)
            value = value.repeat_interleave(query.shape[-3] // value.shape[-3], -3)
        scores = query @ key.transpose(-2, -1) * (query.shape[-1] ** -0.5 if scale is None else scale)
        if is_causal:
            causal = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
            scores = scores.masked_fill(~causal, float("-inf"))
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool \
                else scores + attn_mask
        # a query that may see no key (a left-padded causal row's padding) gets 0, as from the fused kernel, and
        # no NaN: softmax over a row of -inf would spread NaN to every row through the next layer's values
        blind = scores.isneginf().all(-1, keepdim=True)
        probabilities = torch.where(blind, 0.0, scores.masked_fill(blind, 0.0).softmax(-1))
        return F.dropout(probabilities, dropout_p, True) @ value

    F.dropout, F.scaled_dot_product_attention = dropout, attention
    try:
        yield
    finally:
        F.dropout, F.scaled_dot_product_attention = real_dropout, real_attention


def task_summary(curve: dict[str, list[float]], started: float, trained: float, method: ContinualMethod) -> dict:
    """A trained and closed task's log: the mean loss of its first and last tenth of steps, the mean penalty, the
    seconds spent training (from ``started`` to ``trained``) and closing it (``finish``, until now), every step's
    figures (``curve``) and the method's own report."""
    losses = curve["loss"]
    tenth = max(1, len(losses) // 10)
    return {"optimizer_steps": len(losses), "loss_start": sum(losses[:tenth]) / tenth,
            "loss_end": sum(losses[-tenth:]) / tenth, "penalty_mean": sum(curve["penalty"]) / max(1, len(losses)),
            "train_seconds": trained - started, "finish_seconds": time.perf_counter() - trained,
            "steps": curve, **method.report()}


class TrainingDiverged(EllaError):
    """A non-finite loss or penalty: the run stops; the tasks finished before stay saved."""


def train_task(model, method: ContinualMethod, task_index: int, task: Task, items: list[Encoded],
               tokenizer, accelerator: Accelerator, config: TrainingConfig, num_tasks: int):
    """Train one task under the method's hooks; returns the model after ``method.finish`` and a log.

    An optimiser step minimises the mean negative log-likelihood of the answer tokens of all its micro-batches
    and processes together (plus the method's penalty, once per step): the same step whatever the split into
    micro-batches (``grad_accum``) and processes."""
    log = {"task": task.name, "examples": len(items)}
    if not items:  # e.g. the MTL upper bound, which learns every task at the first one
        return model, {**log, "optimizer_steps": 0}
    start = time.perf_counter()
    seq2seq = is_seq2seq(model)
    schedule = training_schedule(len(items), config, task_index)
    data = task_data(items, len(schedule), tokenizer, seq2seq, accelerator.device)
    model = method.prepare(model, task_index, task, data)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise EllaError(f"method {method.name} left no trainable parameters for task {task.name}: its target "
                        "modules adapted nothing in this model; choose others with --target-modules")
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate or method.default_learning_rate,
                                  weight_decay=config.weight_decay)
    # Stepped once per optimiser step here: a scheduler prepared by accelerate steps once per process.
    scheduler = get_constant_schedule_with_warmup(optimizer, int(config.warmup_ratio * len(schedule)))
    model, optimizer = accelerator.prepare(model, optimizer)
    raw = accelerator.unwrap_model(model)  # what the method's hooks see: no DDP wrapper
    share = ProcessShare(accelerator)
    curve = {"loss": [], "penalty": [], "learning_rate": []}
    model.train()
    bar = tqdm(total=len(schedule), desc=f"train {task_index + 1}/{num_tasks} {task.name}",
               disable=not accelerator.is_local_main_process, leave=False)
    lengths = [len(item.input_ids) for item in items]
    with (training_dropout(share), frozen_weights_cast(raw, accelerator.mixed_precision, accelerator.device),
          training_attention(raw, accelerator.mixed_precision, accelerator.device)):
        for step, micro_batches in enumerate(schedule, 1):
            # every process takes its share of each pass, so a pass holds up to tokens_per_pass per process
            passes = [p for indices in micro_batches
                      for p in training_passes(indices, lengths, config.tokens_per_pass * share.processes)]
            batches = [collate([items[i] for i in indices], tokenizer.pad_token_id, seq2seq) for indices in passes]
            answer_tokens = sum(int((batch["labels"] != IGNORE_INDEX).sum()) for batch in batches)
            nll_sum = torch.zeros((), device=accelerator.device)
            for i, batch in enumerate(batches):
                last = i == len(batches) - 1
                local = {key: value.to(accelerator.device) for key, value in share.select(batch).items()}
                with accelerator.no_sync(model) if not last else nullcontext():
                    with accelerator.autocast():
                        nll, _ = answer_token_nll(model, local)
                        local_sum = nll.sum() * share.weight
                    # gradients are averaged over the processes: each contributes its sum / (all tokens / processes)
                    task_loss = local_sum / (answer_tokens / share.processes)
                    penalty = method.penalty(raw) if last else torch.zeros((), device=accelerator.device)
                    accelerator.backward(task_loss + penalty)
                nll_sum += local_sum.detach()
            loss = (accelerator.reduce(nll_sum, "sum") / answer_tokens).item()
            curve["loss"].append(loss)
            curve["penalty"].append(penalty.item())
            curve["learning_rate"].append(scheduler.get_last_lr()[0])
            if not (math.isfinite(loss) and math.isfinite(curve["penalty"][-1])):
                raise TrainingDiverged(
                    f"training diverged on task {task_index + 1} ({task.name}) at step {step} of {len(schedule)}: "
                    f"the loss is {loss:g} and the penalty {curve['penalty'][-1]:g}; the tasks finished before "
                    "stay saved. Lower the learning rate (or the penalty weight) and start again, or resume "
                    "after fixing the cause")
            method.after_backward(raw)
            if config.max_grad_norm > 0:
                accelerator.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            method.after_step(raw)
            bar.update()
            bar.set_postfix(loss=f"{loss:.3f}", penalty=f"{curve['penalty'][-1]:.3g}")
    bar.close()
    model = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    accelerator.free_memory()  # drop the task's optimizer state
    trained = time.perf_counter()
    model = method.finish(model, task_index, task, data)
    log.update(task_summary(curve, start, trained, method))
    return model, log


def evaluate_sequence(model, tokenizer, tasks: list[Task], encoders: list[TaskEncoder],
                      evaluation: EvaluationConfig, accelerator: Accelerator, label: str) -> list[TaskScore]:
    scores = [evaluate_task(model, tokenizer, task, encoder, evaluation.mode, evaluation.batch_size,
                            accelerator, evaluation.max_new_tokens, progress=f"eval {task.name}")
              for task, encoder in zip(tasks, encoders)]
    if accelerator.is_local_main_process:
        cells = "  ".join(f"{task.name} {score.accuracy:.1f}" for task, score in zip(tasks, scores))
        tqdm.write(f"{label}: {cells}")
    return scores


def zero_shot_row(model, tokenizer, tasks: list[Task], encoders: list[TaskEncoder], evaluation: EvaluationConfig,
                  accelerator: Accelerator, cache_dir: Path | None,
                  output_dir: Path | None) -> tuple[list[float], dict[str, str | None]]:
    """Every task's accuracy before training, and the tasks whose accuracy ``cache_dir`` gave, with the run that
    measured it (see ``ella.zero_shot_cache``: an accuracy measured earlier in the same conditions is read, the
    others are measured and kept there)."""
    found: list[dict | None] = [None] * len(tasks)
    keys: list[str] = []
    if cache_dir is not None and accelerator.is_main_process:
        settings = {"mode": evaluation.mode, "batch_size": evaluation.batch_size,
                    "max_new_tokens": evaluation.max_new_tokens, "mixed_precision": accelerator.mixed_precision,
                    "device": accelerator.device.type, "processes": accelerator.num_processes,
                    "hardware": provenance.hardware(accelerator.device), "versions": versions()}
        keys = zero_shot_cache.task_keys(model, tokenizer, tasks, encoders, settings)
        found = [zero_shot_cache.read(cache_dir, key) for key in keys]
    found = broadcast_object_list([found])[0]  # every process measures the same tasks
    missing = [j for j, entry in enumerate(found) if entry is None]
    scores = evaluate_sequence(model, tokenizer, [tasks[j] for j in missing], [encoders[j] for j in missing],
                               evaluation, accelerator, "zero-shot") if missing else []
    row = [None if entry is None else entry["accuracy"] for entry in found]
    for j, score in zip(missing, scores):
        row[j] = score.accuracy
        if cache_dir is not None and accelerator.is_main_process:
            zero_shot_cache.write(cache_dir, keys[j], tasks[j].name, score.accuracy,
                                  None if output_dir is None else provenance.portable_path(output_dir))
    reused = {tasks[j].name: entry["measured_in"] for j, entry in enumerate(found) if entry is not None}
    if reused and accelerator.is_local_main_process:
        by_source: dict[str | None, list[str]] = {}
        for j, entry in enumerate(found):
            if entry is not None:
                by_source.setdefault(entry["measured_in"], []).append(f"{tasks[j].name} {row[j]:.1f}")
        tqdm.write("zero-shot, measured in earlier runs: " + "; ".join(
            f"{'  '.join(cells)} (in {source or 'a run without an output directory'})"
            for source, cells in by_source.items()))
    return row, reused


def evaluate_validation(model, tokenizer, tasks: list[Task], encoders: list[TaskEncoder], evaluation: EvaluationConfig,
                        accelerator: Accelerator, t: int) -> list[float | None]:
    """Row ``t`` of the validation matrix: task t's own validation sample, and after the last task every task's (what
    validation OA and BWT read); None for the cells not measured."""
    measured = range(len(tasks)) if t == len(tasks) - 1 else [t]
    scores = evaluate_sequence(model, tokenizer, [replace(tasks[j], test=tasks[j].validation) for j in measured],
                               [encoders[j] for j in measured], evaluation, accelerator, f"validation after {t + 1}")
    row: list[float | None] = [None] * len(tasks)
    for j, score in zip(measured, scores):
        row[j] = score.accuracy
    return row


def evaluate_after_task(model, tokenizer, tasks: list[Task], encoders: list[TaskEncoder],
                        evaluation: EvaluationConfig, accelerator: Accelerator,
                        task_index: int) -> list[TaskScore | None]:
    """The scores after task ``task_index``: every task's, or on a row the schedule leaves partial only that
    task's (None for the others)."""
    label = f"after {task_index + 1} ({tasks[task_index].name})"
    if evaluates_every_task(evaluation.schedule, task_index, len(tasks)):
        return evaluate_sequence(model, tokenizer, tasks, encoders, evaluation, accelerator, label)
    [score] = evaluate_sequence(model, tokenizer, [tasks[task_index]], [encoders[task_index]], evaluation,
                                accelerator, label)
    return [score if j == task_index else None for j in range(len(tasks))]


def run_sequence(model, tokenizer, tasks: list[Task], method: ContinualMethod,
                 training: TrainingConfig | None = None, evaluation: EvaluationConfig | None = None,
                 output_dir: str | Path | None = None, run_info: dict | None = None,
                 accelerator: Accelerator | None = None, resume: bool = False, overwrite: bool = False,
                 previous=None, zero_shot_cache_dir: str | Path | None = None):
    """Learn ``tasks`` in order with ``method``; returns ``(model, SequenceResult)``, the model None where
    ``resume`` finds the run finished already (a finished run keeps no model unless saved: ``ella run --save-model``).

    With ``output_dir``, every finished task is committed there (see ``ella.checkpoint``), so a crash loses at
    most the task in progress. A directory that already holds a run is refused unless ``resume=True`` (continue it
    from its last finished task, with the same settings: it ends exactly as the uninterrupted run) or
    ``overwrite=True`` (replace it). ``run_info`` is stored in results.json as given.

    ``previous`` (an ``ella.continuation.PreviousRun``) continues a finished run: ``tasks`` start with its tasks,
    ``model`` is its saved model; its rows are kept, and training goes on at the first new task.

    ``zero_shot_cache_dir``: zero-shot accuracies measured by earlier runs in the same conditions are read there
    instead of measured again, and the ones this run measures are kept there (see ``ella.zero_shot_cache``).
    """
    training, evaluation = training or TrainingConfig(), evaluation or EvaluationConfig()
    if not tasks:
        raise EllaError("the task sequence is empty")
    if len({bool(task.validation) for task in tasks}) > 1 or (previous is not None and tasks[0].validation):
        raise EllaError("validation samples: give every task one or none, and none in a continued run (its earlier "
                        "tasks have no validation row)")
    output_dir = Path(output_dir) if output_dir is not None else None
    started = time.perf_counter()
    set_seed(training.seed)
    accelerator = accelerator or make_accelerator(training)
    # "auto" recorded as what it resolved to on this machine, so that a run resumed on a machine that resolves it
    # otherwise (bf16 where the first had fp32) is refused rather than continued in another precision
    training = replace(training, mixed_precision=accelerator.mixed_precision)
    if output_dir is not None:
        checkpoint.claim_output_dir(output_dir, resume, overwrite, remove_files=accelerator.is_main_process)
        accelerator.wait_for_everyone()
    reset_peak_memory()
    model = model.to(accelerator.device)
    method.setup(model, tasks)
    seq2seq = is_seq2seq(model)
    encoders = [TaskEncoder(tokenizer, task, training.max_length, seq2seq) for task in tasks]
    sequence = [encoder.training(task.train) for task, encoder in zip(tasks, encoders)]
    header = {"run": run_info or {}, **run_settings(model, tasks, method, training, evaluation),
              "mixed_precision": accelerator.mixed_precision, "device": str(accelerator.device),
              "processes": accelerator.num_processes,
              "hardware": provenance.hardware(accelerator.device)}  # of the latest segment, if resumed elsewhere
    saved = None
    if resume and output_dir is not None:
        if accelerator.is_main_process:
            checkpoint.finish_interrupted_save(output_dir)
        accelerator.wait_for_everyone()
        saved = checkpoint.read_run(output_dir, header)
    if saved is not None:
        result = SequenceResult.from_record(saved.record)
        if result.complete:  # not the model given, which is not the trained one
            model = None
        else:
            model = saved.load_model(model)
            try:
                method.load_state_dict(saved.method_state())
            except (KeyError, RuntimeError, ValueError) as e:
                raise EllaError(f"the method state in {saved.directory} does not fit {method.name} on this model "
                                f"({e}); resume with the settings the run was made with") from None
            if accelerator.is_local_main_process:
                tqdm.write(f"resuming {output_dir} after task {len(result.matrix)} of {len(tasks)}")
    elif previous is not None:  # a finished run learning more tasks: its model, method state and RNG state
        learnt = previous.record["tasks"]
        if [task.name for task in tasks[:len(learnt)]] != learnt or len(tasks) <= len(learnt):
            raise EllaError(f"a continued run's tasks are the earlier run's ({', '.join(learnt)}), then new ones; "
                            f"got {', '.join(task.name for task in tasks)}")
        previous.check_evaluation(asdict(evaluation))
        model = previous.restore(model, method)
        result = SequenceResult.continued(previous.record, tasks, evaluation.mode)
        if accelerator.is_local_main_process:
            tqdm.write(f"continuing {previous.path} after its {len(learnt)} tasks: {len(tasks) - len(learnt)} more")
    else:
        result = SequenceResult([task.name for task in tasks], evaluation.mode,
                                task_metrics={task.name: task.metric for task in tasks})
        if evaluation.zero_shot:
            result.zero_shot, result.zero_shot_reused = zero_shot_row(
                model, tokenizer, tasks, encoders, evaluation, accelerator,
                None if zero_shot_cache_dir is None else Path(zero_shot_cache_dir), output_dir)
    for t in range(len(result.matrix), len(tasks)):
        task = tasks[t]
        items = method.training_items(t, sequence)
        model, log = train_task(model, method, t, task, items, tokenizer, accelerator, training, len(tasks))
        result.task_logs.append(log)
        eval_start = time.perf_counter()
        scores = evaluate_after_task(model, tokenizer, tasks, encoders, evaluation, accelerator, t)
        if task.validation:
            result.validation.append(evaluate_validation(model, tokenizer, tasks, encoders, evaluation, accelerator, t))
        result.eval_seconds.append(time.perf_counter() - eval_start)
        result.add_row(scores)
        result.seconds += time.perf_counter() - started
        started = time.perf_counter()
        if output_dir is not None and accelerator.is_main_process:
            save_progress(output_dir, result, method, header, model, tasks)
    return model, result


def run_settings(model: torch.nn.Module, tasks: list[Task], method: ContinualMethod, training: TrainingConfig,
                 evaluation: EvaluationConfig) -> dict:
    """The settings a resumed run must share with the run it continues (``checkpoint.RESUME_KEYS``); ``method``
    set up on ``model``."""
    return {"tasks": [task.name for task in tasks], "method": method.describe(), "model": model_identity(model),
            "training_config": asdict(training), "evaluation_config": asdict(evaluation),
            "task_details": [task.describe() for task in tasks]}


def model_identity(model: torch.nn.Module) -> dict:
    """What a resumed run must share with the model it was started with: its type and every weight's name and
    shape (as a digest)."""
    shapes = "\n".join(f"{name} {tuple(p.shape)}" for name, p in model.state_dict().items())
    return {"type": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters()),
            "weights_sha256": hashlib.sha256(shapes.encode()).hexdigest()[:16]}


def save_progress(output_dir: Path, result: SequenceResult, method: ContinualMethod, header: dict,
                  model: torch.nn.Module, tasks: list[Task]) -> None:
    """Commit the run after its latest task (``checkpoint.commit``): the record, the method's state, and the model
    to resume from, or, once complete, the last row's predictions."""
    state = method.state_dict()
    predictions = None
    if result.complete:
        predictions = [json.dumps({"task": task.name, "input": example.input, "target": example.output,
                                   "prediction": prediction})
                       for task, row in zip(tasks, result.final_predictions)
                       for example, prediction in zip(task.test, row)]
    record = {**header, **result.to_dict(), "status": "complete" if result.complete else "running",
              "tasks_done": len(result.matrix), "method_state_bytes": sum(v.nbytes for v in state.values()),
              "peak_memory": peak_memory(), "versions": versions()}
    checkpoint.commit(output_dir, record, state, None if result.complete else model, predictions)


def reset_peak_memory() -> None:
    """Start the peak-memory count at this run, so that runs in one process (calls of the API) do not inherit each
    other's peaks. On Linux, writing 5 to /proc/self/clear_refs resets the process's peak RSS; first, the memory that
    earlier runs freed goes back to the system (glibc keeps freed memory otherwise, and it would count here)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to trim
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # elsewhere the figure stays the process's peak, and peak_memory() says so


def peak_memory() -> dict:
    if torch.cuda.is_available():
        return {"device": "cuda", "bytes": torch.cuda.max_memory_allocated()}
    where = "cpu (peak RSS of this run)" if os.path.exists("/proc/self/clear_refs") else "cpu (process peak RSS)"
    return {"device": where, "bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def versions() -> dict:
    from . import __version__  # the source's own: an editable install's metadata keeps the version it was installed at
    return {"python": platform.python_version(), "ella": __version__,
            **{package: version(package) for package in ("torch", "transformers", "peft", "accelerate")}}

"""The task loop: for each task the method prepares the model, the model trains on the task (task loss + the
method's penalty), the method closes the task, and every task of the sequence is evaluated, seen or not: one
row of the accuracy matrix. A zero-shot row before any training is the reference of FWT.

accelerate places the model and batches on the device and runs mixed precision, so the same code runs on a CPU
or a GPU. Under ``accelerate launch`` the training is data-parallel and the processes share the test examples
(tried on two CPU processes, not yet on several GPUs).
"""

from __future__ import annotations

import ctypes
import gc
import json
import math
import os
import platform
import resource
import time
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_constant_schedule_with_warmup

from . import checkpoint, metrics
from .data import Encoded, Task, TaskEncoder, collate
from .errors import EllaError
from .evaluation import EVAL_MODES, TaskScore, answer_token_nll, evaluate_task
from .methods import ContinualMethod, TaskData
from .models import is_seq2seq

MIXED_PRECISION = ("auto", "no", "bf16", "fp16")


@dataclass
class TrainingConfig:
    epochs: int = 1
    learning_rate: float | None = None  # None: the method's default (1e-3 for the LoRA methods)
    batch_size: int = 8
    grad_accum: int = 1  # micro-batches per optimiser step
    max_length: int = 512  # tokens of prompt + answer; only the input text is truncated
    warmup_ratio: float = 0.1  # linear warm-up over this fraction of each task's steps, then constant
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 disables clipping
    seed: int = 42
    mixed_precision: str = "auto"  # bf16 where the hardware has it, else fp32

    def __post_init__(self):
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "grad_accum": self.grad_accum}
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
    batch_size: int = 16
    max_new_tokens: int | None = None  # None: the task's longest answer + 4
    zero_shot: bool = True  # evaluate before training: the reference of FWT

    def __post_init__(self):
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

    @classmethod
    def from_record(cls, record: dict) -> "SequenceResult":
        """The result stored in a results.json (without the predictions)."""
        return cls(record["tasks"], record["evaluation"]["mode"], record["zero_shot"], record["accuracy_matrix"],
                   record["task_logs"], record["eval_seconds"], record["total_seconds"])

    @property
    def complete(self) -> bool:
        return len(self.matrix) == len(self.tasks)

    def metrics(self) -> dict | None:
        return metrics.summarize(self.matrix, self.zero_shot) if self.complete else None

    def to_dict(self) -> dict:
        return {
            "tasks": self.tasks,
            "evaluation": {"mode": self.eval_mode, "description": EVAL_MODES[self.eval_mode]},
            "zero_shot": self.zero_shot,
            "accuracy_matrix": self.matrix,
            "metrics": self.metrics(),
            "fwt_reference": "zero-shot accuracy of the base model before any training",
            "task_logs": self.task_logs,
            "eval_seconds": self.eval_seconds,
            "total_seconds": self.seconds,
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
    return Accelerator(mixed_precision=resolve_mixed_precision(training.mixed_precision),
                       gradient_accumulation_steps=training.grad_accum)


def task_data(items: list[Encoded], num_steps: int, tokenizer, seq2seq: bool, device) -> TaskData:
    def batches(batch_size: int = 1, limit: int | None = None):
        """The task's examples in order; batch size 1 (the default) means no padding at all."""
        chosen = items[:limit] if limit else items
        for start in range(0, len(chosen), batch_size):
            batch = collate(chosen[start:start + batch_size], tokenizer.pad_token_id, seq2seq)
            yield {key: value.to(device) for key, value in batch.items()}

    return TaskData(items, num_steps, batches)


def train_task(model, method: ContinualMethod, task_index: int, task: Task, items: list[Encoded],
               tokenizer, accelerator: Accelerator, config: TrainingConfig, num_tasks: int):
    """Train one task under the method's hooks; returns the model after ``method.finish`` and a log."""
    log = {"task": task.name, "examples": len(items)}
    if not items:  # e.g. the MTL upper bound, which learns every task at the first one
        return model, {**log, "optimizer_steps": 0}
    start = time.perf_counter()
    seq2seq = is_seq2seq(model)
    per_process = math.ceil(len(items) / (config.batch_size * accelerator.num_processes))
    steps = math.ceil(per_process / config.grad_accum) * config.epochs
    data = task_data(items, steps, tokenizer, seq2seq, accelerator.device)
    model = method.prepare(model, task_index, task, data)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError(f"method {method.name} left no trainable parameters for task {task.name}")
    loader = DataLoader(items, batch_size=config.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(config.seed + task_index),
                        collate_fn=lambda batch: collate(batch, tokenizer.pad_token_id, seq2seq))
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate or method.default_learning_rate,
                                  weight_decay=config.weight_decay)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    scheduler = accelerator.prepare(get_constant_schedule_with_warmup(optimizer, int(config.warmup_ratio * steps)))
    raw = accelerator.unwrap_model(model)  # what the method's hooks see: no DDP wrapper
    losses, penalties = [], []
    model.train()
    bar = tqdm(total=len(loader) * config.epochs, desc=f"train {task_index + 1}/{num_tasks} {task.name}",
               disable=not accelerator.is_local_main_process, leave=False)
    for _ in range(config.epochs):
        for batch in loader:
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    nll, mask = answer_token_nll(model, batch)
                    task_loss = nll.sum() / mask.sum()
                penalty = method.penalty(raw)
                accelerator.backward(task_loss + penalty)
                method.after_backward(raw)
                if accelerator.sync_gradients and config.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
                if accelerator.sync_gradients:
                    method.after_step(raw)
            losses.append(task_loss.item())
            penalties.append(penalty.item())
            bar.update()
            bar.set_postfix(loss=f"{losses[-1]:.3f}", penalty=f"{penalties[-1]:.3g}")
    bar.close()
    model = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    accelerator.free_memory()  # drop the task's optimizer state
    trained = time.perf_counter()
    model = method.finish(model, task_index, task, data)
    tenth = max(1, len(losses) // 10)
    log.update({"optimizer_steps": steps, "loss_start": sum(losses[:tenth]) / tenth,
                "loss_end": sum(losses[-tenth:]) / tenth, "penalty_mean": sum(penalties) / len(penalties),
                "train_seconds": trained - start, "finish_seconds": time.perf_counter() - trained,
                **method.report()})
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


def run_sequence(model, tokenizer, tasks: list[Task], method: ContinualMethod,
                 training: TrainingConfig | None = None, evaluation: EvaluationConfig | None = None,
                 output_dir: str | Path | None = None, run_info: dict | None = None,
                 accelerator: Accelerator | None = None, resume: bool = False):
    """Learn ``tasks`` in order with ``method``; returns ``(model, SequenceResult)``.

    With ``output_dir``, results.json, the method's state and a checkpoint are written after every task (see
    ``ella.checkpoint``), so a crash loses at most the task in progress; ``resume=True`` continues such a run from
    its last finished task (with the same settings). ``run_info`` is stored in results.json as given.
    """
    training, evaluation = training or TrainingConfig(), evaluation or EvaluationConfig()
    if not tasks:
        raise EllaError("the task sequence is empty")
    output_dir = Path(output_dir) if output_dir is not None else None
    started = time.perf_counter()
    set_seed(training.seed)
    accelerator = accelerator or make_accelerator(training)
    reset_peak_memory()
    model = model.to(accelerator.device)
    method.setup(model, tasks)
    seq2seq = is_seq2seq(model)
    encoders = [TaskEncoder(tokenizer, task, training.max_length, seq2seq) for task in tasks]
    sequence = [encoder.training(task.train) for task, encoder in zip(tasks, encoders)]
    header = {"run": run_info or {}, "tasks": [task.name for task in tasks], "method": method.describe(),
              "training_config": asdict(training), "evaluation_config": asdict(evaluation),
              "mixed_precision": accelerator.mixed_precision, "device": str(accelerator.device),
              "processes": accelerator.num_processes,
              "task_details": [task.describe() for task in tasks]}
    record = checkpoint.read_run(output_dir, header) if resume and output_dir is not None else None
    if record is not None and record["tasks_done"] > 0:
        result = SequenceResult.from_record(record)
        if not result.complete:
            model = checkpoint.load_checkpoint(output_dir, model)
            if (output_dir / checkpoint.METHOD_STATE).is_file():
                method.load_state_dict(load_file(output_dir / checkpoint.METHOD_STATE))
            if accelerator.is_local_main_process:
                tqdm.write(f"resuming {output_dir} after task {len(result.matrix)} of {len(tasks)}")
    else:
        result = SequenceResult([task.name for task in tasks], evaluation.mode)
        if evaluation.zero_shot:
            scores = evaluate_sequence(model, tokenizer, tasks, encoders, evaluation, accelerator, "zero-shot")
            result.zero_shot = [score.accuracy for score in scores]
    for t in range(len(result.matrix), len(tasks)):
        task = tasks[t]
        items = method.training_items(t, sequence)
        model, log = train_task(model, method, t, task, items, tokenizer, accelerator, training, len(tasks))
        result.task_logs.append(log)
        eval_start = time.perf_counter()
        scores = evaluate_sequence(model, tokenizer, tasks, encoders, evaluation, accelerator,
                                   f"after {t + 1} ({task.name})")
        result.eval_seconds.append(time.perf_counter() - eval_start)
        result.matrix.append([score.accuracy for score in scores])
        result.final_predictions = [score.predictions for score in scores]
        result.seconds += time.perf_counter() - started
        started = time.perf_counter()
        if output_dir is not None and accelerator.is_main_process:
            save_progress(output_dir, result, method, header, model, tasks)
    return model, result


def save_progress(output_dir: Path, result: SequenceResult, method: ContinualMethod, header: dict,
                  model: torch.nn.Module, tasks: list[Task]) -> None:
    """results.json, the method's state, and the checkpoint (or, once complete, the last row's predictions)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    state = method.state_dict()
    if state:
        checkpoint.write_method_state(output_dir / checkpoint.METHOD_STATE, state,
                                      {"method": method.name, "tasks_done": str(len(result.matrix))})
    if result.complete:
        lines = [json.dumps({"task": task.name, "input": example.input, "target": example.output,
                             "prediction": prediction})
                 for task, predictions in zip(tasks, result.final_predictions)
                 for example, prediction in zip(task.test, predictions)]
        checkpoint.atomic_write(output_dir / checkpoint.PREDICTIONS,
                                lambda path: path.write_text("\n".join(lines) + "\n"))
    else:
        checkpoint.save_checkpoint(output_dir, model)
    record = {**header, **result.to_dict(), "status": "complete" if result.complete else "running",
              "tasks_done": len(result.matrix), "method_state_bytes": sum(v.nbytes for v in state.values()),
              "peak_memory": peak_memory(), "versions": versions()}
    checkpoint.write_json(output_dir / checkpoint.RESULTS, record)  # last: it marks the task as done
    if result.complete:
        checkpoint.finish_run(output_dir)


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
    return {"python": platform.python_version(),
            **{package: version(package) for package in ("ella", "torch", "transformers", "peft", "accelerate")}}

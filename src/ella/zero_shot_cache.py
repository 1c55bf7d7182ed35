"""Zero-shot accuracies measured once and reused: every run of a suite at one seed (every method, setting and order)
evaluates the same base model on the same test examples before training, so ``ella bench`` keeps each task's
zero-shot accuracy in a cache directory, and a later run reads it there instead of measuring it again.

An entry is keyed by a fingerprint of everything the accuracy depends on: the value of every weight of the base
model (methods adapt the model only when their first task starts, after the zero-shot row), the model's type and
configuration, the task's test prompts, answers and label options as token ids, its metric, the evaluation settings
(mode, batch size, generation length), the precision, device, hardware and library versions. Anything different
measures the accuracy anew.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from .data import Task, TaskEncoder


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def model_digest(model: torch.nn.Module) -> str:
    """sha256 over every weight's name, dtype, shape and bytes, and the model's type and configuration."""
    h = hashlib.sha256(type(model).__name__.encode())
    config = getattr(model, "config", None)
    if config is not None:  # where it was loaded from is no part of what it computes
        h.update(_digest({k: v for k, v in config.to_dict().items() if k != "_name_or_path"}).encode())
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name} {flat.dtype} {tuple(tensor.shape)}\n".encode())
        h.update(memoryview(flat.view(torch.uint8).numpy()))
    return h.hexdigest()


def task_keys(model: torch.nn.Module, tokenizer, tasks: list[Task], encoders: list[TaskEncoder],
              settings: dict) -> list[str]:
    """One key per task: the model's digest, ``settings`` (evaluation, precision, hardware, versions) and the
    task's test set as the model sees it."""
    shared = {"model": model_digest(model), "tokenizer": [type(tokenizer).__name__, len(tokenizer),
                                                          tokenizer.eos_token_id, tokenizer.pad_token_id],
              **settings}
    return [_digest({**shared, "task": task.name, "metric": task.metric,
                     "prompts": [item.input_ids for item in encoder.generation(task.test)],
                     "answers": [example.output for example in task.test],
                     "options": [encoder.target_ids(label) for label in task.labels or []],
                     "longest_answer": encoder.longest_target})
            for task, encoder in zip(tasks, encoders)]


def read(cache_dir: Path, key: str) -> dict | None:
    """The entry for ``key`` ({"task", "accuracy", "measured_in"}), or None (none yet, or unreadable: it is
    measured again and rewritten)."""
    try:
        entry = json.loads((cache_dir / f"{key}.json").read_text())
        return entry if isinstance(entry.get("accuracy"), (int, float)) else None
    except (OSError, ValueError, AttributeError):
        return None


def write(cache_dir: Path, key: str, task: str, accuracy: float, measured_in: str | None) -> None:
    """Keep an entry (written whole, then renamed: a crash leaves the old one or none). Not checkpoint.replace_file:
    its one ``.partial`` name per file would be shared by two runs of ``ella bench --jobs`` measuring the same task
    at once, so each process writes beside the entry under a name of its own."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"{key}.json"
    partial = path.with_suffix(f".{os.getpid()}.partial")
    partial.write_text(json.dumps({"task": task, "accuracy": accuracy, "measured_in": measured_in}))
    os.replace(partial, path)

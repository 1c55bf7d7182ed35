"""What a run writes to its output directory after every task, and how an interrupted run resumes.

    results.json                 settings, the accuracy matrix so far, metrics, logs, versions
    method_state.safetensors     the method's state (ELLA: W_past), when it keeps one
    checkpoint/                  while the run is unfinished: the model's weights, any live LoRA adapter's config,
                                 the random-number state; deleted when the last task is done
    predictions.jsonl            at the end: the last row's predictions

Every file is written beside its final name and renamed into place, so a crash never leaves a half-written file.
Resuming restores the model, the method's state and the random-number state after the last finished task: the
resumed run continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from peft import PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, load_model, save_file, save_model

from .errors import EllaError

RESULTS = "results.json"
METHOD_STATE = "method_state.safetensors"
CHECKPOINT = "checkpoint"
PREDICTIONS = "predictions.jsonl"
RESUME_KEYS = ("tasks", "task_details", "method", "training_config", "evaluation_config")  # must match to resume


def atomic_write(path: Path, write) -> None:
    """``write(partial_path)``, then rename the partial file or directory into ``path``."""
    partial = path.with_name(path.name + ".partial")
    if partial.is_dir():
        shutil.rmtree(partial)
    write(partial)
    if path.is_dir():
        shutil.rmtree(path)
    os.replace(partial, path)


def write_json(path: Path, record: dict) -> None:
    atomic_write(path, lambda partial: partial.write_text(json.dumps(record, indent=2)))


def write_method_state(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    tensors = {key: value.detach().cpu().contiguous() for key, value in state.items()}
    atomic_write(path, lambda partial: save_file(tensors, partial, metadata))


def save_checkpoint(output_dir: Path, model: torch.nn.Module) -> None:
    """The model's weights (any live LoRA adapter included, with its config) and the random-number state."""

    def write(directory: Path) -> None:
        directory.mkdir()
        save_model(model, directory / "model.safetensors")  # handles tied weights
        if isinstance(model, PeftModel):
            for name, config in model.peft_config.items():
                config.save_pretrained(directory / "adapters" / name)
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng.update({f"cuda{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
        save_file(rng, directory / "rng.safetensors")

    atomic_write(output_dir / CHECKPOINT, write)


def load_checkpoint(output_dir: Path, model: torch.nn.Module) -> torch.nn.Module:
    """The model as it was saved (re-wrapped with its live adapters), with the random-number state restored."""
    directory = output_dir / CHECKPOINT
    if not (directory / "model.safetensors").is_file():
        raise EllaError(f"{output_dir} holds an unfinished run without its checkpoint; start it again with "
                        "--overwrite")
    adapters = sorted((directory / "adapters").iterdir()) if (directory / "adapters").is_dir() else []
    for adapter in adapters:
        config = PeftConfig.from_pretrained(adapter)
        if isinstance(model, PeftModel):
            model.add_adapter(adapter.name, config)
        else:
            model = get_peft_model(model, config, adapter_name=adapter.name)
    load_model(model, directory / "model.safetensors", device=str(next(model.parameters()).device))
    rng = load_file(directory / "rng.safetensors")
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([rng[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in rng])
    return model


def read_run(output_dir: Path, header: dict) -> dict | None:
    """The run recorded in ``output_dir``, checked to have the same settings as ``header``; None if there is none."""
    path = output_dir / RESULTS
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EllaError(f"{path} is not valid JSON ({e.msg}); start the run again with --overwrite") from None
    expected = json.loads(json.dumps(header))
    different = [key for key in RESUME_KEYS if record.get(key) != expected.get(key)]
    if different:
        raise EllaError(f"the run in {output_dir} was made with other settings ({', '.join(different)} differ); "
                        "resume it with the same options, or choose another --output-dir, or pass --overwrite")
    return record


def run_status(output_dir: Path) -> str | None:
    """'complete', 'running' (interrupted or in progress), or None when ``output_dir`` holds no run."""
    try:
        return json.loads((output_dir / RESULTS).read_text()).get("status")
    except (OSError, ValueError):
        return None


def finish_run(output_dir: Path) -> None:
    shutil.rmtree(output_dir / CHECKPOINT, ignore_errors=True)

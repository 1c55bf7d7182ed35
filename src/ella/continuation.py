"""Runs that keep learning: a finished run learns more tasks later (``ella run --continue RUN --tasks ...``).

``--save-model`` writes OUTPUT_DIR/model/, a Hugging Face model directory with what continuing needs beside it::

    config.json, model.safetensors,     the final model with its adapters merged:
    tokenizer files, ...                 AutoModelForCausalLM (or Seq2SeqLM).from_pretrained(OUTPUT_DIR/model)
    ella_run.json                        the run's final record (its results.json): method and hyper-parameters,
                                         the tasks learnt and where they came from, the accuracy matrix; and
                                         sequence_files, where the sequence files lie on this machine (one
                                         per part of task_sources; results.json records them portably)
    method_state.safetensors             the method's state (ELLA's W_past, O-LoRA's A's, EWC's Fisher, the buffer)
    rng.safetensors                      the random-number state at the end of the run
    live_adapters.safetensors            methods whose LoRA is never merged (seqlora, ewc, replay): the adapted
    live_adapters/<name>/adapter_config.json  layers unmerged (their base weights and the LoRA factors)

Continuing (``PreviousRun``) reads that directory alone, or a finished run directory's model/: it loads the model
(the adapted layers of a live LoRA exactly as they were, not un-merged), the method with its hyper-parameters and
state, and the random-number state, rebuilds the earlier tasks from the recorded sources (benchmark and task names,
or the sequence file, with their sample sizes and seed) to evaluate them again, and the engine goes on at task
index N (the number of tasks learnt), so a run of N tasks continued with M more ends exactly as one run of the
N + M tasks with the same settings (rows, method state, weights); but for InfLoRA, whose threshold τ_t depends on
the sequence's length T, which its first N tasks took to be N. What cannot be known is left null: the earlier
rows' cells of the new tasks and the new tasks' zero-shot accuracy (the base model is not evaluated again).
"""

from __future__ import annotations

import json
import numbers
import shutil
from pathlib import Path

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file

from .checkpoint import (METHOD_STATE, RNG, attach_adapters, holds_run, read_json, read_method_state, run_status,
                         set_rng_state)
from .data import Task, load_cl_benchmark, load_task_sequence
from .errors import EllaError
from .methods import method_fields
from .methods.base import resolve_parts
from .models import save_model

RUN_RECORD = "ella_run.json"  # not results.json: `ella report` collects those, and this is a copy
LIVE_WEIGHTS = "live_adapters.safetensors"
LIVE_ADAPTERS = "live_adapters"


def tuner_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of every adapted layer (peft's tuner layers): base weights and adapter factors, unmerged."""
    return {f"{name}.{key}": value for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)
            for key, value in module.state_dict().items()}


def save_run_model(model: torch.nn.Module, tokenizer, directory: str | Path, record: dict,
                   method_state: dict[str, torch.Tensor], rng: dict[str, torch.Tensor]) -> Path:
    """``--save-model``: the merged model (``from_pretrained`` loads it) and what continuing needs, written beside
    and renamed into place, so that ``directory`` is either complete or absent."""
    directory = Path(directory)
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    if isinstance(model, PeftModel):  # a live adapter (SeqLoRA's): kept unmerged, before save_model merges it
        tensors = {key: value.detach().cpu().contiguous() for key, value in tuner_state(model).items()}
        save_file(tensors, partial / LIVE_WEIGHTS)
        for name, config in model.peft_config.items():
            config.save_pretrained(partial / LIVE_ADAPTERS / name)
    save_model(model, tokenizer, partial)
    if method_state:
        save_file({key: value.detach().cpu().contiguous() for key, value in method_state.items()},
                  partial / METHOD_STATE)
    save_file(rng, partial / RNG)
    (partial / RUN_RECORD).write_text(json.dumps(record, indent=2))
    if directory.exists():
        shutil.rmtree(directory)
    partial.rename(directory)
    return directory


def _number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


class PreviousRun:
    """A finished run to continue, read from a directory written by ``--save-model`` (or the run directory that
    holds it as model/)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.model_dir = self._find(self.path)
        self.record = read_json(self.model_dir / RUN_RECORD)
        if self.record.get("status") != "complete":
            raise EllaError(f"{self.model_dir / RUN_RECORD} is not the record of a finished run; save the model of a "
                            "finished run with --save-model")
        self.tasks_done = len(self.record["tasks"])
        needs = [RNG] + ([METHOD_STATE] if self.record.get("method_state_bytes") else [])
        missing = [name for name in needs if not (self.model_dir / name).is_file()]
        if missing:
            raise EllaError(f"{self.model_dir} lacks {', '.join(missing)}: not a complete --save-model directory, so "
                            "the run cannot be continued exactly; save it again with --save-model")

    @staticmethod
    def _find(path: Path) -> Path:
        if (path / RUN_RECORD).is_file():
            return path
        if holds_run(path):
            if run_status(path) != "complete":
                raise EllaError(f"the run in {path} is unfinished: finish it first with the options it was started "
                                f"with and --output-dir {path} --resume, then continue it")
            if not (path / "model" / RUN_RECORD).is_file():
                raise EllaError(f"the run in {path} kept no model to continue from (it ran without --save-model, or "
                                "with an ella that did not save what continuing needs); run it again with "
                                "--save-model (--overwrite replaces it)")
            return path / "model"
        if (path / "config.json").is_file():
            raise EllaError(f"{path} is a model directory without an ella run to continue ({RUN_RECORD}); to learn "
                            f"tasks starting from this model, pass it as --model {path}")
        raise EllaError(f"{path} holds no finished ella run: name a run directory that was run with --save-model, "
                        "or its model/ directory")

    @property
    def info(self) -> dict:
        return self.record["run"]

    def method_settings(self, name: str | None, given: dict) -> tuple[str, dict]:
        """The method's name and hyper-parameters: the continued run's. Those given must agree; a per-task list
        (ELLA's λ) may be extended to the new tasks, its first values being the earlier tasks'."""
        recorded = self.record["method"]
        old_name, n = recorded["name"], self.tasks_done
        if name is not None and name != old_name:
            raise EllaError(f"the run in {self.path} learnt with method {old_name}, and a continued run keeps its "
                            f"method: leave out --method (got {name})")
        if "mtl" in resolve_parts(old_name)[0]:
            raise EllaError(f"{old_name} is the multi-task upper bound (every task's data at the first task), not a "
                            "continual method: it cannot be continued with more tasks")
        fields = method_fields(old_name)
        values = {key: recorded[key] for key in fields if key in recorded}
        for key, value in given.items():
            flag = "--" + key.replace("_", "-")
            if key not in fields:
                raise EllaError(f"{flag} is not a hyper-parameter of {old_name}, the continued run's method (it has: "
                                f"{', '.join('--' + k.replace('_', '-') for k in sorted(fields)) or 'none'})")
            old = values.get(key)
            per_task = isinstance(value, list) and len(value) > n and all(map(_number, value)) and (
                (_number(old) and all(v == old for v in value[:n]))
                or (isinstance(old, list) and value[:n] == old))
            if not per_task and json.loads(json.dumps(value)) != old:
                raise EllaError(f"{flag} {value}: the continued run used {old}, and a continued run keeps the method's "
                                f"hyper-parameters; leave out {flag}" + (
                                    f" (a per-task list may be extended: its first {n} values are the earlier tasks')"
                                    if _number(old) or isinstance(old, list) else ""))
            values[key] = value
        for key, value in values.items():
            if key not in given and isinstance(value, list) and len(value) == n and all(map(_number, value)):
                raise EllaError(f"the continued run used one --{key.replace('_', '-')} per task ({value}); give one "
                                "per task of the whole sequence, the earlier tasks' first")
        return old_name, values

    def tasks(self, data_dir: str | None) -> list[Task]:
        """The continued run's tasks, rebuilt from their recorded sources and checked against their record."""
        tasks = []
        for source, file in zip(self.task_sources(), self.sequence_files()):
            sample = dict(train_per_task=source["train_per_task"], test_per_task=source["test_per_task"],
                          seed=source["seed"])
            if source.get("sequence"):
                if not Path(file).is_file():
                    raise EllaError(f"the continued run's tasks {', '.join(source['tasks'])} came from the sequence "
                                    f"file {file}, which is not found from here: put it back there (a relative "
                                    "path is from the directory that run was started in, continue from there)")
                loaded = load_task_sequence(file, **sample)
            else:
                loaded = load_cl_benchmark(source["benchmark"], None, source["tasks"], data_dir, **sample)
            if [task.name for task in loaded] != source["tasks"]:
                raise EllaError(f"{source['sequence']} now lists the tasks {', '.join(t.name for t in loaded)}, not "
                                f"{', '.join(source['tasks'])} as when the continued run learnt them")
            tasks += loaded
        recorded = self.record.get("task_details", [])
        for task, details in zip(tasks, recorded):
            if json.loads(json.dumps(task.describe())) != details:
                raise EllaError(f"task {task.name} of the continued run cannot be rebuilt as it was learnt (now "
                                f"{task.describe()}, then {details}): its data changed, or --data-dir points elsewhere")
        return tasks

    def task_sources(self) -> list[dict]:
        """Where the tasks came from, one entry per part of the sequence (a continued run has several)."""
        info = self.info
        if "task_sources" in info:
            return info["task_sources"]
        return [{"benchmark": info.get("benchmark"), "sequence": None if info.get("benchmark") else info["tasks_from"],
                 "tasks": self.record["tasks"], "seed": info["seed"], "train_per_task": info.get("train_per_task"),
                 "test_per_task": info.get("test_per_task")}]

    def sequence_files(self) -> list[str | None]:
        """Where each part's sequence file lies on this machine (None for benchmark tasks): as the saved model
        records it, or (saved by ella 0.3) the recorded path, as that run was given it."""
        return self.record.get("sequence_files") or [source["sequence"] for source in self.task_sources()]

    def check_evaluation(self, evaluation_config: dict) -> None:
        """The earlier rows must be comparable with the new ones: the same scoring."""
        recorded = self.record.get("evaluation_config", {})
        for key, flag in (("mode", "--eval-mode"), ("max_new_tokens", "--max-new-tokens")):
            if key in recorded and recorded[key] != evaluation_config[key]:
                how = f"{flag} {recorded[key]}" if recorded[key] is not None else f"no {flag}"
                raise EllaError(f"the continued run was evaluated with {key} {recorded[key]}, this one would be with "
                                f"{evaluation_config[key]}: continue it with {how}, so that its rows and the new ones "
                                "are comparable")

    def restore(self, model: torch.nn.Module, method) -> torch.nn.Module:
        """The model with its live adapters, the method's state, and then the random-number state of the run's end."""
        model = self._attach_live_adapters(model)
        path = self.model_dir / METHOD_STATE
        try:
            method.load_state_dict(read_method_state(path))
        except (KeyError, RuntimeError, ValueError) as e:
            raise EllaError(f"the method state in {path} does not fit {method.name} on this model ({e})") from None
        set_rng_state(load_file(self.model_dir / RNG))
        return model

    def _attach_live_adapters(self, model: torch.nn.Module) -> torch.nn.Module:
        if not (self.model_dir / LIVE_ADAPTERS).is_dir():
            return model
        model = attach_adapters(model, self.model_dir / LIVE_ADAPTERS)
        saved = load_file(self.model_dir / LIVE_WEIGHTS)
        expected = tuner_state(model)
        wrong = sorted(set(saved) ^ set(expected)) + sorted(
            key for key in set(saved) & set(expected) if saved[key].shape != expected[key].shape)
        if wrong:
            raise EllaError(f"the live adapter saved in {self.model_dir} does not fit its model ({len(wrong)} "
                            f"tensor(s), e.g. {wrong[0]}); save the run again with --save-model")
        model.load_state_dict(saved, strict=False)
        return model

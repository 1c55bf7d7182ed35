"""What a run writes to its output directory, and how an interrupted run resumes.

    results.json                 settings, the accuracy matrix so far, metrics, logs, versions (a copy of the
                                 newest commit's record, for readers and reports)
    progress/after-task-<n>/     the commit of the n-th finished task, while the run is unfinished:
        results.json             the record after task n
        method_state.safetensors the method's state (ELLA: W_past), when it keeps one
        model.safetensors        the model's weights; adapters/ the live LoRA adapters' configs
        rng.safetensors          the random-number state
    method_state.safetensors     at the end: the method's state after the last task
    predictions.jsonl            at the end: the last row's predictions

**One commit point per task.** Everything of task n is written into ``progress/after-task-<n>.partial``, each
file flushed to disk, and that directory is renamed to ``after-task-<n>``: that one atomic rename is the commit.
Only then is the top-level results.json replaced (write beside, rename) and the older commit removed; at the end
the final files are copied out and ``progress/`` removed. Every file of a commit carries its task count ``n``.

Resuming reads the newest commit and checks that its files agree on ``n`` and that the top-level record is not
ahead of it; half-written ``.partial`` directories are discarded. So a kill at any instant (between two writes,
inside one, during a rename) leaves either the previous commit or the new one, never a mix: the resumed run ends
exactly as the uninterrupted run, and a finished task is never lost to a newer copy that was half written. A
state that does not fit this protocol is refused with a message, never continued.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from peft import PeftConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model

from .errors import EllaError

RESULTS = "results.json"
METHOD_STATE = "method_state.safetensors"
PREDICTIONS = "predictions.jsonl"
PROGRESS = "progress"
MODEL = "model.safetensors"
RNG = "rng.safetensors"
RUN_FILES = (RESULTS, METHOD_STATE, PREDICTIONS, PROGRESS, "accuracy_matrix.png", "model",
             "checkpoint")  # what --overwrite removes ("checkpoint": where ella before 0.2 kept its progress)
RESUME_KEYS = ("tasks", "task_details", "method", "model", "training_config", "evaluation_config")  # must match
# Settings added to a section of RESUME_KEYS after runs were recorded without them, with the value those runs had:
# such a run resumes (and `ella bench` skips it when complete) as long as the setting keeps that value.
ADDED_SETTINGS = {"evaluation_config": {"schedule": "full"}}
COMMIT = re.compile(r"after-task-(\d+)")


class SaveError(EllaError):
    """The run's progress could not be written (disk full, permissions); what was committed before is intact."""


# The file-system operations of a save, in one place: each is one step of the commit protocol (the tests inject a
# crash before and after every one of them).

def write_file(path: Path, write) -> None:
    """``write(path)``, then flush the file to disk."""
    write(path)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def rename(source: Path, target: Path) -> None:
    """Atomic: ``target`` is either the old or the new entry, whatever the instant of a crash."""
    os.replace(source, target)
    sync_directory(target.parent)


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def sync_directory(path: Path) -> None:
    """Flush a directory's entries (a rename inside it) to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def replace_file(path: Path, write) -> None:
    """Write ``path`` beside its final name, then rename it into place: never half written."""
    partial = path.with_name(path.name + ".partial")
    write_file(partial, write)
    rename(partial, path)


def json_writer(record: dict):
    return lambda path: path.write_text(json.dumps(record, indent=2))


def commit_dir(output_dir: Path, tasks_done: int) -> Path:
    return output_dir / PROGRESS / f"after-task-{tasks_done}"


def commit(output_dir: Path, record: dict, method_state: dict[str, torch.Tensor], model: torch.nn.Module | None,
           predictions: list[str] | None) -> None:
    """Commit the run after ``record["tasks_done"]`` tasks (see the module's docstring). ``model`` is kept while the
    run is unfinished (to resume from); ``predictions`` (the last row's) come with the final commit."""
    tasks_done = record["tasks_done"]
    target = commit_dir(output_dir, tasks_done)
    partial = target.with_name(target.name + ".partial")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove(partial)  # the remains of a save that was interrupted
        partial.mkdir()
        metadata = {"tasks_done": str(tasks_done)}
        if method_state:
            tensors = {key: value.detach().cpu().contiguous() for key, value in method_state.items()}
            write_file(partial / METHOD_STATE, lambda path: save_file(tensors, path, metadata))
        if model is not None:
            save_model_state(partial, model, metadata)
        if predictions is not None:
            write_file(partial / PREDICTIONS, lambda path: path.write_text("\n".join(predictions) + "\n"))
        write_file(partial / RESULTS, json_writer(record))
        sync_directory(partial)
        if target.exists():
            raise EllaError(f"{target} exists already: another process is writing this run")
        rename(partial, target)  # the commit
        publish(output_dir, target, record)
    except OSError as e:
        shutil.rmtree(partial, ignore_errors=True)
        done = tasks_done - 1
        raise SaveError(f"could not save task {tasks_done} to {output_dir}: {e.strerror or e}. The run stopped; "
                        + (f"its first {done} task(s) are saved intact: free space or fix the permissions, then "
                           "resume with --resume (resume=True)" if done else "nothing was saved yet")) from e


def publish(output_dir: Path, target: Path, record: dict) -> None:
    """After the commit: the top-level copies, then the older commits go (all of it repeatable on resume)."""
    if record["status"] == "complete":
        for name in (METHOD_STATE, PREDICTIONS):
            if (target / name).is_file():
                replace_file(output_dir / name, lambda path, source=target / name: shutil.copyfile(source, path))
    replace_file(output_dir / RESULTS, json_writer(record))
    for entry in sorted((output_dir / PROGRESS).iterdir()):
        if entry != target:
            remove(entry)
    if record["status"] == "complete":
        remove(output_dir / PROGRESS)


def save_model_state(directory: Path, model: torch.nn.Module, metadata: dict[str, str]) -> None:
    """The model's weights (any live LoRA adapter included, with its config) and the random-number state."""
    write_file(directory / MODEL, lambda path: save_model(model, path, metadata))  # handles tied weights
    if isinstance(model, PeftModel):
        for name, config in model.peft_config.items():
            write_file(directory / "adapters" / name / "adapter_config.json",
                       lambda path, config=config: config.save_pretrained(path.parent))
    write_file(directory / RNG, lambda path: save_file(rng_state(), path, metadata))


def rng_state() -> dict[str, torch.Tensor]:
    """The random-number state of the CPU and of every GPU."""
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
    return rng


def set_rng_state(rng: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([rng[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in rng])


def attach_adapters(model: torch.nn.Module, folder: Path) -> torch.nn.Module:
    """The model wrapped with the peft adapters whose configs ``folder`` holds (one sub-folder each), if any."""
    for adapter in sorted(folder.iterdir()) if folder.is_dir() else []:
        config = PeftConfig.from_pretrained(adapter)
        if isinstance(model, PeftModel):
            model.add_adapter(adapter.name, config)
        else:
            model = get_peft_model(model, config, adapter_name=adapter.name)
    return model


def read_method_state(path: Path) -> dict[str, torch.Tensor]:
    """A saved method state ({} where none was saved), as copies: a tensor read by safetensors can start off the
    allocator's alignment, where a small matmul or a sum may round differently from the same values in memory of
    their own (as in the uninterrupted run)."""
    return {key: value.clone() for key, value in load_file(path).items()} if path.is_file() else {}


def tasks_done_in(path: Path) -> int | None:
    """The task count a safetensors file of a commit carries."""
    with safe_open(path, "pt") as f:
        value = (f.metadata() or {}).get("tasks_done")
    return int(value) if value is not None else None


class SavedRun:
    """The newest committed state of a run directory, checked for consistency."""

    def __init__(self, record: dict, directory: Path | None):
        self.record, self.directory = record, directory  # directory: None for a finished run (nothing to load)

    def load_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model as committed (re-wrapped with its live adapters), with the random-number state restored."""
        directory = self.directory
        model = attach_adapters(model, directory / "adapters")
        try:
            load_model(model, directory / MODEL, device=str(next(model.parameters()).device))
        except RuntimeError as e:
            raise EllaError(f"the checkpoint in {directory} does not fit this model ({str(e).splitlines()[0]}); "
                            "resume with the model the run was made with") from None
        set_rng_state(load_file(directory / RNG))
        return model

    def method_state(self) -> dict[str, torch.Tensor]:
        return read_method_state(self.directory / METHOD_STATE)


def commits(output_dir: Path) -> list[tuple[int, Path]]:
    """The committed task counts in ``progress/`` (not the ``.partial`` ones), oldest first."""
    progress = output_dir / PROGRESS
    if not progress.is_dir():
        return []
    found = [(int(m.group(1)), entry) for entry in progress.iterdir() if (m := COMMIT.fullmatch(entry.name))]
    return sorted(found)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EllaError(f"{path} cannot be read ({e}); the run cannot be resumed: start it again with "
                        "--overwrite") from None


def finish_interrupted_save(output_dir: Path) -> None:
    """Discard a commit that was being written when the run stopped, and publish again a final commit whose
    publication was interrupted. One process does this before any process reads the run."""
    progress = output_dir / PROGRESS
    for leftover in progress.glob("*.partial") if progress.is_dir() else []:
        remove(leftover)
    saved = commits(output_dir)
    if saved:
        record = read_json(saved[-1][1] / RESULTS)
        if record.get("status") == "complete":
            publish(output_dir, saved[-1][1], record)


def read_run(output_dir: Path, header: dict) -> SavedRun | None:
    """The run saved in ``output_dir`` (after ``finish_interrupted_save``), checked to be consistent and to have
    the settings of ``header``; None if the directory holds no committed task."""
    top_path, saved = output_dir / RESULTS, commits(output_dir)
    top = read_json(top_path) if top_path.is_file() else None
    if saved:
        tasks_done, directory = saved[-1]
        run = SavedRun(read_json(directory / RESULTS), directory)
        check_commit(run, tasks_done, top)
    elif top is not None and top.get("status") == "complete":
        run = SavedRun(top, None)
    elif top is not None and top.get("tasks_done", 0) > 0:
        raise EllaError(f"{output_dir} holds an unfinished run without its saved progress ({PROGRESS}/ is missing; "
                        "ella before 0.2 kept it in checkpoint/); start it again with --overwrite")
    else:
        return None
    check_settings(output_dir, run.record, header)
    return run


def check_commit(run: SavedRun, tasks_done: int, top: dict | None) -> None:
    """Every file of the commit carries the same task count, and the top-level record is not ahead of it."""
    counts = {"its directory name": tasks_done, RESULTS: run.record.get("tasks_done")}
    for name in (METHOD_STATE, MODEL, RNG):
        if (run.directory / name).is_file():
            counts[name] = tasks_done_in(run.directory / name)
    if run.record.get("status") != "complete" and not (run.directory / MODEL).is_file():
        counts[MODEL] = "missing"
    if top is not None and top.get("tasks_done", 0) > tasks_done:
        counts[f"the top-level {RESULTS}"] = top["tasks_done"]
    if len(set(counts.values())) > 1:
        found = ", ".join(f"{name}: {count}" for name, count in counts.items())
        raise EllaError(f"the saved state in {run.directory} is inconsistent (task counts: {found}), so the run "
                        "cannot be resumed exactly; start it again with --overwrite")


def check_settings(output_dir: Path, record: dict, header: dict) -> None:
    """The settings of ``RESUME_KEYS`` must match (those a run made by an older ella did not record are skipped, or
    taken at the value of ``ADDED_SETTINGS``)."""
    expected = json.loads(json.dumps(header))
    if "training_config" in record:
        record = {**record, "training_config": recorded_training_config(record)}
    recorded = {key: {**ADDED_SETTINGS[key], **record[key]} if key in ADDED_SETTINGS else record[key]
                for key in RESUME_KEYS if key in record}
    different = [_difference(key, value, expected.get(key)) for key, value in recorded.items()
                 if value != expected.get(key)]
    if different:
        raise EllaError(f"the run in {output_dir} was made with other settings ({'; '.join(different)}); "
                        "resume it with the same options, or choose another --output-dir, or pass --overwrite")


def recorded_training_config(record: dict) -> dict:
    """The run's training settings, its precision as what it computed in (ella <= 0.5 recorded the choice, "auto",
    and what that resolved to beside it)."""
    config = record.get("training_config", {})
    if config.get("mixed_precision") == "auto":
        return {**config, "mixed_precision": record.get("mixed_precision")}
    return config


def _difference(key: str, recorded, expected) -> str:
    """'key differ', with the options that differ where the section is one of options (the run's configs)."""
    if key.endswith("_config") and isinstance(recorded, dict) and isinstance(expected, dict):
        options = [f"{name} {recorded.get(name)!r} then, {expected.get(name)!r} now"
                   for name in sorted(recorded.keys() | expected.keys()) if recorded.get(name) != expected.get(name)]
        return f"{key} differ: {', '.join(options)}"
    return f"{key} differ"


def holds_run(output_dir: Path) -> bool:
    return (output_dir / RESULTS).exists() or (output_dir / PROGRESS).exists()


def latest_record(output_dir: Path) -> dict | None:
    """The record of the run's latest commit, or its top-level results.json where it has no commit; None where
    that is missing or unreadable."""
    saved = commits(output_dir)
    try:
        return json.loads(((saved[-1][1] if saved else output_dir) / RESULTS).read_text())
    except (OSError, ValueError):
        return None


def run_status(output_dir: Path) -> str | None:
    """'complete', 'running' (interrupted or in progress), or None when ``output_dir`` holds no run."""
    record = latest_record(output_dir)
    if record is None:  # a run stopped in its first task, or in its first save, has progress/ and nothing more
        return "running" if (output_dir / PROGRESS).exists() else None
    return record.get("status")


def check_output_dir(output_dir: Path, resume: bool = False, overwrite: bool = False) -> None:
    """Refuse a directory that holds a run unless ``resume`` or ``overwrite``; refuse one that cannot be written."""
    if resume and overwrite:
        raise EllaError("resume continues the run in the output directory, overwrite replaces it: choose one")
    if output_dir.exists() and not output_dir.is_dir():
        raise EllaError(f"the output directory {output_dir} is a file, not a directory")
    if holds_run(output_dir) and not (resume or overwrite):
        raise EllaError(f"{output_dir} already holds a run ({RESULTS} or {PROGRESS}/); continue it with --resume "
                        "(resume=True), replace it with --overwrite (overwrite=True), or choose another output "
                        "directory")
    probe = output_dir / f".ella-write-test-{os.getpid()}"  # one per process: they may probe at once
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe.write_text("ella checks that it can write here")
        probe.unlink()
    except OSError as e:
        raise EllaError(f"cannot write to the output directory {output_dir} ({e.strerror or e}); fix its "
                        "permissions or choose another output directory") from None


def claim_output_dir(output_dir: Path, resume: bool = False, overwrite: bool = False, remove_files: bool = True):
    """``check_output_dir``, then with ``overwrite`` the earlier run's files go (removed by one process only:
    ``remove_files``); other files in the directory stay."""
    check_output_dir(output_dir, resume, overwrite)
    if overwrite and remove_files:
        for name in RUN_FILES:
            remove(output_dir / name)

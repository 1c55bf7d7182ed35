"""A run stopped at any instant resumes to exactly the uninterrupted run, or is refused; never a mixed state.

The crash tests record the output directory as a kill would leave it before and after every file-system operation
of every per-task save (and in the middle of every file write), resume from each of those states, and compare the
end with the uninterrupted run: the accuracy matrix, the method state's bytes and the final model.
"""

import hashlib
import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file, save_file

from ella import EllaError, EvaluationConfig, TrainingConfig, get_method, run_sequence
from ella import checkpoint, engine
from ella.models import tiny_model
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import toy_tasks, with_crash_in_second_task

SETTINGS = dict(training=TrainingConfig(batch_size=4, learning_rate=1e-2, mixed_precision="no"),
                evaluation=EvaluationConfig(mode="rank"))
METHODS = {"ella": dict(lam=10.0), "seqlora": {}, "replay": dict(buffer_size=4)}  # W_past, a live adapter, data


def weights(model) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in model.state_dict().items()}


def tree_digest(directory: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(directory.rglob("*")):
        digest.update(str(path.relative_to(directory)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


class DiskStates:
    """Wraps the save's file-system operations to copy the output directory as a kill would leave it: before and
    after each operation, and with each file half written."""

    def __init__(self, output_dir: Path, store: Path, monkeypatch):
        self.output_dir, self.store, self.states, self.seen, self.instants = output_dir, store, [], set(), []
        for name in ("write_file", "rename", "remove"):
            real = getattr(checkpoint, name)
            monkeypatch.setattr(checkpoint, name, self.recorded(name, real))

    def snapshot(self, label: str, half_written: Path | None = None) -> None:
        self.instants.append(label)
        target = self.store / f"{len(self.states):03d}"
        shutil.copytree(self.output_dir, target)
        if half_written is not None:
            copy = target / half_written.relative_to(self.output_dir)
            copy.write_bytes(copy.read_bytes()[: copy.stat().st_size // 2])
        digest = tree_digest(target)
        if digest in self.seen:  # the same disk state as an earlier instant
            shutil.rmtree(target)
            return
        self.seen.add(digest)
        self.states.append((label, target))

    def recorded(self, name, real):
        def operation(path, *args):
            what = f"{name} {(args[0] if name == 'rename' else path).name}"
            self.snapshot(f"before {what}")
            real(path, *args)
            if name == "write_file":
                self.snapshot(f"inside {what}", half_written=path)
            self.snapshot(f"after {what}")
        return operation


def run(method_name: str, output_dir: Path, **options):
    model, tokenizer = tiny_model()
    return run_sequence(model, tokenizer, toy_tasks(8, 4), get_method(method_name, **METHODS[method_name]),
                        output_dir=output_dir, **{**SETTINGS, **options})


@pytest.mark.slow
@pytest.mark.parametrize("method_name", sorted(METHODS))
def test_a_kill_at_any_write_or_rename_resumes_to_the_uninterrupted_run(tmp_path, monkeypatch, method_name):
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        recorder = DiskStates(out, tmp_path / "states", patch)
        expected_model, expected = run(method_name, out)
        expected_model = weights(expected_model)
    expected_state = (out / checkpoint.METHOD_STATE).read_bytes() if method_name != "seqlora" else None
    labels = recorder.instants
    for instant in ("inside write_file model.safetensors", "inside write_file results.json",
                    "before rename after-task-1", "after rename after-task-1", "after rename after-task-2",
                    "after rename results.json", "before remove after-task-1", "after remove progress"):
        assert instant in labels, instant  # the instants of both saves were recorded

    real_train_task, calls = engine.train_task, []
    monkeypatch.setattr(engine, "train_task", lambda *args: calls.append(1) or real_train_task(*args))
    for label, state in recorder.states:
        calls.clear()
        resumed_dir = tmp_path / "resumed"
        shutil.rmtree(resumed_dir, ignore_errors=True)
        shutil.copytree(state, resumed_dir)
        model, result = run(method_name, resumed_dir, resume=True)
        record = json.loads((resumed_dir / checkpoint.RESULTS).read_text())
        assert record["status"] == "complete" and record["accuracy_matrix"] == expected.matrix, label
        assert result.zero_shot == expected.zero_shot, label
        assert not (resumed_dir / checkpoint.PROGRESS).exists(), label
        if expected_state is not None:
            assert (resumed_dir / checkpoint.METHOD_STATE).read_bytes() == expected_state, label
        assert (model is None) == (not calls), label  # a finished run returns no model
        if calls:  # it trained: the final model too
            final = weights(model)
            assert final.keys() == expected_model.keys(), label
            assert all(torch.equal(final[k], expected_model[k]) for k in final), label


def test_the_old_bug_a_state_ahead_of_its_record_is_never_counted_twice(tmp_path):
    """Before one commit per task, a kill between writing W_past and results.json made the resumed run add the
    task's update to W_past twice. Now a commit whose files disagree is refused, not continued."""
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        with_crash_in_second_task(lambda: run("ella", out))
    commit = checkpoint.commit_dir(out, 1)
    state = load_file(commit / checkpoint.METHOD_STATE)
    save_file(state, commit / checkpoint.METHOD_STATE, {"tasks_done": "2"})  # as if task 2 had written it
    with pytest.raises(EllaError, match="inconsistent .*method_state.safetensors: 2"):
        run("ella", out, resume=True)


def test_resume_refuses_other_settings_and_another_model(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        with_crash_in_second_task(lambda: run("ella", out))
    model, tokenizer = tiny_model()
    with pytest.raises(EllaError, match="other settings \\(method differ"):
        run_sequence(model, tokenizer, toy_tasks(8, 4), get_method("ella", lam=10.0, lora_r=4), output_dir=out,
                     resume=True, **SETTINGS)
    bigger = LlamaForCausalLM(LlamaConfig(**{**model.config.to_dict(), "hidden_size": 48}))
    with pytest.raises(EllaError, match="other settings \\(model differ"):
        run_sequence(bigger, tokenizer, toy_tasks(8, 4), get_method("ella", lam=10.0), output_dir=out, resume=True,
                     **SETTINGS)


def cpu_with_bf16(monkeypatch, has_bf16: bool) -> None:
    """A machine whose CPU has bf16 or not; accelerate's process-wide state reset so that it may change."""
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: has_bf16, raising=False)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_a_run_resumed_where_auto_means_another_precision_is_refused(tmp_path, monkeypatch):
    out, auto = tmp_path / "run", TrainingConfig(batch_size=4, learning_rate=1e-2)  # mixed_precision "auto"
    cpu_with_bf16(monkeypatch, False)  # "auto" is fp32 here
    with pytest.raises(KeyboardInterrupt):
        with_crash_in_second_task(lambda: run("ella", out, training=auto))
    record = json.loads((checkpoint.commits(out)[-1][1] / checkpoint.RESULTS).read_text())
    assert record["training_config"]["mixed_precision"] == record["mixed_precision"] == "no"
    cpu_with_bf16(monkeypatch, True)  # another machine, where "auto" is bf16
    with pytest.raises(EllaError, match="other settings \\(training_config differ: mixed_precision 'no' then, "
                                         "'bf16' now\\)"):
        run("ella", out, training=auto, resume=True)
    cpu_with_bf16(monkeypatch, True)  # the same machine, a fresh accelerate state for the next run
    _, resumed = run("ella", out, resume=True)  # --mixed-precision no: the precision it started in
    assert resumed.complete


def test_a_run_recorded_by_ella_0_5_with_auto_resumes_in_the_precision_it_used(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        with_crash_in_second_task(lambda: run("ella", out))
    path = checkpoint.commits(out)[-1][1] / checkpoint.RESULTS
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "training_config": {**record["training_config"], "mixed_precision": "auto"}}))
    _, resumed = run("ella", out, resume=True)  # it computed in fp32 ("no"), as this resume does
    assert resumed.complete


def test_resuming_a_complete_run_trains_nothing(tmp_path, monkeypatch):
    out = tmp_path / "run"
    _, first = run("ella", out)
    monkeypatch.setattr(engine, "train_task", lambda *args: pytest.fail("a complete run must not train"))
    model, again = run("ella", out, resume=True)
    assert again.matrix == first.matrix
    assert model is None  # its trained model was not kept: never the untrained one given in its place


def test_the_library_refuses_an_occupied_output_directory(tmp_path):
    out = tmp_path / "run"
    run("seqlora", out)
    saved = (out / checkpoint.RESULTS).read_text()
    with pytest.raises(EllaError, match="already holds a run .*--resume \\(resume=True\\).*--overwrite"):
        run("seqlora", out)
    assert (out / checkpoint.RESULTS).read_text() == saved  # nothing saved was lost
    (out / "notes.txt").write_text("mine")
    run("seqlora", out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"  # --overwrite replaces the run's files only
    with pytest.raises(EllaError, match="choose one"):
        run("seqlora", out, resume=True, overwrite=True)


@pytest.mark.slow
def test_a_real_kill_9_at_a_random_moment(sequence_file, tmp_path):
    """`ella run` killed with SIGKILL at a random moment, then `--resume`: the same results as a run never killed."""
    command = [sys.executable, "-m", "ella", "run", "--model", "tiny-causal", "--sequence", str(sequence_file),
               "--method", "ella", "--lam", "10", "--epochs", "2", "--batch-size", "2", "--max-length", "64",
               "--eval-mode", "rank", "--mixed-precision", "no"]
    start = time.perf_counter()
    subprocess.run([*command, "--output-dir", str(tmp_path / "whole")], check=True, capture_output=True)
    duration = time.perf_counter() - start
    moment = random.Random().uniform(0.3 * duration, duration)
    victim = subprocess.Popen([*command, "--output-dir", str(tmp_path / "killed")], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    time.sleep(moment)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    resumed = subprocess.run([*command, "--output-dir", str(tmp_path / "killed"), "--resume"], capture_output=True,
                             text=True)
    assert resumed.returncode == 0, f"killed after {moment:.1f} s of {duration:.1f} s: {resumed.stderr[-2000:]}"
    whole, killed = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("whole", "killed"))
    assert killed["accuracy_matrix"] == whole["accuracy_matrix"], f"killed after {moment:.1f} s"
    assert killed["zero_shot"] == whole["zero_shot"]
    assert (tmp_path / "killed" / "method_state.safetensors").read_bytes() == \
           (tmp_path / "whole" / "method_state.safetensors").read_bytes(), f"killed after {moment:.1f} s"

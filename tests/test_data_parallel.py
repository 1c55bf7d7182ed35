"""Data-parallel runs on two CPU processes (`torchrun`, what `accelerate launch` runs): the same global batch gives
the same training as one process, the learning-rate schedule included; an error in one process ends them all."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ella.cli import main

pytestmark = pytest.mark.slow  # two processes each

HELPERS = Path(__file__).parent / "helpers"


def torchrun(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    return subprocess.run(command, env={**os.environ, "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("model, epochs", [("tiny-causal", 2), ("tiny-t5", 1)])
def test_batch_4_on_two_processes_trains_as_batch_4_on_one(sequence_file, tmp_path, model, epochs):
    """Global batch 4: one process takes 4 examples per step, or two take 2 each. Same examples in the same steps,
    the same dropout masks (LoRA's, and T5's own), the same warm-up: W_past agrees to float precision, the
    accuracy matrix and every prediction exactly."""
    options = ["--model", model, "--sequence", str(sequence_file), "--method", "ella", "--lam", "10",
               "--batch-size", "4", "--epochs", str(epochs), "--lr", "1e-2", "--warmup-ratio", "0.5",
               "--max-length", "64", "--eval-mode", "rank", "--mixed-precision", "no"]
    two = torchrun("-m", "ella", "run", *options, "--output-dir", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("OA ") == 1  # the main process alone prints and writes
    assert main(["run", *options, "--output-dir", str(tmp_path / "one")]) == 0
    one, two = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("one", "two"))
    assert (one["processes"], two["processes"]) == (1, 2)

    steps = 3 * epochs  # 12 examples, 4 per step
    warmup = int(0.5 * steps)  # linear from 0, then constant: the rate each optimiser step used, by hand
    expected_rates = [1e-2 * min(1.0, step / warmup) for step in range(steps)]
    for log_one, log_two in zip(one["task_logs"], two["task_logs"]):
        assert log_one["optimizer_steps"] == log_two["optimizer_steps"] == steps
        assert log_one["steps"]["learning_rate"] == pytest.approx(expected_rates, rel=1e-12)
        assert log_two["steps"]["learning_rate"] == pytest.approx(expected_rates, rel=1e-12)
        assert log_two["steps"]["loss"] == pytest.approx(log_one["steps"]["loss"], abs=1e-5)

    w_one, w_two = (load_file(tmp_path / name / "method_state.safetensors") for name in ("one", "two"))
    assert w_one.keys() == w_two.keys()
    for key in w_one:  # float rounding of the gradient all-reduce only
        torch.testing.assert_close(w_two[key], w_one[key], rtol=1e-4, atol=1e-6)
    assert two["accuracy_matrix"] == one["accuracy_matrix"] and two["zero_shot"] == one["zero_shot"]
    predictions = [(tmp_path / name / "predictions.jsonl").read_text() for name in ("one", "two")]
    assert predictions[0] == predictions[1] and len(predictions[0].splitlines()) == 12


def test_an_error_in_one_process_ends_every_process_with_that_error(sequence_file, tmp_path):
    """Rank 1 fails at its second step while rank 0 trains on: both end at once (not at the collective's
    30-minute timeout), and the output shows the error."""
    done = torchrun(str(HELPERS / "fail_on_one_rank.py"), "run", "--model", "tiny-causal", "--sequence",
                    str(sequence_file), "--method", "ella", "--batch-size", "4", "--max-length", "64",
                    "--eval-mode", "rank", "--mixed-precision", "no", "--output-dir", str(tmp_path / "run"),
                    timeout=240)  # a process left waiting in a collective would run into this, and fail the test
    assert done.returncode != 0
    assert "RuntimeError: injected failure on rank 1" in done.stderr

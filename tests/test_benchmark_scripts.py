"""The benchmark scripts still run against ella's current API: each of their probes once, on the tiny model (the
committed figures come from SmolLM2; nothing here is timed)."""

import importlib.util
import math
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


efficiency, speed = load_script("efficiency"), load_script("speed")


@pytest.mark.parametrize("label", list(efficiency.step_probes()))
def test_every_efficiency_step_probe_runs(label, data_dir, monkeypatch):
    # the tiny model's tokenizer is byte-level: the prompts need more positions than SmolLM2's 128 tokens
    monkeypatch.setattr(efficiency, "MODEL", "tiny-causal")
    monkeypatch.setattr(efficiency, "STEP_MAX_LENGTH", 1024)
    method, hyperparameters = efficiency.step_probes()[label]
    result = efficiency.step_probe(method, hyperparameters, steps=1)
    assert result["step_seconds"] > 0 and math.isfinite(result["penalty_ratio"]) and result["peak_rss_bytes"] > 0


@pytest.mark.parametrize("name", list(speed.PROBES))
def test_every_speed_probe_runs(name, data_dir, monkeypatch):
    # the tiny model, byte-level prompts, a few examples: one optimiser step per task, 4 test examples per task
    for constant, value in (("MODEL", "tiny-causal"), ("MAX_LENGTH", 1024), ("TRAIN_EXAMPLES", speed.BATCH),
                            ("EVAL_EXAMPLES", 4), ("MATMUL_SHAPES", {"8x8x8": (8, 8, 8)}),
                            ("TRAINED_EXAMPLES", speed.BATCH)):
        monkeypatch.setattr(speed, constant, value)
    result = speed.PROBES[name](2)
    numbers = [value for row in result.values() for value in (row.values() if isinstance(row, dict) else [row])]
    assert numbers and all(math.isfinite(value) and value >= 0 for value in numbers)

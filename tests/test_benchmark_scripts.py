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


@pytest.mark.parametrize("overrides", [True, False])
def test_speed_report_names_every_variant_measured(overrides, monkeypatch, tmp_path):
    """``measure`` on a bf16 CPU (probes faked, their processes never started) and the report written from it: a
    row or a ratio for each variant, MKL's own kernels among them only where ella overrides MKL's choice."""
    import torch

    step = {"ella": 1.0, "plain": 3.0, speed.FP32_ELLA: 2.5, speed.FUSED_ELLA: 1.3}
    launched = []

    def fake_probe(name, tasks_used, environment=None):
        own = environment is speed.MKL_OWN
        launched.append((name, own))
        if name == "matmul":
            return {shape: 1e12 * (0.5 if own else 0.8) for shape in speed.MATMUL_SHAPES}
        if name == "flops":
            return {"flops_per_step": 4e11, "tokens_per_step": 1000}
        if name == "trained rank":
            return {"rank, only the options that can win": {"examples/s 1": 12.0, "accuracy": 77.1}}
        if name in step:
            return {"step_seconds": step[name] * (1.5 if own else 1.0), "steps": 4, "peak_rss_bytes": 2e9}
        return {"dbpedia, generate": {"examples_per_second": 10.0, "accuracy": 50.0, "flops_per_example": 2e10}}

    monkeypatch.setattr(speed, "probe", fake_probe)
    monkeypatch.setattr(speed, "used_dtype", lambda: torch.bfloat16)
    monkeypatch.setattr(speed, "ella_overrides_mkl", lambda: overrides)
    monkeypatch.setattr(speed, "matmul_throughput", lambda dtype, repeats, shapes: {s: 1.4e11 for s in shapes})
    monkeypatch.setattr(speed, "RESULTS", tmp_path)
    speed.write_report(speed.measure(rounds=1, tasks_used=1))
    report = (tmp_path / "speed.md").read_text()
    assert ("plain", True) in launched and ("ella", False) in launched  # the plain loop: MKL's own choice
    assert "| ella (`train_task`) | 1.00 | 2.00 |" in report  # 4e11 FLOP at the limit, 0.8 TFLOP/s: 0.5 s
    assert "- ella / plain loop, per round: 0.22" in report  # the plain loop: 3.0 s, x 1.5 with MKL's own choice
    own = ["| ella (`train_task`), MKL's own kernels | 1.50 |", "per round: 1.50; in fp32: 1.50.",
           "| ella (`train_task`), fp32, MKL's own kernels | 3.75 |", "| bfloat16, MKL's own kernels |",
           "| prefix cached, batch 8, MKL's own kernels |"]
    assert [line in report for line in own] == [overrides] * len(own)
    assert ("plain transformers + peft loop, MKL's own kernels" in report) == overrides

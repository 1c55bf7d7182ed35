"""Pinned results of every method on the tiny models: the accuracy matrices, the last row's predictions and
fingerprints of the method's state and the final weights, as recorded in pins.json. A change that alters any
method's numbers fails ``test_every_method_runs_a_two_task_sequence``; when the change is meant (a fix that changes
results), record the new values with ``ELLA_UPDATE_PINS=1 python -m pytest tests/test_end_to_end.py -k every`` and
say in the commit why they changed.

A fingerprint keeps three numbers per tensor: its mass Σ|x|, its sum and its inner product with a fixed random tensor,
each compared within 1e-4 of the mass (a sum can cancel to near zero; its rounding cannot exceed the mass's scale):
loose enough for another CPU's or thread count's float rounding, far tighter than any change of a formula.
"""

import json
import os
from pathlib import Path

import torch

PINS = Path(__file__).with_name("pins.json")
UPDATE = os.environ.get("ELLA_UPDATE_PINS") == "1"


def fingerprint(tensors: dict[str, torch.Tensor]) -> dict[str, list]:
    generator = torch.Generator().manual_seed(0)
    prints = {}
    for name in sorted(tensors):
        value = tensors[name].detach().double().cpu()
        probe = torch.randn(value.shape, generator=generator, dtype=torch.float64)
        prints[name] = [list(value.shape), value.abs().sum().item(), value.sum().item(), (value * probe).sum().item()]
    return prints


def record(result, state: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> dict:
    return {"zero_shot": result.zero_shot, "matrix": result.matrix, "predictions": result.final_predictions,
            "state": fingerprint(state), "weights": fingerprint(weights)}


def write(pins: dict) -> None:
    """One line per run, so that a change of results shows as the lines of the runs it changed."""
    lines = [f"{json.dumps(key)}: {json.dumps(pins[key], sort_keys=True)}" for key in sorted(pins)]
    PINS.write_text("{\n" + ",\n".join(lines) + "\n}\n")


def check(key: str, actual: dict) -> None:
    """Compare with the pinned record of ``key`` (or, with ELLA_UPDATE_PINS=1, replace it)."""
    pins = json.loads(PINS.read_text()) if PINS.exists() else {}
    if UPDATE:
        pins[key] = actual
        write(pins)
        return
    assert key in pins, f"no pinned record for {key}: record it with ELLA_UPDATE_PINS=1 (see tests/pins.py)"
    expected = pins[key]
    for field in ("zero_shot", "matrix", "predictions"):
        assert actual[field] == expected[field], f"{key}: {field} differs from the pinned run"
    for kind in ("state", "weights"):
        assert actual[kind].keys() == expected[kind].keys(), f"{key}: the {kind} tensors differ in names"
        for name, (shape, mass, *values) in expected[kind].items():
            assert actual[kind][name][0] == shape, f"{key}: {kind} {name} has shape {actual[kind][name][0]}"
            for got, want in zip(actual[kind][name][1:], [mass, *values]):
                assert abs(got - want) <= 1e-4 * mass + 1e-6, f"{key}: {kind} {name}: {got} vs pinned {want}"

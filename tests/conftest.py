import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network; hub look-ups fail at once

import json
from pathlib import Path

import pytest
from accelerate.state import AcceleratorState, GradientState

from ella import engine
from ella.data import Example, Task

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps one process-wide state; each test builds its own Accelerator."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield


@pytest.fixture
def data_dir() -> Path:
    assert (DATA_DIR / "cl_benchmark" / "orders.json").is_file(), f"benchmark data missing at {DATA_DIR}"
    return DATA_DIR


def toy_tasks(n_train: int = 12, n_test: int = 6) -> list[Task]:
    """Two short labelled tasks (byte-level prompts stay short) for the tiny models."""
    colours = ["red", "blue"]
    parity = ["even", "odd"]
    first = Task("colour", [Example(f"sky {i}", colours[i % 2]) for i in range(n_train)],
                 [Example(f"sea {i}", colours[i % 2]) for i in range(n_test)], labels=colours, prefix="Colour? ")
    second = Task("parity", [Example(str(i), parity[i % 2]) for i in range(n_train)],
                  [Example(str(100 + i), parity[i % 2]) for i in range(n_test)], labels=parity, prefix="Parity? ")
    return [first, second]


def one_label_task(name: str, labels: list[str], taught: str) -> Task:
    """Trained on one label only; tested on 4 examples of it and 1 of the other: the tiny model's accuracy moves
    between 20 and 80 as the tasks teach and overwrite their labels."""
    other = next(label for label in labels if label != taught)
    return Task(name, [Example(f"{name} {i}", taught) for i in range(16)],
                [Example(f"{name} t{i}", taught if i < 4 else other) for i in range(5)], labels=labels,
                prefix=f"{name}? ")


@pytest.fixture
def tasks() -> list[Task]:
    return toy_tasks()


@pytest.fixture
def sequence_file(tmp_path: Path) -> Path:
    """The toy tasks as a user-defined sequence on disk (JSONL for one task, a JSON list for the other)."""
    spec = {"tasks": []}
    for task in toy_tasks():
        folder = tmp_path / task.name
        folder.mkdir()
        rows = {split: [{"input": e.input, "output": e.output} for e in getattr(task, split)]
                for split in ("train", "test")}
        (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows["train"]))
        (folder / "test.json").write_text(json.dumps(rows["test"]))
        spec["tasks"].append({"name": task.name, "train": f"{task.name}/train.jsonl", "test": f"{task.name}/test.json",
                              "labels": task.labels, "instruction": task.prefix})
    path = tmp_path / "sequence.json"
    path.write_text(json.dumps(spec))
    return path


def with_crash_in_second_task(body):
    """``body()`` with the engine stopping (as a kill would) when the second task starts to train."""
    real = engine.train_task

    def train_task(model, method, task_index, *args):
        if task_index == 1:
            raise KeyboardInterrupt("the machine went away")
        return real(model, method, task_index, *args)

    engine.train_task = train_task
    try:
        return body()
    finally:
        engine.train_task = real

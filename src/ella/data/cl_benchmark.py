"""The CL benchmark of the O-LoRA line of work: Standard CL (orders 1-3, 4 tasks) and Long Sequence (orders 4-6,
15 tasks), read from ``<data_dir>/cl_benchmark/<Group>/<Task>/{train,test,labels}.json``.

The data directory is ``--data-dir``, else ``$ELLA_DATA_DIR``, else ``../shared/data`` beside the working
directory or beside the ella checkout, when one of them exists.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import EllaError
from .tasks import Task, check_sample_size, parse_examples, prompt_prefix, read_json_object, read_records, subsample

BENCHMARK_ORDERS = {"standard": ("1", "2", "3"), "long": ("4", "5", "6")}


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """The benchmark data directory; an error that says how to point at it when there is none."""
    if data_dir is not None:
        path = Path(data_dir)
        if not path.is_dir():
            raise EllaError(f"data directory not found: {path} (pass --data-dir DIR or set ELLA_DATA_DIR)")
        return path
    if os.environ.get("ELLA_DATA_DIR"):
        return resolve_data_dir(os.environ["ELLA_DATA_DIR"])
    checkout = Path(__file__).resolve().parents[3]  # src/ella/data/ -> the project root of a source checkout
    for candidate in (Path.cwd().parent / "shared" / "data", checkout.parent / "shared" / "data"):
        if candidate.is_dir():
            return candidate
    raise EllaError("no benchmark data directory found: pass --data-dir DIR or set ELLA_DATA_DIR "
                    "(DIR holds cl_benchmark/orders.json); or bring your own tasks with --sequence FILE")


def benchmark_root(data_dir: str | Path | None) -> Path:
    root = resolve_data_dir(data_dir) / "cl_benchmark"
    if not (root / "orders.json").is_file():
        raise EllaError(f"{root / 'orders.json'} not found: the data directory must hold the CL benchmark "
                        "as cl_benchmark/<Group>/<Task>/{train,test,labels}.json plus orders.json")
    return root


def task_directories(root: Path) -> dict[str, Path]:
    """Task name -> its directory (``<Group>/<Task>``), for every task that has a labels.json."""
    return {labels.parent.name: labels.parent for labels in sorted(root.glob("*/*/labels.json"))}


def task_order(benchmark: str, order: int | str, root: Path) -> list[str]:
    """The task names of a benchmark order, checked against the benchmark's own orders."""
    if benchmark not in BENCHMARK_ORDERS:
        raise EllaError(f"unknown benchmark {benchmark!r}: choose one of {', '.join(BENCHMARK_ORDERS)}")
    order = str(order)
    if order not in BENCHMARK_ORDERS[benchmark]:
        owner = next((b for b, orders in BENCHMARK_ORDERS.items() if order in orders), None)
        hint = f"; order {order} belongs to --benchmark {owner}" if owner else ""
        raise EllaError(f"unknown order {order} for the {benchmark} benchmark: choose one of "
                        f"{', '.join(BENCHMARK_ORDERS[benchmark])}{hint}")
    orders = read_json_object(root / "orders.json")
    if order not in orders:
        raise EllaError(f"{root / 'orders.json'} has no order {order}")
    return list(orders[order])


def load_cl_benchmark(benchmark: str = "standard", order: int | str = 1, tasks: list[str] | None = None,
                      data_dir: str | Path | None = None, train_per_task: int | None = None,
                      test_per_task: int | None = None, seed: int = 42) -> list[Task]:
    """The tasks of a benchmark order (or the named ``tasks``, in the given order), seeded-subsampled."""
    check_sample_size("train_per_task", train_per_task)
    check_sample_size("test_per_task", test_per_task)
    root = benchmark_root(data_dir)
    names = list(tasks) if tasks else task_order(benchmark, order, root)
    directories = task_directories(root)
    unknown = [name for name in names if name not in directories]
    if unknown:
        raise EllaError(f"unknown task(s) {', '.join(unknown)} in {root}; "
                        f"known tasks: {', '.join(sorted(directories))}")
    if len(set(names)) != len(names):
        raise EllaError(f"a task appears twice in {names}; each task can be learned once per sequence")
    instructions = read_json_object(root / "instruction_config.json")
    return [_load_task(name, directories[name], instructions, train_per_task, test_per_task, seed)
            for name in names]


def _load_task(name: str, directory: Path, instructions: dict, n_train, n_test, seed: int) -> Task:
    labels = read_records(directory / "labels.json")
    if not labels or not all(isinstance(label, str) for label in labels):
        raise EllaError(f"{directory / 'labels.json'}: expected a non-empty JSON list of label strings")
    group = directory.parent.name
    if group in instructions:  # COPA has no instruction: its sentence carries the question and options
        instruction = instructions[group][0]["instruction"]
        prefix = prompt_prefix(instruction, labels)
    else:
        prefix = ""
    splits = {}
    for split, n in (("train", n_train), ("test", n_test)):
        file = directory / f"{split}.json"
        examples = parse_examples(read_records(file), file, "sentence", "label", labels)
        splits[split] = subsample(examples, n, seed, f"{name}/{split}")
    return Task(name, splits["train"], splits["test"], labels=labels, prefix=prefix,
                source=str(directory))

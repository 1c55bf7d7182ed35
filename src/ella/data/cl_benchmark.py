"""The benchmarks of the field, each selected by name (``--benchmark``) and read from the data directory:

- ``standard`` (orders 1-3, 4 tasks) and ``long`` (orders 4-6, 15 tasks): the CL benchmark of the O-LoRA line of
  work, ``cl_benchmark/<Group>/<Task>/{train,test,labels}.json``; text classification scored by exact match.
- ``superni`` (orders 1-2, 15 tasks): SuperNI tasks, ``superni/<task>/{train,dev,test}.json``; see ``superni.py``.
- ``trace`` (order 1, 8 tasks): TRACE with 500 training examples per task, ``trace_500/<task>/*.json``; see
  ``trace.py``.

The data directory is ``--data-dir``, else ``$ELLA_DATA_DIR``, else ``../shared/data`` beside the working
directory or beside the ella checkout, when one of them exists.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import EllaError
from . import superni, trace
from .tasks import (Task, check_sample_size, check_validation_size, parse_examples, prompt_prefix, read_json_object,
                    read_records, sample_training_split, subsample)


def _load_cl_task(name: str, directory: Path, n_train: int | None, n_test: int | None, n_validation: int,
                  seed: int, source: str) -> Task:
    labels = read_records(directory / "labels.json")
    if not labels or not all(isinstance(label, str) for label in labels):
        raise EllaError(f"{directory / 'labels.json'}: expected a non-empty JSON list of label strings")
    instructions = read_json_object(directory.parents[1] / "instruction_config.json")
    group = directory.parent.name
    if group in instructions:  # COPA has no instruction: its sentence carries the question and options
        prefix = prompt_prefix(instructions[group][0]["instruction"], labels)
    else:
        prefix = ""
    files = {split: directory / f"{split}.json" for split in ("train", "test")}
    examples = {split: parse_examples(read_records(file), file, "sentence", "label", labels)
                for split, file in files.items()}
    train, validation = sample_training_split(examples["train"], n_train, n_validation, seed, name, files["train"])
    return Task(name, train, subsample(examples["test"], n_test, seed, f"{name}/test"), labels=labels, prefix=prefix,
                source=source, validation=validation)


@dataclass(frozen=True)
class Benchmark:
    directory: str  # under the data directory; holds orders.json
    orders: dict[str, str]  # order name -> its key in orders.json
    task_marker: str  # glob of a file that every task directory holds
    # (name, directory, train_per_task, test_per_task, validation_per_task, seed, source) -> Task
    load_task: Callable[..., Task]


BENCHMARKS = {
    "standard": Benchmark("cl_benchmark", {"1": "1", "2": "2", "3": "3"}, "*/*/labels.json", _load_cl_task),
    "long": Benchmark("cl_benchmark", {"4": "4", "5": "5", "6": "6"}, "*/*/labels.json", _load_cl_task),
    "superni": Benchmark("superni", {"1": "1", "2": "2"}, "*/test.json", superni.load_task),
    "trace": Benchmark("trace_500", {"1": "trace"}, "*/test.json", trace.load_task),
}
BENCHMARK_ORDERS = {name: tuple(benchmark.orders) for name, benchmark in BENCHMARKS.items()}


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
                    "(see ../shared/data/README.md for its layout); or bring your own tasks with --sequence FILE")


def benchmark_root(benchmark: str, data_dir: str | Path | None) -> Path:
    if benchmark not in BENCHMARKS:
        raise EllaError(f"unknown benchmark {benchmark!r}: choose one of {', '.join(BENCHMARKS)}")
    root = resolve_data_dir(data_dir) / BENCHMARKS[benchmark].directory
    if not (root / "orders.json").is_file():
        raise EllaError(f"{root / 'orders.json'} not found: the {benchmark} benchmark needs the data directory to hold "
                        f"{BENCHMARKS[benchmark].directory}/ with its tasks and orders.json")
    return root


def task_order(benchmark: str, order: int | str, root: Path) -> list[str]:
    """The task names of a benchmark order, checked against the benchmark's own orders."""
    order = str(order)
    orders = BENCHMARKS[benchmark].orders
    if order not in orders:
        owner = next((b for b, known in BENCHMARK_ORDERS.items() if order in known), None)
        hint = f"; order {order} belongs to --benchmark {owner}" if owner else ""
        raise EllaError(f"unknown order {order} for the {benchmark} benchmark: choose one of "
                        f"{', '.join(orders)}{hint}")
    listed = read_json_object(root / "orders.json")
    if orders[order] not in listed:
        raise EllaError(f"{root / 'orders.json'} has no order {orders[order]}")
    return list(listed[orders[order]])


def load_cl_benchmark(benchmark: str = "standard", order: int | str | None = None, tasks: list[str] | None = None,
                      data_dir: str | Path | None = None, train_per_task: int | None = None,
                      test_per_task: int | None = None, seed: int = 42, validation_per_task: int = 0) -> list[Task]:
    """The tasks of a benchmark order (default: its first; or the benchmark's named ``tasks``, in the given
    order), seeded-subsampled; ``validation_per_task``: see ``tasks.sample_training_split``."""
    check_sample_size("train_per_task", train_per_task)
    check_sample_size("test_per_task", test_per_task)
    check_validation_size(validation_per_task)
    root = benchmark_root(benchmark, data_dir)
    names = list(tasks) if tasks else task_order(benchmark, order or BENCHMARK_ORDERS[benchmark][0], root)
    spec = BENCHMARKS[benchmark]
    directories = {marker.parent.name: marker.parent for marker in sorted(root.glob(spec.task_marker))}
    unknown = [name for name in names if name not in directories]
    if unknown:
        raise EllaError(f"unknown task(s) {', '.join(unknown)} in {root}; "
                        f"known tasks: {', '.join(sorted(directories))}")
    if len(set(names)) != len(names):
        raise EllaError(f"a task appears twice in {names}; each task can be learned once per sequence")
    # a task's source is its directory under the data directory: results stay valid wherever the data lies
    return [spec.load_task(name, directories[name], train_per_task, test_per_task, validation_per_task, seed,
                           str(directories[name].relative_to(root.parent))) for name in names]

"""Tasks, the prompt format of the papers, seeded subsampling, and the user's own task sequences.

A prompt is ``prefix + input + suffix`` (the O-LoRA line of work):
``instruction + "Option: " + ", ".join(labels) + " \\n" + sentence + "\\nAnswer:"``; the target is the label.
Keeping the three parts apart lets the encoder truncate only the input when a prompt is too long.

Your own tasks: a sequence file (JSON) lists the tasks in training order; paths are relative to it::

    {"tasks": [
      {"name": "sentiment", "train": "sentiment/train.jsonl", "test": "sentiment/test.jsonl",
       "labels": ["positive", "negative"],
       "instruction": "What is the sentiment of the following review? Choose one from the option.\\n"},
      {"name": "topic", "train": "topic/train.json", "test": "topic/test.json"}
    ]}

Each data file is JSON Lines (one ``{"input": ..., "output": ...}`` per line) or a JSON list of such objects.
``labels`` (optional) is the closed set of outputs: every output must be one of them, the prompt lists them
as options, and it enables rank-classification evaluation. ``instruction`` defaults to none.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import EllaError
from ..provenance import portable_path

ANSWER_SUFFIX = "\nAnswer:"


@dataclass(frozen=True)
class Example:
    input: str
    output: str  # the training target
    references: tuple[str, ...] = ()  # further acceptable answers for scoring (SuperNI lists several)

    @property
    def all_outputs(self) -> tuple[str, ...]:
        return (self.output, *self.references)


@dataclass
class Task:
    """One task of a sequence: its examples and how to prompt for them."""

    name: str
    train: list[Example]
    test: list[Example]
    labels: list[str] | None = None
    prefix: str = ""  # instruction and options, before the input
    suffix: str = ANSWER_SUFFIX  # after the input
    metric: str = "exact_match"  # how a generated answer is scored: a name in ella.scores.ANSWER_METRICS
    keep_input_end: bool = False  # truncate a long input from its start (code completion needs the end)
    source: str = ""  # where the examples came from, for error messages and results.json
    validation: list[Example] = field(default_factory=list)  # from the training split, outside ``train``

    def prompt(self, example: Example) -> str:
        return self.prefix + example.input + self.suffix

    def describe(self) -> dict:
        # "validation" only where there is a sample: the record of a run without one stays as it was
        return {"name": self.name, "train": len(self.train), "test": len(self.test),
                **({"validation": len(self.validation)} if self.validation else {}),
                "labels": self.labels, "metric": self.metric, "source": self.source}


def prompt_prefix(instruction: str, labels: list[str] | None) -> str:
    """The papers' prefix: the instruction, then the options when the task has a label set."""
    return instruction + ("Option: " + ", ".join(labels) + " \n" if labels else "")


def subsample(examples: list[Example], n: int | None, seed: int, key: str) -> list[Example]:
    """``n`` examples drawn without replacement; the same for the same (seed, key) on every machine."""
    if n is None or n >= len(examples):
        return list(examples)
    return random.Random(f"{seed}/{key}").sample(examples, n)


def sample_training_split(examples: list[Example], n_train: int | None, n_validation: int, seed: int, name: str,
                          file: Path) -> tuple[list[Example], list[Example]]:
    """A task's training sample and validation sample, both from its training split (``file``).

    The training sample is drawn exactly as without validation, so it is the same for a seed whatever
    ``n_validation``; the validation sample is a seeded draw from the examples outside it (in file order), so the
    two never share an example, and neither shares one with the test split, a file of its own."""
    train = subsample(examples, n_train, seed, f"{name}/train")
    if not n_validation:
        return train, []
    if n_train is None:
        raise EllaError(f"{name}: --validation-per-task draws from the training examples the run does not train on; "
                        f"without --train-per-task it trains on all of them: give --train-per-task too (at most "
                        f"{len(examples) - n_validation} for {file})")
    if n_train + n_validation > len(examples):
        raise EllaError(f"{name}: {file} has {len(examples)} training examples, too few for {n_train} training + "
                        f"{n_validation} validation examples; lower --train-per-task or --validation-per-task "
                        f"(together at most {len(examples)})")
    trained = {id(example) for example in train}  # by identity: a split may hold two equal rows
    rest = [example for example in examples if id(example) not in trained]
    return train, subsample(rest, n_validation, seed, f"{name}/validation")


def check_sample_size(name: str, n: int | None) -> None:
    if n is not None and n < 1:
        raise EllaError(f"{name} must be at least 1 (got {n}); leave it out to use every example")


def check_validation_size(n: int) -> None:
    if n < 0:
        raise EllaError(f"validation_per_task must be 0 (no validation sample) or more (got {n})")


def read_records(path: Path) -> list[dict]:
    """Rows of a JSON list file or a JSON Lines file, with the line of any syntax error."""
    if not path.is_file():
        raise EllaError(f"data file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise EllaError(f"{path}, line {number}: malformed JSON ({e.msg}); "
                                    "each line must be one JSON object") from None
        return rows
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise EllaError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno} ({e.msg})") from None
    if not isinstance(rows, list):
        raise EllaError(f"{path}: expected a JSON list of examples, found {type(rows).__name__}")
    return rows


def parse_examples(rows: list, path: Path, input_key: str, output_key: str,
                   labels: list[str] | None) -> list[Example]:
    """Examples from rows of ``{input_key: str, output_key: str}``, checked against the label set."""
    examples = []
    allowed = set(labels) if labels else None
    for index, row in enumerate(rows):
        if not (isinstance(row, dict) and isinstance(row.get(input_key), str)
                and isinstance(row.get(output_key), str)):
            raise EllaError(f"{path}, example {index}: expected an object with string fields "
                            f"{input_key!r} and {output_key!r}, found {str(row)[:120]}")
        if allowed is not None and row[output_key] not in allowed:
            raise EllaError(f"{path}, example {index}: {output_key} {row[output_key]!r} is not in the task's "
                            f"label set {labels}; fix the example or add the label to the label set")
        examples.append(Example(row[input_key], row[output_key]))
    if not examples:
        raise EllaError(f"{path} holds no examples; every task needs train and test examples")
    return examples


def load_task_sequence(path: str | Path, train_per_task: int | None = None, test_per_task: int | None = None,
                       seed: int = 42, validation_per_task: int = 0) -> list[Task]:
    """Load a user-defined task sequence (format in this module's docstring); ``validation_per_task``: see
    ``sample_training_split``."""
    path = Path(path)
    check_sample_size("train_per_task", train_per_task)
    check_sample_size("test_per_task", test_per_task)
    check_validation_size(validation_per_task)
    spec = read_json_object(path)
    entries = spec.get("tasks")
    if not isinstance(entries, list) or not entries:
        raise EllaError(f"{path}: expected {{\"tasks\": [ ... ]}} with at least one task")
    tasks, seen = [], set()
    for position, entry in enumerate(entries):
        where = f"{path}, task {position}"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise EllaError(f"{where}: each task needs a \"name\" string")
        for key in ("train", "test"):
            if not isinstance(entry.get(key), str):
                raise EllaError(f"{where} ({entry['name']}): \"{key}\" must be the path of a JSON/JSONL file")
        unknown = set(entry) - {"name", "train", "test", "labels", "instruction"}
        if unknown:
            raise EllaError(f"{where} ({entry['name']}): unknown keys {sorted(unknown)}; "
                            "allowed: name, train, test, labels, instruction")
        name = entry["name"]
        if name in seen:
            raise EllaError(f"{path}: task name {name!r} appears twice; names must be unique")
        seen.add(name)
        labels = entry.get("labels")
        if labels is not None and not (isinstance(labels, list) and labels
                                       and all(isinstance(x, str) for x in labels)):
            raise EllaError(f"{where} ({name}): \"labels\" must be a non-empty list of strings")
        instruction = entry.get("instruction", "")
        if not isinstance(instruction, str):
            raise EllaError(f"{where} ({name}): \"instruction\" must be a string")
        files = {key: path.parent / entry[key] for key in ("train", "test")}
        examples = {key: parse_examples(read_records(file), file, "input", "output", labels)
                    for key, file in files.items()}
        train, validation = sample_training_split(examples["train"], train_per_task, validation_per_task, seed, name,
                                                  files["train"])
        tasks.append(Task(name, train, subsample(examples["test"], test_per_task, seed, f"{name}/test"),
                          labels=labels, prefix=prompt_prefix(instruction, labels), source=portable_path(path),
                          validation=validation))
    return tasks


def read_json_object(path: Path) -> dict:
    if not path.is_file():
        raise EllaError(f"task sequence file not found: {path}")
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise EllaError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno} ({e.msg})") from None
    if not isinstance(spec, dict):
        raise EllaError(f"{path}: expected a JSON object {{\"tasks\": [...]}}")
    return spec


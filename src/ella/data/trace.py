"""TRACE, 500 training examples per task: ``trace_500/<task>/{train,eval,test}.json``, lists of
``{"prompt", "answer"}``. The prompts carry their own instructions; their last line (``Answer:``, ``态度：``, ...)
is kept whole when a long input is truncated.

Each task keeps TRACE's metric: the option letter for C-STANCE, FOMC and ScienceQA (whose answers go on to give
reasons), the number for NumGLUE, ROUGE-L for MeetingBank, edit similarity for Py150 (code completion: a long
input loses its start, not the end being completed) and SARI for 20Minuten (simplification). MeetingBank ships no
training split: it trains on its ``eval`` split (100 examples), and its ``source`` says so.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import EllaError
from .tasks import Example, Task, parse_examples, read_records, sample_training_split, subsample

METRICS = {"C-STANCE": "choice", "FOMC": "choice", "ScienceQA": "choice", "NumGLUE-cm": "number",
           "NumGLUE-ds": "number", "MeetingBank": "rouge_l", "Py150": "edit_similarity", "20Minuten": "sari"}
CUE_LENGTH = 40  # a last prompt line up to this long is the answer cue, kept out of truncation


def _split_cue(example: Example) -> tuple[str, str]:
    head, newline, cue = example.input.rpartition("\n")
    return (head, newline + cue) if newline and len(cue) <= CUE_LENGTH else (example.input, "")


def load_task(name: str, directory: Path, n_train: int | None, n_test: int | None, n_validation: int, seed: int,
              source: str) -> Task:
    if name not in METRICS:
        raise EllaError(f"{directory}: unknown TRACE task {name!r}; TRACE's tasks are {', '.join(METRICS)}")
    train_file = directory / "train.json"
    if not train_file.is_file() and (directory / "eval.json").is_file():
        train_file = directory / "eval.json"
    test_file = directory / "test.json"
    train, validation = sample_training_split(parse_examples(read_records(train_file), train_file, "prompt", "answer",
                                                             None), n_train, n_validation, seed, name, train_file)
    test = subsample(parse_examples(read_records(test_file), test_file, "prompt", "answer", None), n_test, seed,
                     f"{name}/test")
    splits = {"train": train, "validation": validation, "test": test}
    cues = {_split_cue(e)[1] for examples in splits.values() for e in examples}
    suffix = cues.pop() if len(cues) == 1 else ""  # a cue shared by every prompt becomes the task's suffix
    if suffix:
        splits = {k: [Example(e.input[: -len(suffix)], e.output) for e in v] for k, v in splits.items()}
    substitute = "" if train_file.name == "train.json" else " (trains on eval.json: no train split)"
    return Task(name, splits["train"], splits["test"], suffix=suffix, metric=METRICS[name],
                keep_input_end=name == "Py150", source=source + substitute, validation=splits["validation"])

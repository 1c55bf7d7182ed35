"""One run, as data: ``RunSpec`` holds everything ``ella run`` is asked (its fields are the command's options) and
``run(spec)`` does what the command does: choose the tasks, guard the output directory, load the model, learn the
sequence, then plot, keep the model if asked and print the matrix. The CLI and the suite files of ``ella bench``
both build a ``RunSpec``; ``ella bench`` hands each one to a process of its own as JSON on its standard input
(``main`` below).

    import ella
    ella.run(ella.RunSpec(model="tiny-causal", tasks=["dbpedia", "agnews"], method="inclora+ella",
                          hyperparameters={"lam": 3e3}, train_per_task=32, output_dir="runs/a"))
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint import (RESULTS, check_output_dir, read_json, read_run, recorded_training_config, rng_state,
                         run_status)
from .continuation import PreviousRun, save_run_model
from .data import BENCHMARK_ORDERS, load_cl_benchmark, load_task_sequence
from .engine import (EVAL_SCHEDULES, MIXED_PRECISION, EvaluationConfig, SequenceResult, TrainingConfig,
                     make_accelerator, resolve_mixed_precision, run_sequence, run_settings, schedule_period)
from .errors import EllaError
from .evaluation import EVAL_MODES, scoring_description
from .methods import get_method
from .models import BUILTIN_MODELS, DTYPES, load_model
from .provenance import portable_path
from .report import format_matrix, format_metrics, format_validation, plot_matrix


def option(default, help: str, group: str, choices=None, aliases: tuple[str, ...] = ()):
    """A field of ``RunSpec`` and the ``ella run`` option of the same name (in the help's ``group``; ``aliases``:
    further flags for it)."""
    return field(default=default, metadata={"help": help, "group": group, "choices": choices, "aliases": aliases})


DEFAULT_MODEL, DEFAULT_DTYPE, DEFAULT_METHOD = "smollm2-135m", "float32", "ella"  # of a run that continues none


@dataclass
class RunSpec:
    # model
    model: str | None = option(None, f"a Hugging Face id, a local model directory, or a built-in name (default: "
                               f"{DEFAULT_MODEL}; continuing, the continued run's): "
                               + "; ".join(f"{k} ({v})" for k, v in BUILTIN_MODELS.items()), "model")
    dtype: str | None = option(None, f"dtype of the weights, compute runs in --mixed-precision (default: "
                               f"{DEFAULT_DTYPE}; continuing, the continued run's)", "model", list(DTYPES))
    continue_run: Path | None = option(None, "learn more tasks after a finished run: its directory (run with "
                                       "--save-model) or that model/ directory; the model, method, hyper-parameters "
                                       "and method state are the run's, the new tasks come from --tasks / --order / "
                                       "--sequence, and the extended run goes to a new --output-dir", "model",
                                       aliases=("--continue",))
    # tasks
    benchmark: str = option("standard", "standard (CL benchmark, 4 tasks, orders 1-3), long (15 tasks, orders 4-6), "
                            "superni (15 tasks, orders 1-2; ROUGE-L / exact match) or trace (8 tasks, order 1; "
                            "TRACE's per-task metrics)", "tasks", list(BENCHMARK_ORDERS))
    order: str | None = option(None, "task order of the benchmark (default: its first)", "tasks")
    tasks: list[str] | None = option(None, "comma-separated task names of the benchmark, in training order "
                                     "(instead of --order)", "tasks")
    sequence: Path | None = option(None, "your own task sequence: a JSON file (format: README, 'Your own tasks')",
                                   "tasks")
    data_dir: str | None = option(None, "benchmark data directory (default: $ELLA_DATA_DIR, else ../shared/data)",
                                  "tasks")
    train_per_task: int | None = option(None, "training examples per task (default: all)", "tasks")
    test_per_task: int | None = option(None, "test examples per task (default: all)", "tasks")
    validation_per_task: int = option(0, "validation examples per task (0: none), drawn from its training split "
                                      "outside the training sample, which stays the one drawn without them (needs "
                                      "--train-per-task); evaluated on each task after it is learnt and on every "
                                      "task after the last, recorded apart from the test matrix (for choosing "
                                      "hyper-parameters: `ella bench`'s [select])", "tasks")
    # method (its hyper-parameters: `hyperparameters`, one option each on the command line)
    method: str | None = option(None, "continual-learning method, or parts joined by + (e.g. inclora+ella+replay); "
                                f"`ella methods` lists them (default: {DEFAULT_METHOD}; continuing, the continued "
                                "run's)", "method")
    hyperparameters: dict = field(default_factory=dict)
    # training
    epochs: int = option(1, "epochs per task", "training")
    lr: float | None = option(None, "learning rate (default: the method's, 1e-3 for LoRA methods, 5e-5 for seqft)",
                              "training")
    batch_size: int = option(8, "examples per micro-batch over all processes (each process trains on its share)",
                             "training")
    grad_accum: int = option(1, "micro-batches per optimiser step (the step's loss is the mean over all their "
                             "answer tokens)", "training")
    max_length: int = option(512, "max tokens of prompt + answer; longer inputs are cut, and free-text answers "
                                  "(tasks without labels) to half of it", "training")
    warmup_ratio: float = option(0.1, "linear warm-up over this fraction of each task's steps, then a constant rate",
                                 "training")
    weight_decay: float = option(0.0, "AdamW weight decay", "training")
    max_grad_norm: float = option(1.0, "gradient clipping (0: off)", "training")
    mixed_precision: str = option("auto", "auto: bf16 where the CPU/GPU supports it, else fp32", "training",
                                  list(MIXED_PRECISION))
    seed: int = option(42, "seed of subsampling, initialisation and shuffling", "training")
    tokens_per_pass: int = option(512, "padded tokens of one forward/backward pass per process: a larger "
                                  "micro-batch is cut into passes of examples of similar length (bounds memory, "
                                  "saves padding; the step's loss is the same)", "training")
    # evaluation
    eval_mode: str = option("generate", "; ".join(f"{k}: {v}" for k, v in EVAL_MODES.items()), "evaluation",
                            list(EVAL_MODES))
    eval_batch_size: int = option(8, "evaluation batch size (prompts per forward pass)", "evaluation")
    max_new_tokens: int | None = option(None, "generation length (default: the task's longest answer + 4 tokens)",
                                        "evaluation")
    no_zero_shot: bool = option(False, "skip evaluating the base model before training (FWT is then not reported)",
                                "evaluation")
    zero_shot_cache: Path | None = option(None, "a directory of zero-shot accuracies: a task's accuracy measured by "
                                          "an earlier run with the same base model, test examples and evaluation "
                                          "settings is read there instead of measured again, and this run's are "
                                          "kept there (`ella bench` keeps one per suite)", "evaluation")
    eval_schedule: str = option("full", "which tasks are evaluated after each task: "
                                + "; ".join(f"{k}: {v}" for k, v in EVAL_SCHEDULES.items())
                                + ". Unevaluated cells are null; the zero-shot row is always full", "evaluation")
    # output
    output_dir: Path | None = option(None, "where results go (default: runs/<method>-<timestamp>)", "output")
    overwrite: bool = option(False, "replace a run already in --output-dir", "output")
    resume: bool = option(False, "continue the interrupted run in --output-dir after its last finished task (same "
                          "options); a finished run is shown, not repeated", "output")
    label: str | None = option(None, "the run's name in reports (default: the method)", "output")
    save_model: bool = option(False, "also save the final model (adapters merged) to OUTPUT_DIR/model", "output")
    command: str | None = None  # how the run was asked for (the command line), kept in results.json

    def __post_init__(self):
        if isinstance(self.order, int) and not isinstance(self.order, bool):
            self.order = str(self.order)  # orders are named by numbers: 1, "1" and --order 1 are one order
        hints = typing.get_type_hints(RunSpec)
        for f in dataclasses.fields(self):
            value, kinds = getattr(self, f.name), _kinds(hints[f.name])
            if isinstance(value, str) and Path in kinds:
                value = Path(value)
                setattr(self, f.name, value)
            if isinstance(value, int) and not isinstance(value, bool) and float in kinds:
                value = float(value)
                setattr(self, f.name, value)
            if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
                raise EllaError(f"{f.name} = {value!r}: expected {' or '.join(k.__name__ for k in kinds)}")
            choices = f.metadata.get("choices")
            if choices and value is not None and value not in choices:
                raise EllaError(f"{f.name} = {value!r}: choose one of {', '.join(choices)}")
        schedule_period(self.eval_schedule)  # a suite's bad schedule fails when the suite loads, before any run

    @classmethod
    def from_dict(cls, values: dict) -> "RunSpec":
        """A spec from plain values (JSON, a suite file's table); unknown names are refused with the known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise EllaError(f"{', '.join(unknown)}: not a run setting (known: {', '.join(sorted(known))})")
        return cls(**values)

    def to_json(self) -> str:
        return json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()})

    def training_config(self) -> TrainingConfig:
        """With the precision resolved for this machine ("auto" is what ``run_sequence`` records it as)."""
        return TrainingConfig(epochs=self.epochs, learning_rate=self.lr, batch_size=self.batch_size,
                              grad_accum=self.grad_accum, max_length=self.max_length, warmup_ratio=self.warmup_ratio,
                              weight_decay=self.weight_decay, max_grad_norm=self.max_grad_norm, seed=self.seed,
                              mixed_precision=resolve_mixed_precision(self.mixed_precision),
                              tokens_per_pass=self.tokens_per_pass)

    def evaluation_config(self) -> EvaluationConfig:
        return EvaluationConfig(mode=self.eval_mode, batch_size=self.eval_batch_size,
                                max_new_tokens=self.max_new_tokens, zero_shot=not self.no_zero_shot,
                                schedule=self.eval_schedule)


def _kinds(annotation) -> tuple[type, ...]:
    """The runtime types a field's annotation admits (``int | None`` -> (int, NoneType))."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return tuple(k for arg in typing.get_args(annotation) for k in _kinds(arg))
    if annotation is type(None):
        return (type(None),)
    return (typing.get_origin(annotation) or annotation,)


def load_tasks(spec: RunSpec):
    """The tasks of the run, a description of where they come from, and the order (None for named tasks)."""
    sample = dict(train_per_task=spec.train_per_task, test_per_task=spec.test_per_task, seed=spec.seed,
                  validation_per_task=spec.validation_per_task)
    if spec.sequence is not None:
        if spec.tasks or spec.order:
            raise EllaError("--sequence brings its own tasks: drop --tasks / --order")
        return load_task_sequence(spec.sequence, **sample), portable_path(spec.sequence), None
    if spec.tasks and spec.order:
        raise EllaError("give either --order or --tasks, not both")
    order = spec.order or BENCHMARK_ORDERS[spec.benchmark][0]
    tasks = load_cl_benchmark(spec.benchmark, order, spec.tasks, spec.data_dir, **sample)
    if spec.tasks:
        return tasks, f"CL benchmark tasks {','.join(spec.tasks)}", None
    return tasks, f"{spec.benchmark} order {order}", str(order)


def run(spec: RunSpec):
    """Do the run ``spec`` describes, as ``ella run`` does; returns ``(model, SequenceResult)``. Under
    ``accelerate launch`` every process calls it; the main process alone writes and prints.

    With ``continue_run`` it continues that finished run (see ``ella.continuation``): its model, method,
    hyper-parameters and state, its tasks rebuilt and evaluated again, then the new tasks."""
    previous = PreviousRun(spec.continue_run) if spec.continue_run is not None else None
    if previous is None:
        name, hyperparameters = spec.method or DEFAULT_METHOD, spec.hyperparameters
    else:
        name, hyperparameters = previous.method_settings(spec.method, spec.hyperparameters)
    method = get_method(name, **hyperparameters)
    training, evaluation = spec.training_config(), spec.evaluation_config()
    if previous is not None:
        previous.check_evaluation(dataclasses.asdict(evaluation))  # (run_sequence checks it too, for the API)
        if spec.validation_per_task or previous.info.get("validation_per_task"):
            raise EllaError("continuing a run takes no validation samples (the continued run's rows would have none): "
                            "leave out --validation-per-task, and continue a run made without it")
        if spec.sequence is None and not spec.tasks and spec.order is None:
            raise EllaError("name the tasks to learn after the continued run's: --tasks, --order or --sequence")
    tasks, source, order = load_tasks(spec)
    learnt: list = []
    if previous is not None:
        learnt = previous.tasks(spec.data_dir)
        again = [task.name for task in tasks if task.name in {t.name for t in learnt}]
        if again:
            raise EllaError(f"the continued run learnt {', '.join(again)} already; each task can be learned once per "
                            "sequence: name only new tasks")
    if spec.resume and spec.output_dir is None:
        raise EllaError("--resume continues the run in --output-dir: name that directory")
    output_dir = spec.output_dir or Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if previous is not None and (output_dir.resolve() == previous.path.resolve()
                                 or previous.model_dir.resolve().is_relative_to(output_dir.resolve())):
        raise EllaError(f"{output_dir} holds the continued run: the extended run goes to a new --output-dir")
    check_output_dir(output_dir, spec.resume, spec.overwrite)  # before the model loads; run_sequence claims it
    accelerator = make_accelerator(training)  # one process, or one per device under `accelerate launch`
    if spec.resume and spec.save_model and run_status(output_dir) == "complete":
        raise EllaError(f"the run in {output_dir} finished earlier and its final model was not kept; "
                        "run it again with --overwrite --save-model")

    if previous is None:
        model_name, dtype, model_path = spec.model or DEFAULT_MODEL, spec.dtype or DEFAULT_DTYPE, None
    else:
        model_name = previous.info.get("model", portable_path(previous.model_dir))
        dtype, model_path = previous.info.get("dtype", DEFAULT_DTYPE), str(previous.model_dir)
        for flag, given, kept in (("--model", spec.model, model_name), ("--dtype", spec.dtype, dtype)):
            if given is not None and given != kept:
                raise EllaError(f"{flag} {given}: a continued run goes on with the continued run's model ({kept}, "
                                f"as saved in {previous.model_dir}); leave out {flag}")
    load_start = time.perf_counter()
    model, tokenizer = load_model(model_path or model_name, dtype)
    if accelerator.is_main_process:
        loaded = f"model loaded in {time.perf_counter() - load_start:.1f} s"
        if previous is None:
            print(f"ella: {name} on {model_name}, {source}: {len(tasks)} tasks "
                  f"({', '.join(t.name for t in tasks)}); {loaded}", file=sys.stderr)
        else:
            print(f"ella: continuing {spec.continue_run} ({name} on {model_name}, {len(learnt)} tasks: "
                  f"{', '.join(t.name for t in learnt)}) with {source}: {len(tasks)} more "
                  f"({', '.join(t.name for t in tasks)}); {loaded}", file=sys.stderr)
            recorded = recorded_training_config(previous.record)
            changed = [f"{key} {value} (was {recorded[key]})" for key, value in dataclasses.asdict(training).items()
                       if key in recorded and recorded[key] != value]
            if changed:
                print(f"ella: note: the new tasks train with other settings than the continued run's: "
                      f"{', '.join(changed)}", file=sys.stderr)
    run_info = {"command": spec.command, "label": spec.label or name,
                "model": portable_path(model_name),  # a name or hub id as it is; a local directory portable
                "dtype": dtype, "tasks_from": source, "benchmark": None if spec.sequence else spec.benchmark,
                "order": order, "seed": spec.seed, "train_per_task": spec.train_per_task,
                "test_per_task": spec.test_per_task, "validation_per_task": spec.validation_per_task}
    if previous is not None:
        added = {"benchmark": run_info["benchmark"], "sequence": source if spec.sequence else None,
                 "tasks": [task.name for task in tasks], "seed": spec.seed, "train_per_task": spec.train_per_task,
                 "test_per_task": spec.test_per_task}
        run_info.update(label=spec.label or previous.info.get("label") or name, order=None,
                        tasks_from=f"{previous.info.get('tasks_from')}, continued with {source}",
                        continued_from=portable_path(spec.continue_run), task_sources=previous.task_sources() + [added])
        tasks = learnt + tasks
    model, result = run_sequence(model, tokenizer, tasks, method, training, evaluation, output_dir, run_info,
                                 accelerator, resume=spec.resume, overwrite=spec.overwrite, previous=previous,
                                 zero_shot_cache_dir=spec.zero_shot_cache)
    rng = rng_state()  # the end of the run, where a continuation of it goes on
    # where each part's sequence file lies here (results.json records it portably), for continuing this run
    sequence_files = (previous.sequence_files() if previous else []) + \
        [str(spec.sequence.resolve()) if spec.sequence else None]
    if accelerator.is_main_process:  # the others hold the same model and result
        _report(spec, f"{name} on {model_name}", tasks, model, tokenizer, method, rng, result, output_dir,
                sequence_files)
    # Every process stays until the run is written, then leaves the process group: a process that exits while
    # still in it can abort in the collective backend's teardown.
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return model, result


def finished_runs(specs: list[RunSpec]) -> list[bool]:
    """For each spec, whether its output directory holds its run finished and published (results.json and the
    heat-map) with the settings ``run`` checks on resuming, checked without running it: the model loaded once per
    model for all the specs. False where not, or where this cannot tell (a continued run, --save-model): ``run``
    with ``resume`` then says why or finishes it."""
    models = {}  # (model, dtype) -> the model as loaded, which the checks leave as it is
    return [_finished(spec, models) for spec in specs]


def _finished(spec: RunSpec, models: dict) -> bool:
    directory = spec.output_dir
    try:
        if (directory is None or spec.continue_run is not None or spec.save_model
                or run_status(directory) != "complete" or not (directory / "accuracy_matrix.png").is_file()
                or read_json(directory / RESULTS).get("status") != "complete"):
            return False
        key = (spec.model or DEFAULT_MODEL, spec.dtype or DEFAULT_DTYPE)
        if key not in models:
            models[key] = load_model(*key)[0]
        model, tasks = models[key], load_tasks(spec)[0]
        method = get_method(spec.method or DEFAULT_METHOD, **spec.hyperparameters)
        method.setup(model, tasks)  # (setting up only checks the model against the method)
        read_run(directory, run_settings(model, tasks, method, spec.training_config(), spec.evaluation_config()))
        return True
    except EllaError:  # a file missing or unreadable, other settings: the run's own process says which
        return False


def _report(spec: RunSpec, title: str, tasks, model, tokenizer, method, rng, result: SequenceResult,
            output_dir: Path, sequence_files: list[str | None]) -> None:
    """Plot, keep the model if asked (with what continuing needs), and print the matrix and metrics."""
    plot = plot_matrix(result, output_dir / "accuracy_matrix.png", title=title)
    if spec.save_model:
        record = {**json.loads((output_dir / RESULTS).read_text()), "sequence_files": sequence_files}
        save_run_model(model, tokenizer, output_dir / "model", record, method.state_dict(), rng)
    kind = "Accuracy" if all(t.metric == "exact_match" for t in tasks) else "Score"
    scoring = scoring_description(result.eval_mode, {t.name: t.metric for t in tasks})
    print(f"\n{kind} (%) after each task; evaluation: {scoring}; "
          f"{', '.join(f'{t.name} {len(t.test)}' for t in tasks)} test examples")
    print(format_matrix(result))
    print(format_metrics(result))
    if result.validation:
        print(format_validation(result))
    print(f"results: {output_dir / 'results.json'}  heat-map: {plot}")


def quiet_libraries() -> None:
    """ella shows its own progress; the libraries' deprecation notices and bars are not actionable here."""
    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def main() -> int:
    """Run the spec given as JSON on standard input (how ``ella bench`` starts each run in a process of its own)."""
    quiet_libraries()
    try:
        run(RunSpec.from_dict(json.loads(sys.stdin.read())))
    except EllaError as e:
        print(f"ella: error: {e}", file=sys.stderr)
        return 2
    return 0

"""The ``ella`` command: ``ella run`` learns a task sequence and prints the accuracy matrix; ``ella methods``
lists the methods. Every method's hyper-parameters become options of ``ella run`` automatically."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import time
import typing
import warnings
from pathlib import Path

from .bench import run_suite
from .checkpoint import check_output_dir, run_status
from .data import BENCHMARK_ORDERS, load_cl_benchmark, load_task_sequence
from .engine import MIXED_PRECISION, EvaluationConfig, TrainingConfig, make_accelerator, run_sequence
from .errors import EllaError
from .evaluation import EVAL_MODES
from .methods import METHODS, get_method
from .models import BUILTIN_MODELS, DTYPES, load_model, save_model
from .report import format_matrix, format_metrics, plot_matrix, write_report

def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _argument_type(parse: typing.Callable) -> typing.Callable:
    """argparse shows an ArgumentTypeError's own message (ella's says what is wrong and how to fix it)."""
    def convert(text: str):
        try:
            return parse(text)
        except EllaError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def _method_hyperparameters() -> dict[str, tuple[dataclasses.Field, typing.Callable, dict[str, object]]]:
    """Every registered method's config fields: name -> (field, parser, {method that has it: its default})."""
    options: dict[str, tuple[dataclasses.Field, typing.Callable, dict[str, object]]] = {}
    for method_name, cls in sorted(METHODS.items()):
        hints = typing.get_type_hints(cls.config_class)
        for f in dataclasses.fields(cls.config_class):
            parse = f.metadata.get("parse") or hints[f.name]
            options.setdefault(f.name, (f, parse, {}))[2][method_name] = f.default
    return options


def _defaults(defaults: dict[str, object]) -> str:
    """'ella, inclora: 8' or, where the methods differ, 'ella: 30000.0; jumplora: 0.0'."""
    if len(set(map(repr, defaults.values()))) == 1:
        return f"{', '.join(defaults)}; default: {next(iter(defaults.values()))}"
    return "; ".join(f"{method}: {default}" for method, default in defaults.items())


class DefaultsFormatter(argparse.HelpFormatter):
    """Shows an option's default unless its help already says it, or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        if "default" in help or action.default in (None, False, argparse.SUPPRESS):
            return help
        return f"{help} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ella", description="Continual learning of language models.")
    commands = parser.add_subparsers(dest="command")

    run = commands.add_parser(
        "run", help="learn a sequence of tasks and print the accuracy matrix",
        description="Train a model on a sequence of tasks, one after another, with a continual-learning method; "
                    "after each task evaluate every task of the sequence and print the accuracy matrix, OA, BWT, "
                    "FWT and forgetting. Writes results.json, the method's state and a heat-map to --output-dir.",
        formatter_class=DefaultsFormatter)
    run.set_defaults(handler=command_run)
    model = run.add_argument_group("model")
    model.add_argument("--model", default="smollm2-135m",
                       help="a Hugging Face id, a local model directory, or a built-in name: "
                            + "; ".join(f"{k} ({v})" for k, v in BUILTIN_MODELS.items()))
    model.add_argument("--dtype", default="float32", choices=list(DTYPES),
                       help="dtype of the weights (compute runs in --mixed-precision)")

    data = run.add_argument_group("tasks")
    data.add_argument("--benchmark", default="standard", choices=list(BENCHMARK_ORDERS),
                      help="standard (CL benchmark, 4 tasks, orders 1-3), long (15 tasks, orders 4-6), superni "
                           "(15 tasks, orders 1-2; ROUGE-L / exact match) or trace (8 tasks, order 1; TRACE's "
                           "per-task metrics)")
    data.add_argument("--order", default=None, help="task order of the benchmark (default: its first)")
    data.add_argument("--tasks", type=_names, default=None,
                      help="comma-separated task names of the benchmark, in training order (instead of --order)")
    data.add_argument("--sequence", type=Path, default=None,
                      help="your own task sequence: a JSON file (format: README, 'Your own tasks')")
    data.add_argument("--data-dir", default=None,
                      help="benchmark data directory (default: $ELLA_DATA_DIR, else ../shared/data)")
    data.add_argument("--train-per-task", type=int, default=None, help="training examples per task (default: all)")
    data.add_argument("--test-per-task", type=int, default=None, help="test examples per task (default: all)")

    method = run.add_argument_group("method")
    method.add_argument("--method", default="ella", choices=sorted(METHODS), help="continual-learning method")
    hyper = run.add_argument_group("method hyper-parameters (the methods each applies to are in brackets)")
    for name, (f, parse, owners) in _method_hyperparameters().items():
        hyper.add_argument("--" + name.replace("_", "-"), dest="hp_" + name, type=_argument_type(parse),
                           default=argparse.SUPPRESS,
                           metavar=name.upper(),
                           help=f"{f.metadata['help']} [{_defaults(owners)}]")

    train = run.add_argument_group("training")
    train.add_argument("--epochs", type=int, default=1, help="epochs per task")
    train.add_argument("--lr", type=float, default=None,
                       help="learning rate (default: the method's, 1e-3 for LoRA methods, 5e-5 for seqft)")
    train.add_argument("--batch-size", type=int, default=8,
                       help="examples per micro-batch over all processes (each process trains on its share)")
    train.add_argument("--grad-accum", type=int, default=1,
                       help="micro-batches per optimiser step (the step's loss is the mean over all their answer "
                            "tokens)")
    train.add_argument("--max-length", type=int, default=512,
                       help="max tokens of prompt + answer; longer inputs are truncated")
    train.add_argument("--warmup-ratio", type=float, default=0.1,
                       help="linear warm-up over this fraction of each task's steps, then a constant rate")
    train.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    train.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off)")
    train.add_argument("--mixed-precision", default="auto", choices=MIXED_PRECISION,
                       help="auto: bf16 where the CPU/GPU supports it, else fp32")
    train.add_argument("--seed", type=int, default=42, help="seed of subsampling, initialisation and shuffling")

    evaluate = run.add_argument_group("evaluation")
    evaluate.add_argument("--eval-mode", default="generate", choices=list(EVAL_MODES),
                          help="; ".join(f"{k}: {v}" for k, v in EVAL_MODES.items()))
    evaluate.add_argument("--eval-batch-size", type=int, default=16, help="evaluation batch size")
    evaluate.add_argument("--max-new-tokens", type=int, default=None,
                          help="generation length (default: the task's longest answer + 4 tokens)")
    evaluate.add_argument("--no-zero-shot", action="store_true",
                          help="skip evaluating the base model before training (FWT is then not reported)")

    output = run.add_argument_group("output")
    output.add_argument("--output-dir", type=Path, default=None,
                        help="where results go (default: runs/<method>-<timestamp>)")
    output.add_argument("--overwrite", action="store_true", help="replace a run already in --output-dir")
    output.add_argument("--resume", action="store_true",
                        help="continue the interrupted run in --output-dir after its last finished task (same "
                             "options); a finished run is shown, not repeated")
    output.add_argument("--label", default=None, help="the run's name in reports (default: the method)")
    output.add_argument("--save-model", action="store_true",
                        help="also save the final model (adapters merged) to OUTPUT_DIR/model")

    methods = commands.add_parser("methods", help="list the continual-learning methods and their hyper-parameters")
    methods.set_defaults(handler=command_methods)

    bench = commands.add_parser(
        "bench", help="run methods x orders x seeds from a suite file, then write the table and the report",
        description="Run every run of a suite file (TOML: methods, orders, seeds, sweeps, shared `ella run` "
                    "options; format in the README) one after another. Finished runs are skipped and interrupted "
                    "ones resumed, so the same command continues a suite after a crash.")
    bench.add_argument("suite", type=Path, help="the suite file, e.g. benchmarks/standard_smollm2.toml")
    bench.set_defaults(handler=command_bench)

    report = commands.add_parser(
        "report", help="a Markdown and a self-contained HTML report over finished runs",
        description="Collect every finished run (results.json) under the given directories into report.md "
                    "(figures beside it) and report.html (figures embedded): OA/BWT/FWT per method and order, "
                    "costs, heat-maps, each task's accuracy across the sequence, ELLA's diagnostics.")
    report.add_argument("runs", nargs="+", type=Path, help="run directories or directories holding runs")
    report.add_argument("--output-dir", type=Path, default=None, help="where to write (default: the first RUNS)")
    report.set_defaults(handler=command_report)
    return parser


def command_methods(args: argparse.Namespace) -> int:
    options = _method_hyperparameters()
    width = max(map(len, METHODS)) + 2
    for name, cls in sorted(METHODS.items()):
        print(f"{name:{width}s}{cls.summary}")
        flags = [f"--{o.replace('_', '-')} {owners[name]}" for o, (_, _, owners) in options.items() if name in owners]
        print(" " * width + f"lr {cls.default_learning_rate:g}" + ("; " + "  ".join(flags) if flags else ""))
    return 0


def command_bench(args: argparse.Namespace) -> int:
    print(f"report: {run_suite(args.suite)}")
    return 0


def command_report(args: argparse.Namespace) -> int:
    print(f"report: {write_report(args.runs, args.output_dir or args.runs[0])}")
    return 0


def command_run(args: argparse.Namespace) -> int:
    hyperparameters = {k[3:]: v for k, v in vars(args).items() if k.startswith("hp_")}
    owners = _method_hyperparameters()
    foreign = [k for k in hyperparameters if args.method not in owners[k][2]]
    if foreign:
        raise EllaError(", ".join("--" + k.replace("_", "-") for k in foreign) +
                        f" does not apply to method {args.method}; `ella methods` lists each method's options")
    method = get_method(args.method, **hyperparameters)
    training = TrainingConfig(epochs=args.epochs, learning_rate=args.lr, batch_size=args.batch_size,
                              grad_accum=args.grad_accum, max_length=args.max_length, warmup_ratio=args.warmup_ratio,
                              weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm,
                              seed=args.seed, mixed_precision=args.mixed_precision)
    evaluation = EvaluationConfig(mode=args.eval_mode, batch_size=args.eval_batch_size,
                                  max_new_tokens=args.max_new_tokens, zero_shot=not args.no_zero_shot)
    tasks, source, order = _load_tasks(args)
    if args.resume and args.output_dir is None:
        raise EllaError("--resume continues the run in --output-dir: name that directory")
    output_dir = args.output_dir or Path("runs") / f"{args.method}-{time.strftime('%Y%m%d-%H%M%S')}"
    check_output_dir(output_dir, args.resume, args.overwrite)  # before the model loads; run_sequence claims it
    accelerator = make_accelerator(training)  # one process, or one per device under `accelerate launch`
    if args.resume and args.save_model and run_status(output_dir) == "complete":
        raise EllaError(f"the run in {output_dir} finished earlier and its final model was not kept; "
                        "run it again with --overwrite --save-model")

    load_start = time.perf_counter()
    model, tokenizer = load_model(args.model, args.dtype)
    if accelerator.is_main_process:
        print(f"ella: {args.method} on {args.model}, {source}: {len(tasks)} tasks "
              f"({', '.join(t.name for t in tasks)}); model loaded in {time.perf_counter() - load_start:.1f} s",
              file=sys.stderr)
    run_info = {"command": "ella " + shlex.join(args.argv), "label": args.label or args.method, "model": args.model,
                "dtype": args.dtype, "tasks_from": source, "benchmark": None if args.sequence else args.benchmark,
                "order": order, "seed": args.seed, "train_per_task": args.train_per_task,
                "test_per_task": args.test_per_task}
    model, result = run_sequence(model, tokenizer, tasks, method, training, evaluation, output_dir, run_info,
                                 accelerator, resume=args.resume, overwrite=args.overwrite)
    if accelerator.is_main_process:  # the others hold the same model and result
        _report_run(args, tasks, model, tokenizer, result, output_dir)
    # Every process stays until the run is written, then leaves the process group: a process that exits while
    # still in it can abort in the collective backend's teardown.
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


def _report_run(args: argparse.Namespace, tasks, model, tokenizer, result, output_dir: Path) -> None:
    """Plot, keep the model if asked, and print the matrix and metrics."""
    plot = plot_matrix(result, output_dir / "accuracy_matrix.png", title=f"{args.method} on {args.model}")
    if args.save_model:
        save_model(model, tokenizer, output_dir / "model")
    if all(t.metric == "exact_match" for t in tasks):
        kind, scoring = "Accuracy", EVAL_MODES[result.eval_mode]
    else:
        kind, scoring = "Score", f"{result.eval_mode}, " + ", ".join(f"{t.name} {t.metric}" for t in tasks)
    print(f"\n{kind} (%) after each task; evaluation: {scoring}; "
          f"{', '.join(f'{t.name} {len(t.test)}' for t in tasks)} test examples")
    print(format_matrix(result))
    print(format_metrics(result))
    print(f"results: {output_dir / 'results.json'}  heat-map: {plot}")


def _load_tasks(args: argparse.Namespace):
    sample = dict(train_per_task=args.train_per_task, test_per_task=args.test_per_task, seed=args.seed)
    if args.sequence is not None:
        if args.tasks or args.order:
            raise EllaError("--sequence brings its own tasks: drop --tasks / --order")
        return load_task_sequence(args.sequence, **sample), str(args.sequence), None
    if args.tasks and args.order:
        raise EllaError("give either --order or --tasks, not both")
    order = args.order or BENCHMARK_ORDERS[args.benchmark][0]
    tasks = load_cl_benchmark(args.benchmark, order, args.tasks, args.data_dir, **sample)
    if args.tasks:
        return tasks, f"CL benchmark tasks {','.join(args.tasks)}", None
    return tasks, f"{args.benchmark} order {order}", str(order)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    if args.command is None:
        parser.print_help()
        return 2
    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecations inside the libraries, not actionable
    transformers.utils.logging.disable_progress_bar()  # ella shows its own progress
    transformers.utils.logging.set_verbosity_error()
    try:
        return args.handler(args)
    except EllaError as e:
        print(f"ella: error: {e}", file=sys.stderr)
        return 2


"""The ``ella`` command: ``ella run`` learns a task sequence and prints the accuracy matrix; ``ella methods``
lists the methods. Every method's hyper-parameters become options of ``ella run`` automatically."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path

from .bench import run_suite, suite_status
from .errors import EllaError
from .methods import METHODS, PARTS, get_method, method_fields
from .methods.base import parse_names
from .provenance import portable_command
from .report import write_report
from .runspec import DEFAULT_METHOD, RunSpec, quiet_libraries, run

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
    """Every registered method's hyper-parameters: name -> (field, parser, {method that has it: its default})."""
    options: dict[str, tuple[dataclasses.Field, typing.Callable, dict[str, object]]] = {}
    for method_name in sorted(METHODS):
        for name, (f, parse, default) in method_fields(method_name).items():
            options.setdefault(name, (f, parse, {}))[2][method_name] = default
    return options


def _defaults(defaults: dict[str, object]) -> str:
    """'ella, inclora; default: 8' or, where the methods differ, 'ella: 30000.0; jumplora: 0.0'."""
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

    run_parser = commands.add_parser(
        "run", help="learn a sequence of tasks and print the accuracy matrix",
        description="Train a model on a sequence of tasks, one after another, with a continual-learning method; "
                    "after each task evaluate every task of the sequence and print the accuracy matrix, OA, BWT, "
                    "FWT and forgetting. Writes results.json, the method's state and a heat-map to --output-dir.",
        formatter_class=DefaultsFormatter)
    run_parser.set_defaults(handler=command_run)
    groups: dict[str, argparse._ArgumentGroup] = {}
    hints = typing.get_type_hints(RunSpec)
    for f in dataclasses.fields(RunSpec):
        if "group" not in f.metadata:  # hyperparameters (below, one option each) and the recorded command
            continue
        if f.metadata["group"] not in groups:
            groups[f.metadata["group"]] = run_parser.add_argument_group(f.metadata["group"])
        group = groups[f.metadata["group"]]
        flag, help = "--" + f.name.replace("_", "-"), f.metadata["help"]
        if hints[f.name] is bool:
            group.add_argument(flag, action="store_true", help=help)
            continue
        kind = next(k for k in typing.get_args(hints[f.name]) or (hints[f.name],) if k is not type(None))
        parse = parse_names if typing.get_origin(kind) is list else kind
        group.add_argument(flag, *f.metadata["aliases"], type=parse, default=f.default, choices=f.metadata["choices"],
                           help=help)
        if f.name == "method":
            hyper = run_parser.add_argument_group(
                "method hyper-parameters (the methods each applies to are in brackets)")
            for name, (hf, hparse, owners) in _method_hyperparameters().items():
                hyper.add_argument("--" + name.replace("_", "-"), dest="hp_" + name, type=_argument_type(hparse),
                                   default=argparse.SUPPRESS, metavar=name.upper(),
                                   help=f"{hf.metadata['help']} [{_defaults(owners)}]")

    methods = commands.add_parser("methods", help="list the continual-learning methods and their hyper-parameters")
    methods.set_defaults(handler=command_methods)

    bench = commands.add_parser(
        "bench", help="run methods x orders x seeds from a suite file, then write the table and the report",
        description="Run every run of a suite file (TOML: methods, orders, seeds, sweeps or grids chosen by "
                    "validation ([select]), shared `ella run` options; format in the README), one after another or "
                    "--jobs at a time. Finished runs are skipped and interrupted ones resumed, so the same command "
                    "continues a suite after a crash.")
    bench.add_argument("suite", type=Path, help="the suite file, e.g. benchmarks/standard_smollm2.toml")
    bench.add_argument("--jobs", type=int, default=1,
                       help="runs at once, each with its share of the CPU threads and, where there are as many GPUs, "
                            "a GPU of its own; their output goes to OUTPUT_DIR/logs/ (default: 1, one after another, "
                            "output here)")
    bench.add_argument("--status", action="store_true",
                       help="print where the suite stands, each run's state read from its files, and run nothing")
    bench.set_defaults(handler=command_bench)

    report = commands.add_parser(
        "report", help="a Markdown and a self-contained HTML report over finished runs",
        description="Collect every finished run (results.json) under the given directories into report.md "
                    "(figures beside it) and report.html (figures embedded): OA/BWT/FWT per method and order, "
                    "paired differences against a reference method with 95%% confidence intervals, costs, "
                    "heat-maps, each task's accuracy across the sequence, ELLA's diagnostics.")
    report.add_argument("runs", nargs="+", type=Path, help="run directories or directories holding runs")
    report.add_argument("--output-dir", type=Path, default=None, help="where to write (default: the first RUNS)")
    report.add_argument("--reference", default="ella",
                        help="the method (run label) every other one is compared with, paired by order and seed "
                             "(default: ella)")
    report.set_defaults(handler=command_report)
    return parser


def command_methods(args: argparse.Namespace) -> int:
    width = max(map(len, [*METHODS, *PARTS])) + 2
    print("methods (--method NAME):")
    for name, recipe in sorted(METHODS.items()):
        fields = method_fields(name)
        print(f"  {name:{width}s}{recipe.summary}")
        flags = [f"--{option.replace('_', '-')} {default}" for option, (_, _, default) in fields.items()]
        lr = get_method(name).default_learning_rate
        print(" " * (width + 2) + f"= {'+'.join(recipe.parts)}; lr {lr:g}" + ("; " + "  ".join(flags) if flags else ""))
    print("\nparts (--method PART+PART+...: one update part, any regularisers, at most one data policy):")
    for name, part in sorted(PARTS.items(), key=lambda item: (item[1].kind, item[0])):
        print(f"  {name:{width}s}{part.kind}: {part.summary}")
    return 0


def command_bench(args: argparse.Namespace) -> int:
    print(suite_status(args.suite) if args.status else f"report: {run_suite(args.suite, args.jobs)}")
    return 0


def command_report(args: argparse.Namespace) -> int:
    print(f"report: {write_report(args.runs, args.output_dir or args.runs[0], args.reference)}")
    return 0


def command_run(args: argparse.Namespace) -> int:
    hyperparameters = {k[3:]: v for k, v in vars(args).items() if k.startswith("hp_")}
    method = args.method or DEFAULT_METHOD
    # continuing without --method, the run checks the hyper-parameters against the continued run's method
    known = hyperparameters if args.continue_run and not args.method else method_fields(method)
    foreign = [k for k in hyperparameters if k not in known]
    if foreign:
        raise EllaError(", ".join("--" + k.replace("_", "-") for k in foreign) +
                        f" does not apply to method {method}; `ella methods` lists each method's options")
    settings = {f.name: getattr(args, f.name) for f in dataclasses.fields(RunSpec) if "group" in f.metadata}
    run(RunSpec(**settings, hyperparameters=hyperparameters, command=portable_command(args.argv)))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    if args.command is None:
        parser.print_help()
        return 2
    quiet_libraries()
    try:
        return args.handler(args)
    except EllaError as e:
        print(f"ella: error: {e}", file=sys.stderr)
        return 2


"""``ella bench SUITE.toml``: methods x orders x seeds from one config file, each run a ``RunSpec`` run as ``ella run``
runs it, in a process of its own.

A suite file (TOML)::

    output_dir = "runs/standard-smollm2"      # one directory per run: <label>/order<o>-seed<s>
    model = "smollm2-135m"
    benchmark = "standard"
    orders = [1, 2, 3]
    seeds = [42]
    methods = ["seqlora", "inclora", "olora", "ella", "jumplora-ella", "sculpting"]

    [run]                                      # any `ella run` option, for every run
    train_per_task = 128                       # (tasks = ["dbpedia", "agnews"] instead of orders: one sequence)
    test_per_task = 64
    eval_mode = "rank"

    [method.ella]                              # a method's hyper-parameters, and lr, its learning rate
    lam = 1e5

    [[sweep]]                                  # extra runs: every combination of the listed values
    method = "ella"
    lam = [1e3, 1e4, 1e5, 1e6]
    orders = [1]                               # (optional) only these orders

Or, instead of ``[[sweep]]``, hyper-parameters chosen by validation, never by test: ``[select]`` gives every method
of ``methods`` a grid (its hyper-parameters and ``lr``), each with the same number of settings, the budget; every
setting runs on every order and seed, and the report shows the test numbers of each method's setting with the
highest validation OA (mean over those runs; a tie goes to the setting listed first). The runs need
``validation_per_task`` in ``[run]``::

    [select]
    ella = {lam = [3e3, 3e4]}
    sculpting = {lr = [1e-4, 1e-5]}

and optionally, the selected setting of each method then runs on more orders and seeds, without the validation
sample (the runs the selection already made are not repeated; the report shows the selected settings' runs on all
of them)::

    [selected]
    orders = [1, 2, 3]
    seeds = [42, 43, 44]

The runs share the zero-shot row: a task's zero-shot accuracy is measured by the first run that needs it and
read by the others from ``<output_dir>/zero_shot_cache`` (see ``ella.zero_shot_cache``; the runs at one seed
evaluate the same base model on the same test examples). The runs go one sequence (order and seed) at a time, each
with every method's run on it, so that a suite stopped part-way compares its methods on the same sequences. A run
that is complete is not repeated and an interrupted one is resumed (both only if their settings still match the
suite's; a complete run's are checked in this process, with one model load for all), so re-running the suite after
a crash picks up where it stopped. ``jobs`` > 1 runs that many runs at once, each with its share of the CPU threads
(and a GPU of its own where there are as many GPUs as jobs): on 2 AMD EPYC cores two one-thread runs trained 1.33x
the steps per second of one two-thread run. At the end the suite's table is printed and the report written (see
``ella.report``).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import queue
import subprocess
import sys
import threading
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from statistics import mean

import torch

from .checkpoint import RESULTS, holds_run, latest_record, run_status
from .errors import EllaError
from .methods import get_method, method_fields
from .provenance import portable_path
from .report import SELECTION, write_report
from .runspec import RunSpec, finished_runs

ZERO_SHOT_CACHE = "zero_shot_cache"  # in the output directory: the runs' zero-shot accuracies, each measured once
SUITE_KEYS = {"output_dir", "model", "benchmark", "orders", "seeds", "methods", "run", "method", "sweep", "select",
              "selected", "data_dir", "dtype"}


@dataclass
class SuiteRun:
    label: str
    order: int
    seed: int
    spec: RunSpec  # what the run's own process runs
    after_selection: bool = False  # a [selected] run: it runs only if validation selects its setting

    @property
    def output_dir(self) -> Path:
        return self.spec.output_dir


def _parsed(method: str, hyperparameters: dict) -> dict:
    """Hyper-parameters as the method takes them: a string where the option parses one (``lam = "0,3e4"``,
    ``target_modules = "q_proj,v_proj"``) is parsed as on the command line."""
    fields = method_fields(method)
    return {name: fields[name][1](value) if isinstance(value, str) and name in fields and fields[name][1] is not str
            else value for name, value in hyperparameters.items()}


def _label(method: str, values: dict) -> str:
    """The run's name, e.g. ``ella-lam30000.0``; a name that ends in a digit is followed by ``_``, so that O-LoRA's
    λ1 = 0.5 reads ``olora-lambda1_0.5``, not ``olora-lambda10.5``."""
    return method + "".join(f"-{key}{'_' if key[-1].isdigit() else ''}{value}" for key, value in values.items())


def _combinations(grid: dict) -> list[dict]:
    """Every combination of a grid's lists, in the order listed (the last name varying fastest)."""
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def _grids(path: Path, suite: dict) -> dict[str, dict]:
    """The checked ``[select]`` table: method -> {name: [values]}, every method of ``methods`` with one, all with the
    same number of settings."""
    select, methods = suite["select"], suite.get("methods", [])
    if "sweep" in suite:
        raise EllaError(f"{path}: [select] chooses each method's setting by validation and [[sweep]] would report "
                        "the test numbers of every setting: put the swept values in [select] and drop [[sweep]]")
    if not isinstance(select, dict) or not all(isinstance(grid, dict) for grid in select.values()):
        raise EllaError(f"{path}: [select] gives each method a grid, e.g. ella = {{lam = [3e3, 3e4]}}")
    missing, extra = [m for m in methods if m not in select], [m for m in select if m not in methods]
    if missing or extra:
        problems = ([f"no grid for {', '.join(missing)}"] if missing else []) + \
            ([f"not in methods: {', '.join(extra)}"] if extra else [])
        raise EllaError(f"{path}: [select] needs a grid for each method of methods = [...] and no other (every "
                        f"method is chosen the same way): {'; '.join(problems)}")
    for method, grid in select.items():
        allowed = sorted(method_fields(method)) + ["lr"]
        for name, values in grid.items():
            if name not in allowed:
                raise EllaError(f"{path}: [select.{method}] {name}: not a hyper-parameter of {method} (it has: "
                                f"{', '.join(allowed)})")
            if not isinstance(values, list) or not values:
                raise EllaError(f"{path}: [select.{method}] {name} = {values!r}: give a non-empty list of values")
    budgets = {method: len(_combinations(grid)) for method, grid in select.items()}
    if len(set(budgets.values())) > 1:
        raise EllaError(f"{path}: [select] gives every method the same budget, the same number of settings; now: "
                        + ", ".join(f"{method} {n}" for method, n in budgets.items()))
    return select


def _then(path: Path, suite: dict, orders: list, seeds: list) -> tuple[list, list] | None:
    """The checked ``[selected]`` table: the (orders, seeds) the selected settings run on after the selection; what
    it leaves out is the suite's ``orders`` / ``seeds``."""
    if "selected" not in suite:
        return None
    then = suite["selected"]
    if "select" not in suite:
        raise EllaError(f"{path}: [selected] runs the settings that [select] chooses on more orders and seeds; "
                        "add a [select] table or drop [selected]")
    if not isinstance(then, dict) or not then or set(then) - {"orders", "seeds"}:
        raise EllaError(f"{path}: [selected] takes orders = [...] and/or seeds = [...] (got {then!r})")
    if "orders" in then and "tasks" in suite.get("run", {}):
        raise EllaError(f"{path}: [run] tasks = [...] names the sequence itself; drop orders from [selected]")
    for key, values in then.items():
        if not isinstance(values, list) or not values or not all(isinstance(v, int) for v in values):
            raise EllaError(f"{path}: [selected] {key} = {values!r}: give a non-empty list of whole numbers")
    return then.get("orders", orders), then.get("seeds", seeds)


def _split_lr(values: dict) -> tuple[dict, dict]:
    """A method's settings as (its hyper-parameters, run settings of its own): ``lr`` is the run's learning rate,
    which a suite may set per method, not a field of the method's config."""
    return {k: v for k, v in values.items() if k != "lr"}, ({"lr": values["lr"]} if "lr" in values else {})


def _sequence_major(runs: list[SuiteRun]) -> list[SuiteRun]:
    """The runs grouped by (order, seed), each group in the suite's order of methods and settings: a suite stopped
    part-way has its methods on the same sequences, the pairs that ``ella report`` compares."""
    first: dict[tuple, int] = {}
    for run in runs:
        first.setdefault((run.order, run.seed), len(first))
    return sorted(runs, key=lambda run: first[run.order, run.seed])  # (stable: the method order stays)


def load_suite(path: str | Path) -> tuple[dict, list[SuiteRun]]:
    """The suite's settings and its runs, checked (methods, hyper-parameters) before anything runs."""
    path = Path(path)
    if not path.is_file():
        raise EllaError(f"suite file not found: {path}")
    try:
        suite = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise EllaError(f"{path}: malformed TOML ({e})") from None
    unknown = set(suite) - SUITE_KEYS
    if unknown:
        raise EllaError(f"{path}: unknown keys {sorted(unknown)}; allowed: {', '.join(sorted(SUITE_KEYS))}")
    if "output_dir" not in suite:
        raise EllaError(f"{path}: set output_dir, the directory that receives the runs")
    root = (path.parent / suite["output_dir"]).resolve() if not Path(suite["output_dir"]).is_absolute() \
        else Path(suite["output_dir"])
    orders, seeds = suite.get("orders", [1]), suite.get("seeds", [42])
    for key, value in (("orders", orders), ("seeds", seeds), ("methods", suite.get("methods", []))):
        if not isinstance(value, list) or len(set(map(str, value))) != len(value):
            raise EllaError(f"{path}: {key} must be a list of distinct values ({key} = [...]), not {value!r}")
    swept_methods = {sweep.get("method") for sweep in suite.get("sweep", [])}
    unused = set(suite.get("method", {})) - set(suite.get("methods", [])) - swept_methods
    if unused:
        raise EllaError(f"{path}: [method.{sorted(unused)[0]}] sets a method that no run uses: name it in "
                        "methods = [...] or a [[sweep]], or fix its spelling")
    options = suite.get("run", {})
    if "tasks" in options and "orders" in suite:
        raise EllaError(f"{path}: [run] tasks = [...] names the sequence itself; drop orders = [...]")
    # (label, method, hyper-parameters, run settings of its own, orders)
    variants: list[tuple[str, str, dict, dict, list]] = []
    grids = _grids(path, suite) if "select" in suite else {}
    for method in suite.get("methods", []):
        base, base_own = _split_lr(suite.get("method", {}).get(method, {}))
        if method not in grids:
            variants.append((method, method, base, base_own, orders))
            continue
        for values in _combinations(grids[method]):
            hyperparameters, own = _split_lr(values)
            variants.append((_label(method, values), method, {**base, **hyperparameters}, {**base_own, **own},
                             orders))
    for sweep in suite.get("sweep", []):
        sweep = dict(sweep)
        method = sweep.pop("method", None)
        sweep_orders = sweep.pop("orders", orders)
        if method is None:
            raise EllaError(f"{path}: every [[sweep]] needs a method")
        fixed = {k: v for k, v in sweep.items() if not isinstance(v, list)}
        swept = {k: v for k, v in sweep.items() if isinstance(v, list)}
        base = {**suite.get("method", {}).get(method, {}), **fixed}
        for combination in itertools.product(*swept.values()):
            values = dict(zip(swept, combination))
            hyperparameters, own = _split_lr({**base, **values})
            variants.append((_label(method, values), method, hyperparameters, own, sweep_orders))
    if not variants:
        raise EllaError(f"{path}: list at least one method in methods = [...] or a [[sweep]]")
    shared = {"model": suite.get("model", "smollm2-135m"), "benchmark": suite.get("benchmark", "standard"),
              **{k: suite[k] for k in ("data_dir", "dtype") if k in suite}, "zero_shot_cache": root / ZERO_SHOT_CACHE,
              **options, "command": f"ella bench {portable_path(path.absolute())}"}

    def suite_run(label: str, method: str, hyperparameters: dict, own: dict, order: int, seed: int,
                  after_selection: bool = False) -> SuiteRun:
        where = root / label / f"{'tasks' if 'tasks' in options else f'order{order}'}-seed{seed}"
        if after_selection:  # the choice is made: no validation sample (the training sample is the same without)
            own = {**own, "validation_per_task": 0}
        try:  # an unknown setting or method, or a bad hyper-parameter, fails now, not hours into the suite
            spec = RunSpec.from_dict({**shared, **own, **({} if "tasks" in options else {"order": order}),
                                      "seed": seed, "method": method, "label": label, "output_dir": where,
                                      "hyperparameters": _parsed(method, hyperparameters)})
            get_method(method, **spec.hyperparameters)
        except (EllaError, TypeError) as e:
            raise EllaError(f"{path}: {e}") from None
        if grids and not after_selection and spec.validation_per_task < 1:
            raise EllaError(f"{path}: [select] chooses by validation OA, and the runs have no validation "
                            "sample: set validation_per_task = N in [run] (N examples per task, drawn from "
                            "each task's training split outside its training sample)")
        return SuiteRun(label, order, seed, spec, after_selection)

    runs = _sequence_major([suite_run(label, method, hyperparameters, own, order, seed)
                            for label, method, hyperparameters, own, variant_orders in variants
                            for order in variant_orders for seed in seeds])
    then = _then(path, suite, orders, seeds)
    if then:  # every setting's candidate runs; run_suite runs the selected setting's only
        then_orders, then_seeds = then
        runs += _sequence_major([suite_run(label, method, hyperparameters, own, order, seed, after_selection=True)
                                 for label, method, hyperparameters, own, _ in variants
                                 for order in then_orders for seed in then_seeds
                                 if order not in orders or seed not in seeds])
    labels = [r.output_dir for r in runs]
    if len(set(labels)) != len(labels):
        raise EllaError(f"{path}: two runs would share a directory; give sweeps distinct values")
    return {**suite, "output_dir": root}, runs


def run_suite(path: str | Path, jobs: int = 1) -> Path:
    """Run (or resume, or skip) every run of the suite, ``jobs`` at a time; write the table and the report; return
    the report."""
    if jobs < 1:
        raise EllaError(f"--jobs {jobs}: run at least one run at a time")
    suite, runs = load_suite(path)
    first = [run for run in runs if not run.after_selection]
    _run_each(first, "", suite, path, jobs)
    if "select" in suite:
        selection = select_settings(suite["select"], first)
        chosen = {choice["selected"] for choice in selection["methods"].values()}
        then = [run for run in runs if run.after_selection and run.label in chosen]
        if "selected" in suite:  # the selected settings' runs: the selection's own and the further ones
            selected = [run for run in first if run.label in chosen] + then
            selection["selected_settings_on"] = {"orders": sorted({run.spec.order for run in selected}, key=str),
                                                 "seeds": sorted({run.seed for run in selected})}
        # written before the selected settings' further runs, so that a report in between shows no other setting
        (suite["output_dir"] / SELECTION).write_text(json.dumps(selection, indent=1))
        _run_each(then, "selected ", suite, path, jobs)
    else:  # a selection left from an earlier version of the suite would hide runs from the report
        (suite["output_dir"] / SELECTION).unlink(missing_ok=True)
    return write_report([suite["output_dir"]], suite["output_dir"])


def suite_status(path: str | Path) -> str:
    """Where the suite stands, read from its files: each run's state, then the counts. Nothing runs, and a finished
    run's settings are not checked against the suite's (``ella bench`` does that)."""
    suite, runs = load_suite(path)
    first = [run for run in runs if not run.after_selection]
    stages = [("", first)]
    further = [run for run in runs if run.after_selection]
    if further and all(run_status(run.output_dir) == "complete" for run in first):
        chosen = {choice["selected"] for choice in select_settings(suite["select"], first)["methods"].values()}
        stages.append(("selected ", [run for run in further if run.label in chosen]))
    lines, counts = [], []
    for stage, stage_runs in stages:
        states = [_state(run) for run in stage_runs]
        lines += [f"[{stage}{index}/{len(stage_runs)}] {_name(run, suite)}: {state}"
                  for index, (run, state) in enumerate(zip(stage_runs, states), 1)]
        complete = sum(state.startswith("complete") for state in states)
        started = sum(state != "not started" for state in states) - complete
        kind = "further " if stage else "selection " if "select" in suite else ""
        counts.append(f"{complete} of {len(stage_runs)} {kind}runs complete, {started} started and not finished")
    if len(stages) == 1 and further:  # which settings run further is known once the selection is complete
        selected_further = len(further) // len(_combinations(next(iter(suite["select"].values()))))
        counts.append(f"then the selected settings' {selected_further} further runs")
    return "\n".join(lines + ["; ".join(counts)])


def _state(run: SuiteRun) -> str:
    """'complete: OA ...', 'k of T tasks done' or 'not started', from the run's files."""
    status = run_status(run.output_dir)
    if status is None:
        return "not started"
    if status == "complete" and (run.output_dir / RESULTS).is_file():
        return f"complete: {_summary(run)}"
    record = latest_record(run.output_dir)
    if record is None or "tasks_done" not in record or "tasks" not in record:
        return "started, no task finished"
    return f"{record['tasks_done']} of {len(record['tasks'])} tasks done"


def job_environment(slot: int, jobs: int) -> dict[str, str]:
    """The environment of a run started beside ``jobs - 1`` others: its share of this process's CPU threads, and
    GPU ``slot`` of the visible ones where there is one per job (with fewer, the runs share them)."""
    environment = {**os.environ, "OMP_NUM_THREADS": str(max(1, torch.get_num_threads() // jobs))}
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus >= jobs:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        environment["CUDA_VISIBLE_DEVICES"] = (visible.split(",") if visible else [str(i) for i in range(gpus)])[slot]
    return environment


def _name(run: SuiteRun, suite: dict) -> str:
    sequence = "the named tasks" if "tasks" in suite.get("run", {}) else f"order {run.order}"
    return f"{run.label}, {sequence}, seed {run.seed}"


def _summary(run: SuiteRun) -> str:
    """A finished run in one line: its test OA and BWT, and its validation OA where it has one."""
    record = json.loads((run.output_dir / RESULTS).read_text())
    test, validation = record["metrics"], record.get("validation", {}).get("metrics")
    bwt = "" if test["BWT"] is None else f", BWT {test['BWT']:+.1f}"
    return f"OA {test['OA']:.1f}{bwt}" + (f" (validation OA {validation['OA']:.1f})" if validation else "")


def _run_each(runs: list[SuiteRun], stage: str, suite: dict, path, jobs: int = 1) -> None:
    """Skip each run that finished with the suite's settings (``finished_runs``, checked here); run or resume each
    other one in a process of its own, so that its peak memory is its own and nothing one run leaves allocated
    reaches the next. Resuming, the run checks that its settings still match and trains only what is missing. With
    ``jobs`` > 1, that many at once (``job_environment``), each one's output in ``<output_dir>/logs/``; after a
    failure no further run starts, and the suite stops once the running ones end."""
    slots, failures, stopping = queue.SimpleQueue(), [], threading.Event()
    for slot in range(jobs):
        slots.put(slot)

    finished = finished_runs([run.spec for run in runs])
    for index, (run, done) in enumerate(zip(runs, finished), 1):
        if done:
            print(f"[{stage}{index}/{len(runs)}] {_name(run, suite)}: complete, not repeated: {_summary(run)}",
                  flush=True)

    def one(index: int, run: SuiteRun) -> None:
        if stopping.is_set():
            return
        status = run_status(run.output_dir)
        log = suite["output_dir"] / "logs" / f"{run.label}-{run.output_dir.name}.log" if jobs > 1 else None
        print(f"[{stage}{index}/{len(runs)}] {_name(run, suite)}: "
              + {"complete": "complete; its own process checks its settings and files",
                 "running": "resuming", None: "starting"}[status]
              + (f" (output: {portable_path(log)})" if log else ""), flush=True)
        spec = dataclasses.replace(run.spec, resume=holds_run(run.output_dir))
        child = [sys.executable, "-c", "import sys, ella.runspec; sys.exit(ella.runspec.main())"]
        slot = slots.get()
        try:
            if log is None:
                exit_status = subprocess.run(child, input=spec.to_json(), text=True).returncode
            else:
                log.parent.mkdir(parents=True, exist_ok=True)
                with open(log, "a") as output:  # a resumed run's log keeps what it wrote before
                    exit_status = subprocess.run(child, input=spec.to_json(), text=True, stdout=output,
                                                 stderr=subprocess.STDOUT, env=job_environment(slot, jobs)).returncode
                print(f"[{stage}{index}/{len(runs)}] {_name(run, suite)}: "
                      + (f"stopped (exit status {exit_status})" if exit_status else f"done: {_summary(run)}"),
                      flush=True)
        finally:
            slots.put(slot)
        if exit_status:
            failures.append((_name(run, suite), exit_status, log))
            stopping.set()

    left = [(index, run) for index, (run, done) in enumerate(zip(runs, finished), 1) if not done]
    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(one, [index for index, _ in left], [run for _, run in left]))
    if failures:
        name, exit_status, log = failures[0]
        where = "is above" if log is None else f"ends its output, {portable_path(log)}"
        others = f" ({len(failures) - 1} more stopped too)" if len(failures) > 1 else ""
        raise EllaError(f"the run {name} stopped (exit status {exit_status}; its message {where}){others}. The "
                        f"finished runs are kept: fix the cause and run `ella bench {path}` again to go on from "
                        "there (a run made with other settings than the suite's: move its directory away, and the "
                        "suite runs it again)")


def select_settings(grids: dict[str, dict], runs: list[SuiteRun]) -> dict:
    """Each method's setting with the highest validation OA, the mean over its runs (every order and seed); on a tie,
    the setting listed first. What ``ella report`` needs to show the chosen settings only and say how they were
    chosen."""
    methods = {}
    for method, grid in grids.items():
        settings = []
        for values in _combinations(grid):
            label = _label(method, values)
            records = [json.loads((run.output_dir / RESULTS).read_text()) for run in runs if run.label == label]
            oa = [record["validation"]["metrics"]["OA"] for record in records]
            settings.append({"label": label, "values": values, "validation_OA": mean(oa), "runs": len(oa)})
        best = max(settings, key=lambda setting: setting["validation_OA"])  # max keeps the first of equals
        methods[method] = {"grid": grid, "settings": settings, "selected": best["label"]}
    return {"metric": "validation OA", "validation_per_task": runs[0].spec.validation_per_task,
            "orders": sorted({run.spec.order for run in runs}, key=str), "seeds": sorted({run.seed for run in runs}),
            "methods": methods}

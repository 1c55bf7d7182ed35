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

    [method.ella]                              # a method's hyper-parameters
    lam = 1e5

    [[sweep]]                                  # extra runs: every combination of the listed values
    method = "ella"
    lam = [1e3, 1e4, 1e5, 1e6]
    orders = [1]                               # (optional) only these orders

A run that is complete is not repeated and an interrupted one is resumed (both only if their settings still match
the suite's), so re-running the suite after a crash picks up where it stopped. At the end the suite's table is
printed and the report written (see ``ella.report``).
"""

from __future__ import annotations

import dataclasses
import itertools
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import run_status
from .errors import EllaError
from .methods import get_method, method_fields
from .provenance import portable_path
from .runspec import RunSpec

SUITE_KEYS = {"output_dir", "model", "benchmark", "orders", "seeds", "methods", "run", "method", "sweep",
              "data_dir", "dtype"}


@dataclass
class SuiteRun:
    label: str
    order: int
    seed: int
    spec: RunSpec  # what the run's own process runs

    @property
    def output_dir(self) -> Path:
        return self.spec.output_dir

    @property
    def hyperparameters(self) -> dict:
        return self.spec.hyperparameters


def _parsed(method: str, hyperparameters: dict) -> dict:
    """Hyper-parameters as the method takes them: a string where the option parses one (``lam = "0,3e4"``,
    ``target_modules = "q_proj,v_proj"``) is parsed as on the command line."""
    fields = method_fields(method)
    return {name: fields[name][1](value) if isinstance(value, str) and name in fields and fields[name][1] is not str
            else value for name, value in hyperparameters.items()}


def _label(method: str, values: dict) -> str:
    return method + "".join(f"-{key}{value}" for key, value in values.items())


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
    options = suite.get("run", {})
    if "tasks" in options and "orders" in suite:
        raise EllaError(f"{path}: [run] tasks = [...] names the sequence itself; drop orders = [...]")
    variants: list[tuple[str, str, dict, list]] = []
    for method in suite.get("methods", []):
        variants.append((method, method, dict(suite.get("method", {}).get(method, {})), orders))
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
            variants.append((_label(method, values), method, {**base, **values}, sweep_orders))
    if not variants:
        raise EllaError(f"{path}: list at least one method in methods = [...] or a [[sweep]]")
    shared = {"model": suite.get("model", "smollm2-135m"), "benchmark": suite.get("benchmark", "standard"),
              **{k: suite[k] for k in ("data_dir", "dtype") if k in suite}, **options,
              "command": f"ella bench {portable_path(path.absolute())}"}
    runs = []
    for label, method, hyperparameters, variant_orders in variants:
        for order in variant_orders:
            for seed in seeds:
                where = root / label / f"{'tasks' if 'tasks' in options else f'order{order}'}-seed{seed}"
                try:  # an unknown setting or method, or a bad hyper-parameter, fails now, not hours into the suite
                    spec = RunSpec.from_dict({**shared, **({} if "tasks" in options else {"order": order}),
                                              "seed": seed, "method": method, "label": label, "output_dir": where,
                                              "hyperparameters": _parsed(method, hyperparameters)})
                    get_method(method, **spec.hyperparameters)
                except (EllaError, TypeError) as e:
                    raise EllaError(f"{path}: {e}") from None
                runs.append(SuiteRun(label, order, seed, spec))
    labels = [r.output_dir for r in runs]
    if len(set(labels)) != len(labels):
        raise EllaError(f"{path}: two runs would share a directory; give sweeps distinct values")
    return {**suite, "output_dir": root}, runs


def run_suite(path: str | Path) -> Path:
    """Run (or resume, or skip) every run of the suite; write the table and the report; return the report."""
    from .report import write_report

    suite, runs = load_suite(path)
    for index, run in enumerate(runs, 1):
        status = run_status(run.output_dir)
        sequence = "the named tasks" if "tasks" in suite.get("run", {}) else f"order {run.order}"
        print(f"[{index}/{len(runs)}] {run.label}, {sequence}, seed {run.seed}: "
              + {"complete": "complete, not repeated", "running": "resuming", None: "starting"}[status], flush=True)
        # Each run in its own process, so its peak memory is its own and nothing one run leaves allocated reaches
        # the next. Resuming, the run checks that the settings still match and trains only what is missing.
        spec = dataclasses.replace(run.spec, resume=status is not None)
        child = [sys.executable, "-c", "import sys, ella.runspec; sys.exit(ella.runspec.main())"]
        exit_status = subprocess.run(child, input=spec.to_json(), text=True).returncode
        if exit_status:
            raise EllaError(f"the run {run.label}, {sequence}, seed {run.seed} stopped (exit status {exit_status}; its "
                            f"message is above). The finished runs are kept: fix the cause and run `ella bench {path}` "
                            "again to go on from there")
    return write_report([suite["output_dir"]], suite["output_dir"])

"""Reading results: the accuracy matrix as a table and a heat-map, and ``ella report``, a Markdown and a
self-contained HTML page over many runs (the papers' table, costs, heat-maps, per-task curves, ELLA's diagnostics).
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from statistics import mean, median, stdev

from .checkpoint import PROGRESS, RESULTS
from .comparison import paired_difference, verdict
from .engine import SequenceResult
from .errors import EllaError
from .provenance import describe_hardware

COMPARISON_NOTE = ("Each difference is a method's run minus the reference's at the same order and seed (the same "
                   "examples). 'runs': Student's t over those paired differences (seeds and orders vary; the pairs "
                   "taken as independent, though the orders of a seed share its examples); 'test examples': a paired "
                   "bootstrap over each task's test examples, drawn once for every pair tested on them (2000 "
                   "resamples; the trained models fixed). Significant: the interval over runs excludes 0 (over test "
                   "examples with one pair).")
SELECTION = "selection.json"  # in a suite's output directory: which setting of each grid validation chose (bench.py)


def format_matrix(result: SequenceResult) -> str:
    """Rows: zero-shot, then after each task; columns: the tasks; cells: accuracy in %, – where not measured (a
    continued run's earlier rows for the tasks added later, and their zero-shot accuracy)."""
    names = result.tasks
    rows = ([("zero-shot", result.zero_shot)] if result.zero_shot is not None else [])
    rows += [(f"after {i + 1}: {names[i]}", row) for i, row in enumerate(result.matrix)]
    first = max(len(label) for label, _ in rows)
    widths = [max(6, len(name)) for name in names]
    lines = [" " * first + "  " + "  ".join(name.rjust(w) for name, w in zip(names, widths))]
    for label, row in rows:
        lines.append(label.ljust(first) + "  " + "  ".join(("–" if v is None else f"{v:.1f}").rjust(w)
                                                           for v, w in zip(row, widths)))
    return "\n".join(lines)


def format_metrics(result: SequenceResult) -> str:
    summary = result.metrics()
    if summary is None:
        return f"{len(result.matrix)} of {len(result.tasks)} tasks done: no metrics yet"

    def show(name: str, signed: bool = False) -> str:
        value = summary[name]
        return f"{name} n/a" if value is None else f"{name} {value:+.1f}" if signed else f"{name} {value:.1f}"

    measured = sum(v is not None for v in result.zero_shot or [])
    fwt = show("FWT", signed=True) + ("" if summary["FWT"] is None else " (vs zero-shot)" if measured == len(
        result.tasks) else f" (vs zero-shot, over the {measured} tasks that have one)")
    return "  ".join([show("OA"), show("BWT", signed=True), fwt, show("forgetting")])


def format_validation(result: SequenceResult) -> str:
    """The validation samples' OA and BWT, and the final row, of a finished run."""
    summary = result.validation_metrics()
    bwt = "n/a" if summary["BWT"] is None else f"{summary['BWT']:+.1f}"
    final = "  ".join(f"{name} {value:.1f}" for name, value in zip(result.tasks, result.validation[-1]))
    return f"validation (apart from the test examples): OA {summary['OA']:.1f}  BWT {bwt}  (final row: {final})"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw_matrix(ax, result: SequenceResult, title: str) -> None:
    """The accuracy matrix (zero-shot row on top when present) as a heat-map on ``ax``."""
    rows = ([result.zero_shot] if result.zero_shot is not None else []) + result.matrix
    labels = (["zero-shot"] if result.zero_shot is not None else []) + \
        [f"after {i + 1}: {name}" for i, name in enumerate(result.tasks[:len(result.matrix)])]
    image = ax.imshow([[float("nan") if v is None else v for v in row] for row in rows], vmin=0, vmax=100,
                      cmap="viridis", aspect="auto")  # an unmeasured cell (None) stays blank
    ax.set_xticks(range(len(result.tasks)), result.tasks, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), labels)
    for i, row in enumerate(rows):
        for j, value in enumerate(row):
            if value is None:
                continue
            ax.text(j, i, f"{value:.0f}", ha="center", va="center", color="white" if value < 60 else "black",
                    fontsize=8)
    ax.set_title(title, fontsize=10)
    return image


def plot_matrix(result: SequenceResult, path: str | Path, title: str = "") -> Path:
    """Heat-map of one run's accuracy matrix, saved as PNG."""
    plt = _pyplot()
    n = len(result.tasks)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * n, 1.4 + 0.5 * (len(result.matrix) + 1)))
    image = draw_matrix(ax, result, title or f"accuracy (%), {result.eval_mode}")
    ax.set_xlabel("evaluated task")
    fig.colorbar(image, ax=ax, fraction=0.04)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------------------
# ella report


def collect_runs(paths: list[str | Path]) -> list[dict]:
    """Every complete run (results.json) under ``paths``, with its directory and label."""
    runs = []
    for root in map(Path, paths):
        if not root.exists():
            raise EllaError(f"no such run directory: {root}")
        for path in sorted([root / RESULTS] if (root / RESULTS).is_file() else root.rglob(RESULTS)):
            if PROGRESS in path.relative_to(root).parts:  # a commit's copy of its run's record
                continue
            record = json.loads(path.read_text())
            if record.get("status") != "complete":
                print(f"ella report: skipping the unfinished run in {path.parent}")
                continue
            record["directory"] = path.parent
            record["label"] = record["run"].get("label") or record["method"]["name"]
            runs.append(record)
    if not runs:
        raise EllaError(f"no finished run (results.json with status complete) under {', '.join(map(str, paths))}")
    return runs


def _protocol(run: dict) -> tuple:
    """What runs must share to be averaged and paired: the model, the benchmark, the sizes, the evaluation."""
    info, training = run["run"], run["training_config"]
    return (info.get("model"), info.get("benchmark"), info.get("train_per_task"), info.get("test_per_task"),
            training["epochs"], training["batch_size"] * training.get("grad_accum", 1), training["max_length"],
            run["evaluation"]["description"], run["evaluation_config"].get("schedule", "full"))


def check_comparable(runs: list[dict]) -> None:
    """One protocol, and one run per method, sequence and seed: a report averages and pairs its runs."""
    protocols = _by(runs, _protocol)
    if len(protocols) > 1:
        examples = "; ".join(f"{group[0]['directory']} ({len(group)} runs)" for group in protocols.values())
        raise EllaError("these runs were made under different protocols (model, benchmark, examples per task, "
                        f"epochs, batch, max length or evaluation), which a report cannot average: {examples}. "
                        "Report each protocol's runs on their own")
    for (label, order, seed), group in _by(runs, lambda r: (r["label"], str(r["run"].get("order")),
                                                            r["run"].get("seed"))).items():
        if len(group) > 1:
            raise EllaError(f"{label} has {len(group)} runs of {_sequence(order)}, seed {seed} "
                            f"({', '.join(str(r['directory']) for r in group)}): report one of them")


def _by(runs: list[dict], key) -> dict:
    groups: dict = {}
    for run in runs:
        groups.setdefault(key(run), []).append(run)
    return groups


def _sequence(order) -> str:
    """How a table or figure names a run's task sequence: its order, or "the named tasks" (--tasks, --sequence)."""
    return "the named tasks" if order is None or str(order) == "None" else f"order {order}"


def _cell(values: list[float], signed: bool = False, spread: bool = True) -> str:
    """The mean (± the standard deviation when there are several values and ``spread``)."""
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    text = f"{mean(values):+.1f}" if signed else f"{mean(values):.1f}"
    return text + (f" ± {stdev(values):.1f}" if spread and len(values) > 1 else "")


def _mean_over_orders(runs: list[dict], metric: str) -> float | None:
    """The mean over the sequences of each sequence's mean over seeds (None: never measured)."""
    per_order = [[r["metrics"][metric] for r in members if r["metrics"][metric] is not None]
                 for members in _by(runs, lambda r: str(r["run"].get("order"))).values()]
    per_order = [mean(values) for values in per_order if values]
    return mean(per_order) if per_order else None


def results_table(runs: list[dict]) -> tuple[list[str], list[list[str]]]:
    """The papers' table: per method and order OA, BWT, FWT (mean over seeds), and their average over orders."""
    orders = sorted({str(run["run"].get("order")) for run in runs})
    header = ["method"] + [f"{metric} ({_sequence(o)})"
                           for o in orders for metric in ("OA", "BWT", "FWT")] + ["OA avg", "BWT avg", "FWT avg"]
    rows = []
    for label, group in _by(runs, lambda r: r["label"]).items():
        by_order = _by(group, lambda r: str(r["run"].get("order")))
        row = [label]
        for order in orders:
            members = by_order.get(order, [])
            row += [_cell([r["metrics"][m] for r in members], signed=m != "OA") for m in ("OA", "BWT", "FWT")]
        row += [_cell([value] if value is not None else [], signed=m != "OA", spread=False)
                for m in ("OA", "BWT", "FWT") for value in [_mean_over_orders(group, m)]]
        rows.append(row)
    return header, rows


def _machine(run: dict) -> str:
    return describe_hardware(run["hardware"]) if "hardware" in run else "not recorded"


def cost_table(runs: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Per method, the median over its runs (a run slowed by other work on the machine, or paused and resumed,
    does not move it) of the training and evaluation time, the whole run's time (the zero-shot row included, where
    the run measured it), peak memory and the CL state kept. Where the runs were made on several kinds of machine,
    a method's runs on each kind make a row of their own (times from different CPUs are not one sample), its
    machine numbered as in ``describe``."""
    machines = list(_by(runs, _machine))
    several = len(machines) > 1
    header = ["method"] + (["machine"] if several else []) + [
        "runs", "train (s)", "evaluation (s)", "total (s)", "peak memory (MB)", "CL state (MB)"]
    rows = []
    for (label, machine), group in _by(runs, lambda r: (r["label"], _machine(r))).items():
        rows.append([label] + ([f"({machines.index(machine) + 1})"] if several else []) + [
            str(len(group)),
            f"{median(sum(log.get('train_seconds', 0) for log in r['task_logs']) for r in group):.0f}",
            f"{median(sum(r['eval_seconds']) for r in group):.0f}",
            f"{median(r['total_seconds'] for r in group):.0f}",
            f"{median(r['peak_memory']['bytes'] for r in group) / 2 ** 20:,.0f}",
            f"{median(r.get('method_state_bytes', 0) for r in group) / 2 ** 20:.2f}"])
    return header, sorted(rows, key=lambda row: row[:2])


def diagnostics_table(runs: list[dict]) -> tuple[list[str], list[list[str]]] | None:
    """ELLA's mechanism per task, for the runs that logged it (see ELLA.report)."""
    header = ["run", "task", "λ", "⟨ΔW_t, W_past⟩", "update energy in top-10% |W_past| coords"]
    rows = []
    for run in runs:
        for log in run["task_logs"]:
            d = log.get("diagnostics")
            if d:
                rows.append([f"{run['label']}, {_sequence(run['run'].get('order'))}, seed {run['run'].get('seed')}",
                             log["task"], f"{d['lambda']:g}", f"{d['interference']:.3g}",
                             f"{100 * d['update_energy_in_high_energy_coordinates']:.1f}%"])
    return (header, rows) if rows else None


def comparison_table(runs: list[dict], reference: str) -> tuple[tuple[list[str], list[list[str]]], list[str]] | None:
    """Every other method − ``reference`` in OA and BWT, paired by order and seed (see ``ella.comparison``): the
    table and one sentence per difference. None when no method has a run paired with the reference's."""
    def interval(bounds):
        return "–" if bounds is None else f"[{bounds[0]:+.1f}, {bounds[1]:+.1f}]"

    header = ["method", "pairs"] + [f"{m}{part}" for m in ("ΔOA", "ΔBWT")
                                    for part in ("", " 95% CI, runs", " 95% CI, test examples", " significant")]
    rows, sentences = [], []
    for label in _by(runs, lambda r: r["label"]):
        result = None if label == reference else paired_difference(runs, label, reference)
        if result is None:
            continue
        row = [label, str(result["pairs"])]
        for metric in ("OA", "BWT"):
            d = result[metric]
            if d is None:
                row += ["–"] * 4
                continue
            row += [f"{d['difference']:+.1f}", interval(d["over_runs"]), interval(d["over_examples"]),
                    {True: "yes", False: "no", None: "–"}[d["significant"]]]
            sentences.append(verdict(label, reference, metric, result))
        rows.append(row)
    return ((header, rows), sentences) if rows else None


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def figures(runs: list[dict]) -> dict[str, bytes]:
    """PNG figures: OA and BWT per method; heat-maps per method and order; each task's accuracy across the
    sequence."""
    plt = _pyplot()
    out = {}

    def save(name: str, fig) -> None:
        buffer = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buffer, format="png", dpi=110)
        plt.close(fig)
        out[name] = buffer.getvalue()

    labels = list(_by(runs, lambda r: r["label"]))
    groups = _by(runs, lambda r: r["label"])
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(labels)), 3.6))
    xs = range(len(labels))
    oa, bwt = ([_mean_over_orders(groups[label], metric) for label in labels] for metric in ("OA", "BWT"))
    bwt = [float("nan") if value is None else value for value in bwt]  # no bar where BWT was not measured
    ax.bar([x - 0.2 for x in xs], oa, width=0.4, label="OA")
    ax.bar([x + 0.2 for x in xs], bwt, width=0.4, label="BWT")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xticks(list(xs), labels, rotation=30, ha="right")
    ax.set_ylabel("accuracy points")
    ax.set_title("OA and BWT (mean over orders of the mean over seeds)")
    ax.legend()
    save("oa_bwt.png", fig)

    orders = sorted({str(r["run"].get("order")) for r in runs})
    first_seed = {(r["label"], str(r["run"].get("order"))): r for r in reversed(runs)}  # one run per cell
    n_tasks = max(len(r["tasks"]) for r in runs)
    fig, axes = plt.subplots(len(labels), len(orders), squeeze=False,
                             figsize=(3.0 + 0.75 * n_tasks * len(orders), 1.2 + (0.35 * n_tasks + 0.8) * len(labels)))
    for i, label in enumerate(labels):
        for j, order in enumerate(orders):
            run = first_seed.get((label, order))
            axes[i][j].set_axis_off() if run is None else draw_matrix(
                axes[i][j], SequenceResult.from_record(run), f"{label}, {_sequence(order)}")
    save("heatmaps.png", fig)

    for order in orders:
        members = [first_seed[(label, order)] for label in labels if (label, order) in first_seed]
        fig, axes = plt.subplots(1, len(members), squeeze=False, sharey=True, figsize=(3.2 * len(members), 3.2))
        for ax, run in zip(axes[0], members):
            steps = range(1, len(run["accuracy_matrix"]) + 1)
            for j, task in enumerate(run["tasks"]):
                ax.plot(steps, [float("nan") if row[j] is None else row[j] for row in run["accuracy_matrix"]],
                        marker="o", markersize=3, label=task)
            ax.set_title(run["label"], fontsize=10)
            ax.set_xlabel("after task")
            ax.set_xticks(list(steps))
        axes[0][0].set_ylabel("accuracy (%)")
        axes[0][-1].legend(fontsize=7, loc="best")
        save(f"tasks_across_sequence_{'named_tasks' if order == 'None' else 'order' + order}.png", fig)
    return out


def read_selections(paths: list[str | Path]) -> list[dict]:
    """The selections ``ella bench`` wrote (``SELECTION``) in the given directories or below them, each with its
    directory (``"directory"``)."""
    found = {path.parent.resolve(): path for root in map(Path, paths)
             for path in ([root / SELECTION] if (root / SELECTION).is_file() else root.rglob(SELECTION))}
    return [{**json.loads(path.read_text()), "directory": directory} for directory, path in sorted(found.items())]


def selected_runs(runs: list[dict], selections: list[dict]) -> list[dict]:
    """The runs less those, under a selection's directory, of the settings that its validation did not select."""
    def passed_over(run: dict) -> bool:
        return any(selection["directory"] in Path(run["directory"]).resolve().parents
                   and any(run["label"] == setting["label"] != method["selected"]
                           for method in selection["methods"].values() for setting in method["settings"])
                   for selection in selections)
    return [run for run in runs if not passed_over(run)]


def describe_selection(selection: dict, runs: list[dict]) -> str:
    """How the settings were chosen, in one paragraph; ``runs``: the report's runs (how many of the selected
    settings' runs are done)."""
    methods = selection["methods"]
    grids = "; ".join(f"{method}: " + ", ".join(f"{name} ∈ {{{', '.join(map(str, values))}}}"
                                                for name, values in choice["grid"].items())
                      for method, choice in methods.items())
    budget = len(next(iter(methods.values()))["settings"])
    candidates = sum(setting["runs"] for choice in methods.values() for setting in choice["settings"])
    on = selection.get("selected_settings_on")
    if on:
        selected = {choice["selected"] for choice in methods.values()}
        done = sum(run["label"] in selected for run in runs)
        planned = len(on["orders"]) * len(on["seeds"]) * len(methods)
        then = (f" The selected settings then run on {', '.join(map(_sequence, on['orders']))} and seed(s) "
                f"{', '.join(map(str, on['seeds']))} ({done} of their {planned} runs done).")
    else:
        then = ""
    return (f"Hyper-parameters selected by validation OA, never by test: for each method, of its grid ({budget} "
            f"settings per method; {grids}) the setting with the highest mean accuracy after the last task on "
            f"{selection['validation_per_task']} validation examples per task (drawn from each task's training "
            f"split, outside its training sample), averaged over {', '.join(map(_sequence, selection['orders']))} "
            f"and seed(s) {', '.join(map(str, selection['seeds']))} ({candidates} runs in all); a tie goes to the "
            "setting listed first in the grid." + then + " The results, costs and figures below are the selected "
            "settings' runs only, on the test examples.")


def selection_table(selection: dict) -> tuple[list[str], list[list[str]]]:
    header = ["method", "setting", "validation OA", "selected"]
    rows = [[method, ", ".join(f"{name} {value}" for name, value in setting["values"].items()),
             f"{setting['validation_OA']:.1f}", "✓" if setting["label"] == choice["selected"] else ""]
            for method, choice in selection["methods"].items() for setting in choice["settings"]]
    return header, rows


def describe(runs: list[dict]) -> str:
    """What was run, from the runs' own records."""
    first = runs[0]
    info, training, evaluation = first["run"], first["training_config"], first["evaluation"]
    per_task = {r["run"].get("validation_per_task") or 0 for r in runs}
    validation = f", {max(per_task)} validation" if max(per_task) else ""
    if validation and 0 in per_task:  # a [selected] suite: its further runs go without
        validation += " (in the selection's runs)"
    on = _by(runs, _machine)
    schedule = first["evaluation_config"].get("schedule", "full")
    schedule = "" if schedule == "full" else f", schedule {schedule} (unmeasured cells blank)"
    machines = "; ".join(f"({number}) {machine} ({len(group)} runs)" if len(on) > 1 else machine
                         for number, (machine, group) in enumerate(on.items(), 1))
    return (f"Model **{info.get('model')}**, {info.get('tasks_from', '').split(' order')[0]} tasks; "
            f"{info.get('train_per_task') or 'all'} training{validation} and {info.get('test_per_task') or 'all'} test "
            f"examples per task, {training['epochs']} epoch(s), batch {training['batch_size']}, max length "
            f"{training['max_length']}; evaluation: {evaluation['description']}{schedule}; mixed precision "
            f"{first['mixed_precision']} on {first['device']}. FWT is measured against the zero-shot accuracy. "
            f"{len(runs)} runs; hardware: {machines}.")


def write_report(paths: list[str | Path], output_dir: str | Path, reference: str = "ella") -> Path:
    """report.md (with its PNG figures beside it) and report.html (figures embedded) in ``output_dir``; every
    method is compared with ``reference``'s runs (paired differences, ``ella.comparison``) where it has some."""
    selections = read_selections(paths)
    runs = selected_runs(collect_runs(paths), selections)
    check_comparable(runs)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    results = results_table(runs)
    tables = [("Hyper-parameters selected by validation", selection_table(selection)) for selection in selections]
    tables += [("Results (the papers' form; ± is the spread over seeds)", results),
               ("Cost per run (medians over a method's runs)", cost_table(runs))]
    notes = {}  # title -> paragraphs under its table
    # a selection suite's runs are labelled by setting: the reference method is its selected setting
    reference = next((choice["selected"] for selection in selections
                      for method, choice in selection["methods"].items() if method == reference), reference)
    comparison = comparison_table(runs, reference)
    if comparison:
        title = f"Paired differences against {reference}"
        tables.append((title, comparison[0]))
        notes[title] = [COMPARISON_NOTE] + comparison[1]
    elif not any(run["label"] == reference for run in runs):
        print(f"ella report: no run of {reference} (--reference), so no paired differences")
    diagnostics = diagnostics_table(runs)
    if diagnostics:
        tables.append(("ELLA's mechanism per task", diagnostics))
    images = figures(runs)
    for name, data in images.items():
        (output_dir / name).write_bytes(data)
    paragraphs = [describe(runs)] + [describe_selection(selection, runs) for selection in selections]
    markdown = ["# ella report", ""] + [line for text in paragraphs for line in (text, "")]
    page = ["<!doctype html><meta charset='utf-8'><title>ella report</title><style>body{font-family:sans-serif;"
            "max-width:1200px;margin:2em auto}table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
            "padding:3px 8px;text-align:right}td:first-child,th:first-child{text-align:left}img{max-width:100%}"
            "</style><h1>ella report</h1>"] + [f"<p>{html.escape(text).replace('**', '')}</p>" for text in paragraphs]
    for title, (header, rows) in tables:
        markdown += [f"## {title}", "", _markdown(header, rows), ""]
        page += [f"<h2>{html.escape(title)}</h2>", _html_table(header, rows)]
        markdown += [line for text in notes.get(title, []) for line in (f"- {text}", "")]
        page += [f"<p>{html.escape(text)}</p>" for text in notes.get(title, [])]
    markdown += ["## Figures", ""]
    page.append("<h2>Figures</h2>")
    for name, data in images.items():
        markdown += [f"![{name}]({name})", ""]
        page.append(f"<p><img alt='{name}' src='data:image/png;base64,{base64.b64encode(data).decode()}'></p>")
    (output_dir / "report.md").write_text("\n".join(markdown))
    (output_dir / "report.html").write_text("\n".join(page))
    print(_markdown(*results))
    return output_dir / "report.md"

"""`ella bench` (suite files, skipping and resuming runs) and `ella report` (Markdown and HTML)."""

import json

import pytest

from ella import EllaError
from ella import RunSpec
from ella.bench import load_suite, run_suite
from ella.cli import main

SUITE = """
output_dir = "suite"
model = "tiny-causal"
benchmark = "standard"
orders = [1, 2]
methods = ["inclora", "ella"]
data_dir = "{data_dir}"

[run]
train_per_task = 2
test_per_task = 2
max_length = 700
eval_mode = "rank"
mixed_precision = "no"

[method.ella]
lam = 10.0

[[sweep]]
method = "ella"
lam = [1.0, 100.0]
orders = [1]
"""


def write_suite(tmp_path, data_dir, text=SUITE):
    path = tmp_path / "suite.toml"
    path.write_text(text.format(data_dir=data_dir))
    return path


def test_suite_expands_methods_orders_and_sweeps(tmp_path, data_dir):
    suite, runs = load_suite(write_suite(tmp_path, data_dir))
    assert [(r.label, r.order) for r in runs] == [("inclora", 1), ("inclora", 2), ("ella", 1), ("ella", 2),
                                                  ("ella-lam1.0", 1), ("ella-lam100.0", 1)]
    assert runs[2].hyperparameters == {"lam": 10.0} and runs[5].hyperparameters == {"lam": 100.0}
    spec = runs[5].spec  # what the run's own process receives, as data
    assert spec.method == "ella" and spec.hyperparameters == {"lam": 100.0} and spec.order == "1"
    assert spec.train_per_task == 2 and spec.eval_mode == "rank" and spec.mixed_precision == "no"
    assert RunSpec.from_dict(json.loads(spec.to_json())) == spec  # survives the trip to the child process
    assert runs[0].output_dir == tmp_path / "suite" / "inclora" / "order1-seed42"


def test_a_suite_of_named_tasks_has_one_sequence(tmp_path, data_dir):
    text = SUITE.replace("orders = [1, 2]\n", "").replace("[run]", "[run]\ntasks = ['CB', 'RTE']")
    suite, runs = load_suite(write_suite(tmp_path, data_dir, text))
    assert [r.output_dir.name for r in runs] == ["tasks-seed42"] * 4
    assert runs[0].spec.order is None and runs[0].spec.tasks == ["CB", "RTE"]


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace('methods = ["inclora", "ella"]', 'methods = ["inclora", "magic"]'), "unknown method 'magic'"),
    (lambda t: t.replace("lam = 10.0", "lam = -1.0"), "non-negative"),
    (lambda t: t.replace('model = "tiny-causal"', 'modle = "tiny-causal"'), "unknown keys \\['modle'\\]"),
    (lambda t: t.replace("orders = [1, 2]", "orders = [1, 2"), "malformed TOML"),
    (lambda t: t.replace("[run]", "[run]\ntasks = ['CB', 'RTE']"), "drop orders"),
    (lambda t: t.replace("train_per_task = 2", "train_per_tsk = 2"), "train_per_tsk: not a run setting"),
    (lambda t: t.replace("train_per_task = 2", "train_per_task = 'two'"), "train_per_task = 'two': expected int"),
    (lambda t: t.replace('eval_mode = "rank"', 'eval_mode = "vote"'), "eval_mode = 'vote': choose one of"),
    (lambda t: t.replace('methods = ["inclora", "ella"]', 'methods = ["inclora", "seqlora+ella"]'),
     "ella penalises each task's own update"),
])
def test_bad_suites(tmp_path, data_dir, edit, message):
    with pytest.raises(EllaError, match=message):
        load_suite(write_suite(tmp_path, data_dir, edit(SUITE)))


@pytest.mark.slow  # each run is a process of its own
def test_bench_runs_skips_finished_runs_and_reports(tmp_path, data_dir, capfd):
    path = write_suite(tmp_path, data_dir, SUITE.split("[[sweep]]")[0])
    report = run_suite(path)
    root = tmp_path / "suite"
    for label in ("inclora", "ella"):
        for order in (1, 2):
            record = json.loads((root / label / f"order{order}-seed42" / "results.json").read_text())
            assert record["status"] == "complete" and record["run"]["label"] == label
    text = report.read_text()
    assert "| inclora |" in text and "| ella |" in text and "OA (order 1)" in text and "OA avg" in text
    assert "Cost per run" in text and "ELLA's mechanism per task" in text
    for figure in ("oa_bwt.png", "heatmaps.png", "tasks_across_sequence_order1.png"):
        assert (root / figure).stat().st_size > 0
    page = (root / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and "<table>" in page  # self-contained

    # a second pass skips the finished runs and resumes the interrupted one (here: one whose checkpoint is lost)
    interrupted = root / "ella" / "order2-seed42" / "results.json"
    record = json.loads(interrupted.read_text())
    record.update(status="running", tasks_done=2, accuracy_matrix=record["accuracy_matrix"][:2],
                  task_logs=record["task_logs"][:2], eval_seconds=record["eval_seconds"][:2])
    interrupted.write_text(json.dumps(record))
    capfd.readouterr()
    with pytest.raises(EllaError, match="the run ella, order 2, seed 42 stopped .* The finished runs are kept"):
        run_suite(path)
    out, err = capfd.readouterr()  # each run is a process of its own: its error reaches the terminal
    assert out.count("complete, not repeated") == 3 and "ella, order 2, seed 42: resuming" in out
    assert "unfinished run without its saved progress" in err


@pytest.mark.slow
def test_bench_refuses_a_finished_run_whose_settings_changed(tmp_path, data_dir, capfd):
    path = write_suite(tmp_path, data_dir, SUITE.split("[[sweep]]")[0].replace('methods = ["inclora", "ella"]',
                                                                              'methods = ["ella"]'))
    run_suite(path)
    path.write_text(path.read_text().replace("lam = 10.0", "lam = 20.0"))
    with pytest.raises(EllaError, match="stopped"):
        run_suite(path)
    assert "other settings (method differ" in capfd.readouterr().err


def test_report_command_on_one_run(sequence_file, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["run", "--model", "tiny-causal", "--sequence", str(sequence_file), "--output-dir", str(run_dir),
                 "--mixed-precision", "no", "--max-length", "64", "--train-per-task", "4"]) == 0
    assert main(["report", str(run_dir)]) == 0
    assert "the named tasks" in (run_dir / "report.md").read_text()
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "no such run directory" in capsys.readouterr().err

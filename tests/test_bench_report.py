"""`ella bench` (suite files, skipping and resuming runs) and `ella report` (Markdown and HTML)."""

import json
from pathlib import Path

import pytest
import torch

from ella import EllaError
from ella import RunSpec
from ella.bench import job_environment, load_suite, run_suite, select_settings, suite_status
from ella.cli import main
from ella.provenance import describe_hardware
from ella.checkpoint import run_status
from ella.report import (collect_runs, cost_table, describe, describe_selection, read_selections,
                          results_table, selected_runs, write_report)

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
    # grouped by sequence, so that a suite stopped part-way has its methods on the same orders and seeds
    assert [(r.label, r.order) for r in runs] == [("inclora", 1), ("ella", 1), ("ella-lam1.0", 1),
                                                  ("ella-lam100.0", 1), ("inclora", 2), ("ella", 2)]
    assert runs[1].spec.hyperparameters == {"lam": 10.0} and runs[3].spec.hyperparameters == {"lam": 100.0}
    spec = runs[3].spec  # what the run's own process receives, as data
    assert spec.method == "ella" and spec.hyperparameters == {"lam": 100.0} and spec.order == "1"
    assert spec.train_per_task == 2 and spec.eval_mode == "rank" and spec.mixed_precision == "no"
    assert RunSpec.from_dict(json.loads(spec.to_json())) == spec  # survives the trip to the child process
    assert runs[0].output_dir == tmp_path / "suite" / "inclora" / "order1-seed42"


def test_a_method_table_and_a_sweep_may_set_a_methods_own_learning_rate(tmp_path, data_dir):
    text = SUITE.replace("[method.ella]\n", "[method.inclora]\nlr = 0.002\n\n[method.ella]\nlr = 0.003\n") \
        .replace("lam = [1.0, 100.0]", "lr = [0.01, 0.02]")
    suite, runs = load_suite(write_suite(tmp_path, data_dir, text))
    by_label = {r.label: r.spec for r in runs if r.order == 1}
    # lr is the run's setting, not a field of the method's config; the sweep's value replaces the table's
    assert by_label["inclora"].lr == 0.002 and by_label["inclora"].hyperparameters == {}
    assert by_label["ella"].lr == 0.003 and by_label["ella"].hyperparameters == {"lam": 10.0}
    assert by_label["ella-lr0.02"].lr == 0.02 and by_label["ella-lr0.02"].hyperparameters == {"lam": 10.0}
    assert [r.spec.lr for r in runs if r.order == 2] == [0.002, 0.003]


def test_a_runs_name_separates_a_name_that_ends_in_a_digit_from_its_value(tmp_path, data_dir):
    text = SUITE.replace('method = "ella"\nlam = [1.0, 100.0]', 'method = "olora"\nlambda1 = [0.5]\nlambda2 = [0.0]')
    suite, runs = load_suite(write_suite(tmp_path, data_dir, text))
    olora = [r for r in runs if r.spec.method == "olora"]
    assert [r.label for r in olora] == ["olora-lambda1_0.5-lambda2_0.0"]  # not olora-lambda10.5-lambda20.0
    assert olora[0].spec.hyperparameters == {"lambda1": 0.5, "lambda2": 0.0}


BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


@pytest.mark.parametrize("suite_file", sorted(p.name for p in BENCHMARKS.glob("*.toml")))
def test_every_committed_suite_loads(suite_file):
    """The suite files under benchmarks/ name known methods and settings, so `ella bench FILE` starts."""
    suite, runs = load_suite(BENCHMARKS / suite_file)
    assert runs and all(run.output_dir.is_relative_to(BENCHMARKS / "results") for run in runs)


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
    (lambda t: t.replace("[method.ella]", "[method.ela]"), r"\[method.ela\] sets a method that no run uses"),
    (lambda t: t.replace("orders = [1, 2]", "orders = 1"), "orders must be a list of distinct values"),
    (lambda t: t.replace("orders = [1, 2]", "orders = [1, 1]"), "orders must be a list of distinct values"),
    (lambda t: t.replace('methods = ["inclora", "ella"]', 'methods = "ella"'), "methods must be a list"),
])
def test_bad_suites(tmp_path, data_dir, edit, message):
    with pytest.raises(EllaError, match=message):
        load_suite(write_suite(tmp_path, data_dir, edit(SUITE)))


SELECT_SUITE = """
output_dir = "suite"
model = "tiny-causal"
data_dir = "{data_dir}"
methods = ["inclora", "ella"]
seeds = [42]

[run]
tasks = ["CB", "RTE"]
train_per_task = 2
test_per_task = 2
validation_per_task = 2
max_length = 700
eval_mode = "rank"
mixed_precision = "no"

[method.ella]
lam = 10.0

[select]
inclora = {{lr = [1e-3, 1e-1]}}
ella = {{lam = [1.0, 100.0]}}
"""


def test_a_selection_suite_runs_every_setting_of_each_grid(tmp_path, data_dir):
    suite, runs = load_suite(write_suite(tmp_path, data_dir, SELECT_SUITE))
    assert [r.label for r in runs] == ["inclora-lr0.001", "inclora-lr0.1", "ella-lam1.0", "ella-lam100.0"]
    assert runs[1].spec.lr == 0.1 and runs[1].spec.hyperparameters == {}  # lr is a run setting, not the method's
    assert runs[3].spec.lr is None and runs[3].spec.hyperparameters == {"lam": 100.0}  # the grid's λ
    assert all(r.spec.validation_per_task == 2 for r in runs)


def test_selected_settings_run_on_more_seeds_after_the_selection(tmp_path, data_dir):
    text = SELECT_SUITE + "\n[selected]\nseeds = [42, 43, 44]\n"
    suite, runs = load_suite(write_suite(tmp_path, data_dir, text))
    settings = ["inclora-lr0.001", "inclora-lr0.1", "ella-lam1.0", "ella-lam100.0"]
    # the selection; then each setting's candidate runs on the seeds it lacks, every method on one seed before the next
    assert [(r.label, r.seed, r.after_selection) for r in runs] == \
        [(label, 42, False) for label in settings] + [(label, seed, True) for seed in (43, 44) for label in settings]
    assert runs[6].spec.hyperparameters == {"lam": 1.0} and runs[5].spec.lr == 0.1
    # the choice made, the further runs need no validation sample (their training sample is the same without)
    assert [r.spec.validation_per_task for r in runs] == [2] * 4 + [0] * 8
    assert runs[6].output_dir == tmp_path / "suite" / "ella-lam1.0" / "tasks-seed43"


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace("validation_per_task = 2\n", ""), "the runs have no validation sample: set "
                                                              "validation_per_task = N in \\[run\\]"),
    (lambda t: t.replace("lam = [1.0, 100.0]", "lam = [1.0, 10.0, 100.0]"),
     "the same budget, the same number of settings; now: inclora 2, ella 3"),
    (lambda t: t.replace("inclora = {{lr = [1e-3, 1e-1]}}\n", ""), "needs a grid for each method.*no grid for inclora"),
    (lambda t: t.replace('methods = ["inclora", "ella"]', 'methods = ["ella"]'), "not in methods: inclora"),
    (lambda t: t.replace("lam = [1.0, 100.0]", "lamb = [1.0, 100.0]"),
     "\\[select.ella\\] lamb: not a hyper-parameter of ella \\(it has: lam, .*lr\\)"),
    (lambda t: t.replace("lam = [1.0, 100.0]", "lam = []"), "lam = \\[\\]: give a non-empty list"),
    (lambda t: t + "\n[[sweep]]\nmethod = 'ella'\nlam = [1.0, 2.0]\n", "drop \\[\\[sweep\\]\\]"),
    (lambda t: t.split("[select]")[0] + "[selected]\nseeds = [43]\n", "add a \\[select\\] table or drop"),
    (lambda t: t + "\n[selected]\nseed = [43]\n", "\\[selected\\] takes orders = \\[...\\] and/or seeds"),
    (lambda t: t + "\n[selected]\nseeds = 43\n", "seeds = 43: give a non-empty list of whole numbers"),
    (lambda t: t + "\n[selected]\norders = [2]\n", "drop orders from \\[selected\\]"),
])
def test_bad_selection_suites_are_refused_before_anything_runs(tmp_path, data_dir, edit, message):
    with pytest.raises(EllaError, match=message):
        load_suite(write_suite(tmp_path, data_dir, edit(SELECT_SUITE)))
    assert not (tmp_path / "suite").exists()


def test_selection_takes_the_highest_mean_validation_oa_and_the_first_of_equals(tmp_path, data_dir):
    suite, runs = load_suite(write_suite(tmp_path, data_dir, SELECT_SUITE.replace("seeds = [42]", "seeds = [1, 2]")))
    validation_oa = {("inclora-lr0.001", 1): 50.0, ("inclora-lr0.001", 2): 70.0,  # mean 60
                     ("inclora-lr0.1", 1): 80.0, ("inclora-lr0.1", 2): 50.0,  # mean 65: chosen
                     ("ella-lam1.0", 1): 40.0, ("ella-lam1.0", 2): 60.0,  # mean 50: chosen, the first of equals
                     ("ella-lam100.0", 1): 50.0, ("ella-lam100.0", 2): 50.0}  # mean 50
    for run in runs:
        run.output_dir.mkdir(parents=True)
        oa = validation_oa[run.label, run.seed]
        (run.output_dir / "results.json").write_text(json.dumps({"validation": {"metrics": {"OA": oa}}}))
    selection = select_settings(suite["select"], runs)
    assert {m: c["selected"] for m, c in selection["methods"].items()} == {"inclora": "inclora-lr0.1",
                                                                         "ella": "ella-lam1.0"}
    assert [s["validation_OA"] for s in selection["methods"]["inclora"]["settings"]] == [60.0, 65.0]
    assert selection["methods"]["ella"]["settings"][1] == {"label": "ella-lam100.0", "values": {"lam": 100.0},
                                                           "validation_OA": 50.0, "runs": 2}
    assert (selection["validation_per_task"], selection["orders"], selection["seeds"]) == (2, [None], [1, 2])


def test_each_job_gets_its_share_of_the_threads_and_a_gpu_where_there_is_one_per_job(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    assert job_environment(0, 2)["OMP_NUM_THREADS"] == "2" and job_environment(0, 8)["OMP_NUM_THREADS"] == "1"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert [job_environment(slot, 2)["CUDA_VISIBLE_DEVICES"] for slot in (0, 1)] == ["3", "5"]
    assert job_environment(1, 3)["CUDA_VISIBLE_DEVICES"] == "3,5"  # fewer GPUs than jobs: the runs share them
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert job_environment(1, 2)["CUDA_VISIBLE_DEVICES"] == "1"


@pytest.mark.slow  # each run is a process of its own
def test_bench_selects_by_validation_and_reports_the_selected_test_numbers_only(tmp_path, data_dir, capfd):
    """Run two at a time (--jobs 2), each run's output in a log of its own."""
    path = write_suite(tmp_path, data_dir, SELECT_SUITE + "\n[selected]\nseeds = [42, 43]\n")
    report = run_suite(path, jobs=2)
    root = tmp_path / "suite"
    assert len(list((root / "logs").glob("*.log"))) == 6
    assert "OA" in (root / "logs" / "ella-lam1.0-tasks-seed42.log").read_text()
    out = capfd.readouterr().out
    assert out.count(": starting (output: ") == 6 and out.count(": done: OA ") == 6
    assert out.count(" (validation OA ") == 4  # the selection's runs; the selected settings' further runs have none
    selection = json.loads((root / "selection.json").read_text())
    for method, labels in (("inclora", ["inclora-lr0.001", "inclora-lr0.1"]),
                           ("ella", ["ella-lam1.0", "ella-lam100.0"])):
        records = [json.loads((root / label / "tasks-seed42" / "results.json").read_text()) for label in labels]
        oa = [record["validation"]["metrics"]["OA"] for record in records]  # one run per setting
        assert [s["validation_OA"] for s in selection["methods"][method]["settings"]] == oa
        chosen = labels[oa.index(max(oa))]  # the first of equals
        assert selection["methods"][method]["selected"] == chosen
        other = labels[1 - labels.index(chosen)]
        text = report.read_text()
        results = text.split("## Results")[1].split("## Cost")[0]
        assert f"| {chosen} |" in results and f"| {other} |" not in results and other not in text.split("## Cost")[1]
        # then the chosen setting alone on seed 43 as well, and the report has both of its runs
        assert (root / chosen / "tasks-seed43" / "results.json").is_file()
        assert not (root / other / "tasks-seed43").exists()
    assert "Hyper-parameters selected by validation OA, never by test" in text
    assert "2 settings per method; inclora: lr ∈ {0.001, 0.1}; ella: lam ∈ {1.0, 100.0}" in text
    assert "on 2 validation examples per task" in text and "the named tasks and seed(s) 42 (4 runs in all)" in text
    assert "The selected settings then run on the named tasks and seed(s) 42, 43 (4 of their 4 runs done)." in text
    paired = text.split(f"## Paired differences against {selection['methods']['ella']['selected']}")[1]
    assert f"\n| {selection['methods']['inclora']['selected']} | 2 |" in paired  # selected settings, 2 seeds
    assert selection["selected_settings_on"] == {"orders": [None], "seeds": [42, 43]}
    assert "a tie goes to the setting listed first" in text
    assert suite_status(path).endswith("\n4 of 4 selection runs complete, 0 started and not finished; 2 of 2 further "
                                       "runs complete, 0 started and not finished")
    assert "2 training, 2 validation (in the selection's runs) and 2 test examples" in text

    # a run that fails stops the suite once the running ones end, and says where its output is
    broken = root / "inclora-lr0.1" / "tasks-seed42" / "results.json"
    broken.write_text(broken.read_text().replace('"status": "complete"', '"status": "running"'))
    with pytest.raises(EllaError, match=r"the run inclora-lr0.1, the named tasks, seed 42 stopped \(exit status 2; its "
                                        r"message ends its output, .*inclora-lr0.1-tasks-seed42.log\)"):
        run_suite(path, jobs=2)
    assert "unfinished run without its saved progress" in (root / "logs" / "inclora-lr0.1-tasks-seed42.log").read_text()
    # the run beside it was complete, checked without a process of its own: its log keeps the first pass's output
    assert (root / "logs" / "inclora-lr0.001-tasks-seed42.log").read_text().count("results: ") == 1


@pytest.mark.slow  # each run is a process of its own
def test_bench_runs_skips_finished_runs_resumes_and_refuses_changed_ones(tmp_path, data_dir, capfd):
    path = write_suite(tmp_path, data_dir, SUITE.split("[[sweep]]")[0])
    report = run_suite(path)
    root = tmp_path / "suite"
    for label in ("inclora", "ella"):
        for order in (1, 2):
            record = json.loads((root / label / f"order{order}-seed42" / "results.json").read_text())
            assert record["status"] == "complete" and record["run"]["label"] == label
            # every cell's per-example scores (2 test examples), what the paired bootstrap resamples
            assert [[len(cell) for cell in row] for row in record["example_scores"]] == [[2] * 4] * 4
            assert [[sum(cell) / 2 for cell in row] for row in record["example_scores"]] == record["accuracy_matrix"]
    # the first run measured the zero-shot row, the others read it: the same accuracy for each task
    first = json.loads((root / "inclora" / "order1-seed42" / "results.json").read_text())
    assert "zero_shot_reused_from" not in first and len(list((root / "zero_shot_cache").glob("*.json"))) == 4
    for label, order in (("inclora", 2), ("ella", 1), ("ella", 2)):
        record = json.loads((root / label / f"order{order}-seed42" / "results.json").read_text())
        assert record["zero_shot_reused_from"] == {task: "…/order1-seed42" for task in first["tasks"]}
        assert dict(zip(record["tasks"], record["zero_shot"])) == dict(zip(first["tasks"], first["zero_shot"]))
    text = report.read_text()
    assert "| inclora |" in text and "| ella |" in text and "OA (order 1)" in text and "OA avg" in text
    paired_section = text.split("## Paired differences against ella")[1].split("\n## ")[0]
    paired = next(line for line in paired_section.splitlines() if line.startswith("| inclora | 2 |"))  # orders 1, 2
    assert "[" in paired.split("|")[5]  # an interval over test examples (the bootstrap) as well as over runs
    assert "inclora's OA " in text and "(95 % CI over runs [" in text
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
    status = suite_status(path)  # read from the files, running nothing
    assert "[1/4] inclora, order 1, seed 42: complete: OA " in status
    assert "[4/4] ella, order 2, seed 42: 2 of 4 tasks done" in status
    assert status.endswith("\n3 of 4 runs complete, 1 started and not finished")
    capfd.readouterr()
    with pytest.raises(EllaError, match="the run ella, order 2, seed 42 stopped .* The finished runs are kept"):
        run_suite(path)
    out, err = capfd.readouterr()  # each run is a process of its own: its error reaches the terminal
    assert out.count("complete, not repeated: OA ") == 3 and "ella, order 2, seed 42: resuming" in out
    assert "results: " not in out  # the finished runs are checked here, without a process of their own to print
    assert "unfinished run without its saved progress" in err

    # a finished run whose settings the suite no longer has is refused, not repeated or overwritten
    path.write_text(path.read_text().replace("lam = 10.0", "lam = 20.0").replace('"inclora", "ella"', '"ella"'))
    with pytest.raises(EllaError, match="the run ella, order 1, seed 42 stopped"):
        run_suite(path)
    assert "other settings (method differ" in capfd.readouterr().err


def test_status_of_a_suite_not_started(tmp_path, data_dir, capsys):
    path = write_suite(tmp_path, data_dir, SELECT_SUITE + "\n[selected]\nseeds = [42, 43, 44]\n")
    assert main(["bench", str(path), "--status"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "[1/4] inclora-lr0.001, the named tasks, seed 42: not started"
    # which settings run on seeds 43 and 44 is known once the selection is complete
    assert lines[-1] == "0 of 4 selection runs complete, 0 started and not finished; then the selected settings' 4 " \
                        "further runs"
    assert not (tmp_path / "suite").exists()  # nothing ran


def test_a_selection_in_progress_says_how_many_of_its_runs_are_done():
    settings = [{"label": f"ella-lam{lam}", "values": {"lam": lam}, "validation_OA": oa, "runs": 1}
                for lam, oa in ((1.0, 60.0), (2.0, 50.0))]
    selection = {"validation_per_task": 2, "orders": ["1"], "seeds": [42], "selected_settings_on":
                 {"orders": ["1", "2"], "seeds": [42, 43]},
                 "methods": {"ella": {"grid": {"lam": [1.0, 2.0]}, "settings": settings, "selected": "ella-lam1.0"}}}
    runs = [{"label": "ella-lam1.0"}, {"label": "ella-lam2.0"}, {"label": "ella-lam1.0"}]  # the passed-over one too
    text = describe_selection(selection, runs)
    assert "averaged over order 1 and seed(s) 42 (2 runs in all)" in text
    assert "then run on order 1, order 2 and seed(s) 42, 43 (2 of their 4 runs done)" in text


def test_hardware_line():
    machine = {"cpu": "AMD EPYC", "cpu_model": "family 25 model 1 stepping 1", "l3_cache": "32 MiB",
               "cpu_instructions": "AVX2", "torch_threads": 1, "gpu": None}
    assert describe_hardware(machine) == "AMD EPYC (family 25 model 1 stepping 1, 32 MiB L3, AVX2), 1 torch thread"
    overridden = {**machine, "mkl_vendor_check": "says Intel (overridden by ella)"}
    assert describe_hardware(overridden) == ("AMD EPYC (family 25 model 1 stepping 1, 32 MiB L3, AVX2, MKL's Intel "
                                             "kernels), 1 torch thread")
    older = {"cpu": "AMD EPYC", "cpu_instructions": "AVX2", "torch_threads": 2, "gpu": "NVIDIA H200"}  # (ella <= 0.5)
    assert describe_hardware(older) == "AMD EPYC (AVX2), 2 torch threads, GPU NVIDIA H200"


def test_cost_per_run_is_the_median_over_a_methods_runs():
    """A run slowed or paused (here 5000 s in all) does not move the median of 100, 110 and 5000 s."""
    def run(total, train, evaluation, megabytes):
        return {"label": "ella", "task_logs": [{"train_seconds": train}], "eval_seconds": [evaluation],
                "total_seconds": total, "peak_memory": {"bytes": megabytes * 2 ** 20}, "method_state_bytes": 2 ** 20}

    header, rows = cost_table([run(100, 60, 30, 2000), run(110, 70, 25, 2100), run(5000, 4000, 900, 2200)])
    assert header[:5] == ["method", "runs", "train (s)", "evaluation (s)", "total (s)"]
    assert rows == [["ella", "3", "70", "30", "110", "2,100", "1.00"]]


def test_cost_per_run_has_a_row_per_kind_of_machine():
    """Times from two CPUs are not one sample: each machine's runs make their own row, numbered as in the header."""
    avx2 = {"cpu": "AMD EPYC", "cpu_instructions": "AVX2", "torch_threads": 1, "gpu": None}
    amx = {**avx2, "cpu": "Intel Xeon", "cpu_instructions": "AMX"}

    def run(label, machine, train):
        return {"label": label, "hardware": machine, "task_logs": [{"train_seconds": train}], "eval_seconds": [10],
                "total_seconds": train + 10, "peak_memory": {"bytes": 2 ** 30}, "method_state_bytes": 0}

    runs = [run("ella", avx2, 300), run("ella", amx, 100), run("ella", avx2, 320), run("inclora", amx, 90)]
    header, rows = cost_table(runs)
    assert header[:4] == ["method", "machine", "runs", "train (s)"]
    assert [row[:4] for row in rows] == [["ella", "(1)", "2", "310"], ["ella", "(2)", "1", "100"],
                                         ["inclora", "(2)", "1", "90"]]
    assert "(1) AMD EPYC (AVX2), 1 torch thread (2 runs); (2) Intel Xeon (AMX), 1 torch thread (2 runs)" in \
        describe([{**r, "run": {"model": "m", "train_per_task": 4, "test_per_task": 4}, "training_config":
                   {"epochs": 1, "batch_size": 2, "max_length": 64}, "evaluation": {"description": "greedy"},
                   "evaluation_config": {}, "mixed_precision": "no", "device": "cpu"} for r in runs])


def test_report_command_on_one_run(sequence_file, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["run", "--model", "tiny-causal", "--sequence", str(sequence_file), "--output-dir", str(run_dir),
                 "--mixed-precision", "no", "--max-length", "64", "--train-per-task", "4"]) == 0
    assert main(["report", str(run_dir)]) == 0
    assert "the named tasks" in (run_dir / "report.md").read_text()
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "no such run directory" in capsys.readouterr().err


def fake_run(directory, label, order=1, seed=42, oa=50.0, batch_size=2):
    """A finished run's results.json with what the report reads before its tables."""
    directory.mkdir(parents=True)
    record = {"status": "complete", "method": {"name": label.split("-")[0]}, "metrics": {"OA": oa, "BWT": -1.0,
              "FWT": 5.0}, "run": {"label": label, "model": "m", "benchmark": "standard", "order": str(order),
              "seed": seed, "train_per_task": 4, "test_per_task": 4},
              "training_config": {"epochs": 1, "batch_size": batch_size, "max_length": 64},
              "evaluation": {"description": "greedy"}, "evaluation_config": {}}
    (directory / "results.json").write_text(json.dumps(record))


def test_a_report_refuses_runs_of_two_protocols_or_two_runs_of_one_sequence_and_seed(tmp_path):
    fake_run(tmp_path / "a" / "ella" / "order1-seed42", "ella")
    fake_run(tmp_path / "b" / "ella" / "order1-seed42", "ella", batch_size=8)
    with pytest.raises(EllaError, match="different protocols .* Report each protocol's runs on their own"):
        write_report([tmp_path], tmp_path / "report")
    fake_run(tmp_path / "c" / "ella" / "order1-seed42", "ella")
    with pytest.raises(EllaError, match="ella has 2 runs of order 1, seed 42"):
        write_report([tmp_path / "a", tmp_path / "c"], tmp_path / "report")


def test_a_commits_copy_of_a_record_is_not_a_run_of_its_own(tmp_path):
    fake_run(tmp_path / "ella" / "order1-seed42", "ella")
    fake_run(tmp_path / "ella" / "order1-seed42" / "progress" / "after-task-2", "ella")  # left by a kill
    assert len(collect_runs([tmp_path])) == 1


def test_a_selection_below_the_reported_directory_drops_its_passed_over_settings_only(tmp_path):
    suite = tmp_path / "suite"
    for label in ("ella-lam1.0", "ella-lam2.0"):
        fake_run(suite / label / "order1-seed42", label)
    fake_run(tmp_path / "other" / "ella-lam2.0" / "order1-seed42", "ella-lam2.0")  # not under the selection
    (suite / "selection.json").write_text(json.dumps({"methods": {"ella": {
        "selected": "ella-lam1.0", "settings": [{"label": "ella-lam1.0"}, {"label": "ella-lam2.0"}]}}}))
    selections = read_selections([tmp_path])
    assert [s["directory"] for s in selections] == [suite.resolve()]
    kept = selected_runs(collect_runs([tmp_path]), selections)
    assert sorted(str(r["directory"].relative_to(tmp_path)) for r in kept) == [
        "other/ella-lam2.0/order1-seed42", "suite/ella-lam1.0/order1-seed42"]


def test_the_average_is_over_orders_of_the_mean_over_seeds(tmp_path):
    """Order 1 has two seeds (60, 62), order 2 one (40): 50.5, not the pooled 54."""
    for order, seed, oa in ((1, 42, 60.0), (1, 43, 62.0), (2, 42, 40.0)):
        fake_run(tmp_path / f"order{order}-seed{seed}", "ella", order, seed, oa)
    header, rows = results_table(collect_runs([tmp_path]))
    assert rows[0][header.index("OA avg")] == "50.5"


def test_a_run_stopped_in_its_first_task_is_started_not_finished(tmp_path):
    assert run_status(tmp_path) is None
    (tmp_path / "progress").mkdir()  # its first save failed, or was killed before its commit
    assert run_status(tmp_path) == "running"

import json
import re

import pytest

from ella.cli import main
from ella.methods import METHODS, PARTS

TINY = ["run", "--model", "tiny-causal", "--train-per-task", "4", "--test-per-task", "2", "--mixed-precision", "no",
        "--max-length", "64"]


def run(*args, capsys):
    """Exit code, stdout and stderr of ``ella ARGS`` (argparse's own errors exit with 2 too)."""
    try:
        code = main(list(args))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_run_prints_the_matrix_and_refuses_to_overwrite(sequence_file, tmp_path, capsys):
    out_dir = tmp_path / "run"
    code, out, _ = run(*TINY, "--sequence", str(sequence_file), "--output-dir", str(out_dir), capsys=capsys)
    assert code == 0
    assert "zero-shot" in out and "after 2: parity" in out and "OA" in out and "FWT" in out
    assert "greedy generation, normalised exact match" in out
    first = (out_dir / "results.json").read_text()
    code, _, err = run(*TINY, "--sequence", str(sequence_file), "--output-dir", str(out_dir), capsys=capsys)
    assert code == 2 and "already holds a run" in err and "--overwrite" in err
    assert (out_dir / "results.json").read_text() == first  # nothing saved was lost
    code, out, _ = run(*TINY, "--sequence", str(sequence_file), "--output-dir", str(out_dir), "--overwrite",
                       "--eval-mode", "rank", capsys=capsys)
    assert code == 0 and "rank classification" in out
    assert json.loads((out_dir / "results.json").read_text())["evaluation"]["mode"] == "rank"


def test_validation_is_evaluated_apart_and_changes_nothing_else(sequence_file, tmp_path, capsys):
    records = {}
    for n in ("0", "3"):
        code, out, _ = run(*TINY, "--sequence", str(sequence_file), "--output-dir", str(tmp_path / n), "--eval-mode",
                           "rank", "--validation-per-task", n, capsys=capsys)
        assert code == 0
        records[n] = json.loads((tmp_path / n / "results.json").read_text())
    plain, validated = records["0"], records["3"]
    assert "validation" not in plain and "validation (apart from the test examples): OA" in out
    for key in ("zero_shot", "accuracy_matrix", "metrics"):  # the same training and test examples
        assert validated[key] == plain[key]
    assert [log["loss_end"] for log in validated["task_logs"]] == [log["loss_end"] for log in plain["task_logs"]]
    a = validated["validation"]["accuracy"]  # after task 1: its own sample; after task 2 (the last): both
    assert a[0][1] is None and None not in (a[0][0], *a[1])
    assert all(round(v * 3 / 100, 6).is_integer() for v in (a[0][0], *a[1]))  # 3 examples: 0, 33.3, 66.7 or 100
    assert validated["validation"]["metrics"] == {"OA": pytest.approx((a[1][0] + a[1][1]) / 2),
                                                  "BWT": a[1][0] - a[0][0]}
    assert [d["validation"] for d in validated["task_details"]] == [3, 3]
    assert validated["run"]["validation_per_task"] == 3


@pytest.mark.parametrize("args, message", [
    (["--validation-per-task", "9"], "colour: .* has 12 training examples, too few for 4 training \\+ 9 validation"),
    (["--lam", "-1"], "λ must be non-negative"),
    (["--lam", "1,2,3"], "3 λ values for 2 tasks"),
    (["--lam", "abc"], "--lam takes a number"),
    (["--method", "seqlora", "--lam", "1"], "--lam does not apply to method seqlora"),
    (["--target-modules", "attn_q"], "attn_q not found.*q_proj"),
    (["--tasks", "CB"], "--sequence brings its own tasks"),
    (["--train-per-task", "0"], "at least 1"),
    (["--batch-size", "0"], "batch_size must be at least 1"),
    (["--max-length", "20"], "leaves no room"),
])
def test_bad_input_is_one_clear_line_and_writes_nothing(sequence_file, tmp_path, capsys, args, message):
    out_dir = tmp_path / "run"
    code, _, err = run(*TINY, "--sequence", str(sequence_file), "--output-dir", str(out_dir), *args, capsys=capsys)
    assert code == 2 and "Traceback" not in err
    last_line = err.strip().splitlines()[-1]
    assert "error:" in last_line and re.search(message, last_line), err
    assert not (out_dir / "results.json").exists()


@pytest.mark.parametrize("args, message", [
    (["--data-dir", "/nonexistent"], "data directory not found"),
    (["--benchmark", "long", "--order", "2"], "order 2 belongs to --benchmark standard"),
    (["--tasks", "dbpedia,nope"], "unknown task"),
])
def test_benchmark_selection_errors(data_dir, tmp_path, capsys, args, message):
    code, _, err = run(*TINY, "--output-dir", str(tmp_path / "run"), *args, capsys=capsys)
    assert code == 2 and message in err


def test_unknown_method_is_one_clear_line_with_the_choices(capsys):
    """A method name is a recipe or parts joined by +, so argparse cannot list the choices: ella checks the name
    (before it needs any data: none is given here) and names the methods and parts."""
    code, _, err = run("run", "--method", "magic", capsys=capsys)
    assert code == 2 and "Traceback" not in err
    last_line = err.strip().splitlines()[-1]
    assert "error: unknown method 'magic'" in last_line and "ella, ewc, inclora" in last_line
    code, _, err = run("run", "--method", "inclora+magic", capsys=capsys)
    assert code == 2 and "'magic' in 'inclora+magic' is neither a part" in err


def test_methods_lists_every_method_with_its_parts_and_hyperparameters(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name, recipe in METHODS.items():
        assert re.search(rf"^  {re.escape(name)} +\S", out, re.M), name
        assert f"= {'+'.join(recipe.parts)}; lr " in out
    for name, part in PARTS.items():
        assert re.search(rf"^  {re.escape(name)} +{part.kind}: ", out, re.M), name
    assert "--lam 30000.0" in out
    assert "= jumplora+ella; lr 0.001" in out and "--w-past dense" in out  # the recipe's own default


def test_help_is_complete(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    for option in ("--model", "--benchmark", "--order", "--sequence", "--method", "--lam", "--lora-r", "--lr",
                   "--eval-mode", "--train-per-task", "--output-dir", "--overwrite", "--mixed-precision"):
        assert option in out


def test_trace_tasks_run_with_their_own_metrics(tmp_path, capsys):
    out_dir = tmp_path / "run"
    code, out, _ = run(*TINY, "--benchmark", "trace", "--tasks", "20Minuten,Py150", "--train-per-task", "2",
                       "--output-dir", str(out_dir), capsys=capsys)
    assert code == 0, out
    scoring = "greedy generation; 20Minuten sari, Py150 edit_similarity"
    assert f"Score (%) after each task; evaluation: {scoring};" in out
    record = json.loads((out_dir / "results.json").read_text())
    assert record["evaluation"]["description"] == scoring  # not "exact match" for tasks scored otherwise
    details = record["task_details"]
    assert [d["metric"] for d in details] == ["sari", "edit_similarity"]

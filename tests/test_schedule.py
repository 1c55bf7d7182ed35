"""Evaluation schedules (which cells a run measures, and the metrics over them, resumed too) and what results.json
records about where a run came from (no machine's absolute path) and what it ran on."""

import json
from pathlib import Path

import pytest
from accelerate.state import AcceleratorState, GradientState

from ella import EllaError, EvaluationConfig, RunSpec, TrainingConfig, get_method, run_sequence
from ella.cli import main
from ella.engine import SequenceResult
from ella.models import tiny_model
from ella.report import format_matrix

from conftest import one_label_task, with_crash_in_second_task

TRAINING = TrainingConfig(batch_size=4, learning_rate=3e-2, warmup_ratio=0.0, mixed_precision="no", max_length=64)
REPOSITORY = Path(__file__).resolve().parents[1]


def run(schedule: str, output_dir: Path | None = None, resume: bool = False) -> SequenceResult:
    """seqft on three one-label tasks with the tiny model. Fully evaluated, its matrix is
    zero-shot [80, 20, 20]; after colour [80, 20, 20]; after parity [80, 80, 20]; after size [80, 20, 80]."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    model, tokenizer = tiny_model()
    tasks = [one_label_task("colour", ["red", "blue"], "red"), one_label_task("parity", ["even", "odd"], "even"),
             one_label_task("size", ["small", "big"], "small")]
    return run_sequence(model, tokenizer, tasks, get_method("seqft"), TRAINING,
                        EvaluationConfig(mode="rank", schedule=schedule), output_dir, resume=resume)[1]


@pytest.fixture(scope="module")
def full() -> SequenceResult:
    return run("full")


def test_the_full_run(full):
    assert full.zero_shot == [80, 20, 20]
    assert full.matrix == [[80, 20, 20], [80, 80, 20], [80, 20, 80]]


def test_diagonal_measures_the_diagonal_and_the_final_row(full):
    result = run("diagonal")
    assert result.zero_shot == [80, 20, 20]  # the zero-shot row stays full
    assert result.matrix == [[80, None, None], [None, 80, None], [80, 20, 80]]  # the full run's cells
    # OA (80 + 20 + 80) / 3; BWT ((80 - 80) + (20 - 80)) / 2; FWT ((80 - 80) + (80 - 20) + (80 - 20)) / 3;
    # forgetting over the diagonal alone: ((80 - 80) + (80 - 20)) / 2
    assert result.metrics() == pytest.approx({"OA": 60, "BWT": -30, "FWT": 40, "forgetting": 30})
    cells = result.to_dict()["metrics_cells"]
    assert "the 2 measured cells on or below the diagonal before the final row" in cells["forgetting"]
    assert format_matrix(result).splitlines()[2].split()[-2:] == ["–", "–"]  # after 1: colour; parity, size unmeasured


def test_every_2_adds_the_full_row_after_task_2(full):
    result = run("every:2")
    assert result.matrix == [[80, None, None], [80, 80, 20], [80, 20, 80]]
    # forgetting: colour max(80, 80) - 80, parity 80 - 20
    assert result.metrics() == pytest.approx({"OA": 60, "BWT": -30, "FWT": 40, "forgetting": 30})
    assert "the 3 measured cells on or below the diagonal" in result.to_dict()["metrics_cells"]["forgetting"]


def test_every_1_is_full_and_full_records_no_metrics_cells(full):
    assert run("every:1").matrix == full.matrix
    assert "metrics_cells" not in full.to_dict()


@pytest.mark.parametrize("schedule", ["Diagonal", "every", "every:0", "every:-1", "every:two", "every:2:3", ""])
def test_a_bad_schedule_says_what_is_allowed(schedule, capsys):
    with pytest.raises(EllaError, match="choose full, diagonal or every:K"):
        EvaluationConfig(schedule=schedule)
    with pytest.raises(EllaError, match="choose full, diagonal or every:K"):
        RunSpec(eval_schedule=schedule)  # a suite's run fails when the suite loads
    assert main(["run", "--model", "tiny-causal", "--eval-schedule", schedule]) == 2
    assert "evaluation schedule" in capsys.readouterr().err


def test_an_interrupted_run_resumes_with_its_schedule_and_refuses_another(tmp_path):
    whole = run("diagonal", tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        with_crash_in_second_task(lambda: run("diagonal", tmp_path / "cut"))
    with pytest.raises(EllaError, match="evaluation_config differ"):
        run("full", tmp_path / "cut", resume=True)
    resumed = run("diagonal", tmp_path / "cut", resume=True)
    assert resumed.matrix == whole.matrix
    record = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert record["evaluation_config"]["schedule"] == "diagonal"
    assert record["accuracy_matrix"][0][1:] == [None, None] and record["metrics"] == pytest.approx(whole.metrics())


def test_results_hold_no_absolute_path_and_the_hardware(sequence_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--model", "tiny-causal", "--sequence", str(sequence_file), "--output-dir", str(out),
                 "--method", "seqlora", "--eval-mode", "rank", "--eval-schedule", "diagonal", "--batch-size", "4",
                 "--max-length=64", "--mixed-precision", "no", "--save-model"]) == 0
    assert "–" in capsys.readouterr().out  # the printed matrix shows the unmeasured cell
    text = (out / "results.json").read_text()
    for machine_path in (str(tmp_path), str(REPOSITORY), str(Path.home())):
        assert machine_path not in text
    record = json.loads(text)
    assert record["run"]["tasks_from"] == "…/sequence.json"
    assert record["task_details"][0]["source"] == "…/sequence.json"
    assert record["run"]["command"] == ("ella run --model tiny-causal --sequence '…/sequence.json' --output-dir "
                                        "'…/run' --method seqlora --eval-mode rank --eval-schedule diagonal "
                                        "--batch-size 4 --max-length=64 --mixed-precision no --save-model")
    assert record["accuracy_matrix"][0] == [record["accuracy_matrix"][0][0], None]
    hardware = record["hardware"]
    assert set(hardware) == {"cpu", "cpu_model", "l3_cache", "cpu_instructions", "mkl_vendor_check", "torch_threads",
                             "gpu"}
    assert hardware["mkl_vendor_check"] is None or hardware["mkl_vendor_check"].startswith(("says Intel (",
                                                                                             "says not Intel ("))
    assert hardware["cpu"] and hardware["torch_threads"] >= 1 and hardware["gpu"] is None
    assert hardware["cpu_instructions"] in ("AMX", "AVX-512 BF16", "AVX-512", "AVX2", "none of AMX, AVX-512 BF16, "
                                                                                        "AVX-512, AVX2")
    # the saved model keeps where the sequence lies on this machine, so that the run can be continued
    assert json.loads((out / "model" / "ella_run.json").read_text())["sequence_files"] == \
        [str(sequence_file.resolve())]

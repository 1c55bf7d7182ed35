"""Whole sequences: every method on tiny causal and T5 models, and a real two-task run of SmolLM2."""

import json

import pytest
import torch
from safetensors.torch import load_file

from ella import EvaluationConfig, TrainingConfig, get_method, load_model, run_sequence
from ella.cli import main
from ella.methods import METHODS
from ella.models import tiny_model
from pins import check, record


@pytest.mark.parametrize("seq2seq", [False, True], ids=["causal", "t5"])
@pytest.mark.parametrize("method_name", sorted(METHODS))
def test_every_method_runs_a_two_task_sequence(tasks, tmp_path, method_name, seq2seq):
    model, tokenizer = tiny_model(seq2seq=seq2seq)
    method = get_method(method_name)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    model, result = run_sequence(model, tokenizer, tasks, method,
                                 TrainingConfig(batch_size=4, max_length=64, mixed_precision="no"),
                                 EvaluationConfig(batch_size=8, max_new_tokens=6), output_dir=tmp_path)
    assert result.complete and len(result.matrix) == 2 and all(len(row) == 2 for row in result.matrix)
    assert all(0 <= value <= 100 for row in result.matrix for value in row)
    assert set(result.metrics()) == {"OA", "BWT", "FWT", "forgetting"}
    after = model.state_dict() if not hasattr(model, "merge_and_unload") else model.merge_and_unload().state_dict()
    assert any(not torch.equal(before[name], after[name]) for name in before)  # training changed the model
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["status"] == "complete" and saved["accuracy_matrix"] == result.matrix
    assert (tmp_path / "method_state.safetensors").exists() == bool(method.state_dict())
    check(f"{method_name}-{'t5' if seq2seq else 'causal'}", record(result, method.state_dict(), after))


def test_tiny_t5_from_the_command_line(sequence_file, tmp_path, capsys):
    out_dir = tmp_path / "t5"
    code = main(["run", "--model", "tiny-t5", "--sequence", str(sequence_file), "--method", "ella", "--lam", "10",
                 "--max-length", "64", "--output-dir", str(out_dir), "--save-model", "--mixed-precision", "no"])
    assert code == 0
    results = json.loads((out_dir / "results.json").read_text())
    assert results["tasks"] == ["colour", "parity"] and results["method"]["target_modules"] == ["q", "v"]
    assert results["method"]["penalty_reduction"] == "mean"  # the default, recorded
    w_past = load_file(out_dir / "method_state.safetensors")  # 32 x 32 matrices: two rank-8 tasks are kept dense
    assert len(w_past) == 2 * 2 * 3 and all(value.shape == (32, 32) for value in w_past.values())  # q, v x 6
    saved, _ = load_model(str(out_dir / "model"))
    assert saved.config.is_encoder_decoder and (out_dir / "accuracy_matrix.png").stat().st_size > 0


@pytest.mark.slow
def test_smollm2_two_tasks_end_to_end(data_dir, tmp_path, capsys):
    """A real pretrained model on real benchmark data: order-1 tasks dbpedia then agnews, a few examples each."""
    out_dir = tmp_path / "smollm2"
    code = main(["run", "--model", "smollm2-135m", "--tasks", "dbpedia,agnews", "--data-dir", str(data_dir),
                 "--method", "ella", "--lam", "3e4", "--train-per-task", "8", "--test-per-task", "6",
                 "--batch-size", "4", "--max-length", "192", "--output-dir", str(out_dir)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "after 2: agnews" in out and "OA" in out
    results = json.loads((out_dir / "results.json").read_text())
    assert results["status"] == "complete" and results["mixed_precision"] in ("bf16", "no")
    matrix = results["accuracy_matrix"]
    assert len(matrix) == 2 and all(len(row) == 2 for row in matrix)
    assert results["metrics"]["OA"] == pytest.approx(sum(matrix[-1]) / 2)
    assert [log["task"] for log in results["task_logs"]] == ["dbpedia", "agnews"]
    assert results["task_logs"][0]["loss_end"] < results["task_logs"][0]["loss_start"]  # it learns
    assert results["task_logs"][1]["penalty_mean"] > 0  # ELLA's penalty is active on the second task
    w_past = load_file(out_dir / "method_state.safetensors")  # two tasks of rank 8: exact factors of rank 16
    assert len(w_past) == 30 * 2 * 2  # left and right factors of q_proj and v_proj in 30 layers
    assert w_past["ella.model.layers.0.self_attn.q_proj.left"].shape == (576, 16)
    assert w_past["ella.model.layers.0.self_attn.v_proj.left"].shape == (192, 16)
    assert w_past["ella.model.layers.0.self_attn.v_proj.right"].shape == (576, 16)
    predictions = (out_dir / "predictions.jsonl").read_text().splitlines()
    assert len(predictions) == 12 and {"task", "input", "target", "prediction"} <= set(json.loads(predictions[0]))

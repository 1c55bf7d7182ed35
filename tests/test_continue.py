"""Runs that keep learning: a finished run, saved with --save-model, learns more tasks later (``--continue``).

A run of two tasks continued with a third ends exactly as one run of the three tasks (the rows, the method state,
the weights, the loss of every step); continuing works from the saved model directory alone; ``from_pretrained``
loads that directory; what cannot be continued is refused with a message.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

import ella
from ella import EllaError, RunSpec, engine
from ella.cli import main
from ella.continuation import LIVE_WEIGHTS, PreviousRun
from ella.data import Example, Task

from conftest import toy_tasks, with_crash_in_second_task

SETTINGS = dict(mixed_precision="no", batch_size=4, lr=1e-2, eval_mode="rank", max_length=64)  # fp32: exact
METHODS = {"ella": dict(lam=10.0), "replay": dict(buffer_size=4)}  # W_past; a live LoRA and a data buffer


def size_task() -> Task:
    labels = ["small", "big"]
    return Task("size", [Example(f"{'ant' if i % 2 == 0 else 'whale'} {i}", labels[i % 2]) for i in range(12)],
                [Example(f"{'bee' if i % 2 == 0 else 'horse'} {i}", labels[i % 2]) for i in range(6)],
                labels=labels, prefix="Size? ")


def write_sequences(root: Path) -> dict[str, Path]:
    """Three tasks on disk, and sequence files of all three, the first two, the third, the first, the last two."""
    tasks = {task.name: task for task in [*toy_tasks(), size_task()]}
    for task in tasks.values():
        (root / task.name).mkdir(parents=True)
        for split in ("train", "test"):
            rows = [{"input": e.input, "output": e.output} for e in getattr(task, split)]
            (root / task.name / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    files = {}
    parts = {"all": list(tasks), "first": ["colour", "parity"], "more": ["size"], "colour": ["colour"],
             "later": ["parity", "size"]}
    for key, names in parts.items():
        entries = [{"name": n, "train": f"{n}/train.jsonl", "test": f"{n}/test.jsonl", "labels": tasks[n].labels,
                    "instruction": tasks[n].prefix} for n in names]
        files[key] = root / f"{key}.json"
        files[key].write_text(json.dumps({"tasks": entries}))
    return files


def run(**options):
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return ella.run(RunSpec(**{**SETTINGS, **options}))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Per method: one run of the three tasks; a run of the first two, continued with the third."""
    root = tmp_path_factory.mktemp("continue")
    files = write_sequences(root / "data")
    made = {"files": files}
    for name, hyperparameters in METHODS.items():
        common = dict(method=name, hyperparameters=hyperparameters, save_model=True)
        out = root / name
        made[name] = {"dirs": {key: out / key for key in ("whole", "first", "continued")},
                      "whole": run(model="tiny-causal", sequence=files["all"], output_dir=out / "whole", **common)[1],
                      "first": run(model="tiny-causal", sequence=files["first"], output_dir=out / "first",
                                   **common)[1],
                      "continued": run(continue_run=out / "first", sequence=files["more"],
                                       output_dir=out / "continued", save_model=True)[1]}
    return made


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path) if path.is_file() else {}


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [key for key in a if not torch.equal(a[key], b[key])]
    assert not different, different[:3]


@pytest.mark.parametrize("method", list(METHODS))
def test_continuing_equals_one_long_run(runs, method):
    whole, continued, dirs = runs[method]["whole"], runs[method]["continued"], runs[method]["dirs"]
    n_old = 2
    assert continued.tasks == whole.tasks == ["colour", "parity", "size"]
    for i, row in enumerate(continued.matrix):  # the earlier rows keep their cells; the new task's are unmeasured
        assert row == (whole.matrix[i][:n_old] + [None] if i < n_old else whole.matrix[i]), i
    assert continued.zero_shot == whole.zero_shot[:n_old] + [None]
    assert continued.task_logs[-1]["steps"] == whole.task_logs[-1]["steps"]  # every step's loss, penalty, rate
    # the state and the weights after the new task, bit for bit: the method state, the merged model, the live LoRA
    for name in ("method_state.safetensors", "model/model.safetensors", f"model/{LIVE_WEIGHTS}"):
        assert_same_tensors(tensors(dirs["continued"] / name), tensors(dirs["whole"] / name))
    assert (dirs["whole"] / "model" / LIVE_WEIGHTS).is_file() == (method == "replay")
    record = json.loads((dirs["continued"] / "results.json").read_text())
    assert record["accuracy_matrix"][0][-1] is None and record["zero_shot"][-1] is None  # null in JSON
    ours, theirs = record["metrics"], whole.metrics()
    assert {k: ours[k] for k in ("OA", "BWT", "forgetting")} == {k: theirs[k] for k in ("OA", "BWT", "forgetting")}
    assert ours["FWT"] == pytest.approx(sum(whole.matrix[j][j] - whole.zero_shot[j] for j in range(n_old)) / n_old)
    assert "2 of 3 tasks" in record["metrics_cells"]["FWT"]
    # paths outside the working directory are recorded by their last component; the saved model keeps where the
    # sequence files lie, which continuing read them from
    assert record["run"]["continued_from"] == "…/first" and len(record["run"]["task_sources"]) == 2
    assert [source["sequence"] for source in record["run"]["task_sources"]] == ["…/first.json", "…/more.json"]
    assert json.loads((dirs["continued"] / "model" / "ella_run.json").read_text())["sequence_files"] == \
        [str(runs["files"]["first"]), str(runs["files"]["more"])]
    assert record["method"] == json.loads((dirs["whole"] / "results.json").read_text())["method"]


def test_an_interrupted_continuation_resumes_to_the_same_end(runs, tmp_path, monkeypatch):
    """Replay's run of one task, continued with two and stopped as the last one starts: --resume ends exactly as
    the run of the three tasks (its state is read from the continued run's own progress, not the saved model)."""
    files, dirs, whole = runs["files"], runs["replay"]["dirs"], runs["replay"]["whole"]
    run(model="tiny-causal", sequence=files["colour"], method="replay", hyperparameters=METHODS["replay"],
        output_dir=tmp_path / "one", save_model=True)
    real = engine.train_task

    def train_task(model, method, task_index, *args):
        if task_index == 2:
            raise KeyboardInterrupt("the machine went away")
        return real(model, method, task_index, *args)

    monkeypatch.setattr(engine, "train_task", train_task)
    more = dict(continue_run=tmp_path / "one", sequence=files["later"], output_dir=tmp_path / "more", save_model=True)
    with pytest.raises(KeyboardInterrupt):
        run(**more)
    monkeypatch.setattr(engine, "train_task", real)
    _, result = run(**more, resume=True)
    assert result.matrix == [whole.matrix[0][:1] + [None, None], *whole.matrix[1:]]
    for name in ("method_state.safetensors", "model/model.safetensors", f"model/{LIVE_WEIGHTS}"):
        assert_same_tensors(tensors(tmp_path / "more" / name), tensors(dirs["whole"] / name))


def test_continuing_from_the_saved_model_directory_alone(runs, tmp_path, capsys):
    """`ella run --continue DIR/model`, with the run directory gone: the same rows as continuing the run directory."""
    gone = tmp_path / "gone"
    shutil.copytree(runs["ella"]["dirs"]["first"], gone)
    deployed = tmp_path / "deployed"
    shutil.copytree(gone / "model", deployed)
    shutil.rmtree(gone)
    flags = ["--mixed-precision", "no", "--batch-size", "4", "--lr", "1e-2", "--eval-mode", "rank",
             "--max-length", "64"]
    code = main(["run", "--continue", str(deployed), "--sequence", str(runs["files"]["more"]),
                 "--output-dir", str(tmp_path / "again"), *flags])
    out = capsys.readouterr().out
    assert code == 0 and "after 3: size" in out and "–" in out and "over the 2 tasks that have one" in out
    record = json.loads((tmp_path / "again" / "results.json").read_text())
    assert record["accuracy_matrix"] == runs["ella"]["continued"].matrix
    assert record["method"]["lam"] == 10.0  # the method and its hyper-parameters came from the saved directory
    assert_same_tensors(tensors(tmp_path / "again" / "method_state.safetensors"),
                        tensors(runs["ella"]["dirs"]["continued"] / "method_state.safetensors"))


def test_from_pretrained_loads_the_saved_model(runs):
    """model/ is a plain Hugging Face directory: the merged model, which computes what the live LoRA computes."""
    directory = runs["replay"]["dirs"]["first"] / "model"
    merged = AutoModelForCausalLM.from_pretrained(directory)
    live, _ = ella.load_model(str(directory))
    live = PreviousRun(directory)._attach_live_adapters(live)  # the unmerged base and LoRA that continuing loads
    assert not hasattr(merged, "peft_config")
    batch = torch.tensor([[2, 40, 50, 60, 70, 80]])
    with torch.no_grad():
        expected, got = live.eval()(input_ids=batch).logits, merged.eval()(input_ids=batch).logits
    assert torch.allclose(got, expected, atol=1e-5)


def test_an_encoder_decoder_is_saved_and_continued(runs, tmp_path):
    files = runs["files"]
    first = tmp_path / "t5"
    run(model="tiny-t5", sequence=files["more"], method="ella", hyperparameters={"lam": 10.0}, save_model=True,
        output_dir=first)
    assert AutoModelForSeq2SeqLM.from_pretrained(first / "model").config.is_encoder_decoder
    _, result = run(continue_run=first / "model", sequence=files["colour"], output_dir=tmp_path / "more")
    assert result.tasks == ["size", "colour"] and len(result.matrix) == 2 and result.matrix[0][1] is None
    assert json.loads((tmp_path / "more" / "results.json").read_text())["run"]["model"] == "tiny-t5"


def test_an_unfinished_run_or_one_without_a_model_is_refused(runs, tmp_path):
    files = runs["files"]
    unfinished = tmp_path / "unfinished"
    with pytest.raises(KeyboardInterrupt):
        with_crash_in_second_task(lambda: run(model="tiny-causal", sequence=files["first"], output_dir=unfinished,
                                              save_model=True))
    with pytest.raises(EllaError, match="unfinished: finish it first .*--resume"):
        run(continue_run=unfinished, sequence=files["more"], output_dir=tmp_path / "a")
    no_model = tmp_path / "no-model"
    shutil.copytree(runs["ella"]["dirs"]["first"], no_model, ignore=shutil.ignore_patterns("model"))
    with pytest.raises(EllaError, match="kept no model .*--save-model"):
        run(continue_run=no_model, sequence=files["more"], output_dir=tmp_path / "b")
    plain = tmp_path / "plain"  # a Hugging Face model directory, not saved by ella
    AutoModelForCausalLM.from_pretrained(runs["ella"]["dirs"]["first"] / "model").save_pretrained(plain)
    with pytest.raises(EllaError, match="without an ella run to continue.*--model"):
        run(continue_run=plain, sequence=files["more"], output_dir=tmp_path / "c")
    with pytest.raises(EllaError, match="holds no finished ella run"):
        run(continue_run=tmp_path / "nowhere", sequence=files["more"], output_dir=tmp_path / "d")
    assert not any((tmp_path / name / "results.json").exists() for name in "abcd")


@pytest.mark.parametrize("options, message", [
    (dict(method="inclora"), "learnt with method ella.*leave out --method"),
    (dict(hyperparameters={"lam": 99.0}), "--lam 99.0: the continued run used 10.0"),
    (dict(hyperparameters={"lam": [1.0, 10.0, 5.0]}), "--lam .*per-task list may be extended"),
    (dict(hyperparameters={"buffer_size": 3}), "--buffer-size is not a hyper-parameter of ella"),
    (dict(model="tiny-t5"), "--model tiny-t5: a continued run goes on with the continued run's model"),
    (dict(eval_mode="generate"), "evaluated with mode rank.*--eval-mode rank"),
    (dict(sequence=None), "name the tasks to learn"),
    (dict(sequence="first"), "learnt colour, parity already"),
    (dict(output_dir="first"), "holds the continued run"),
    (dict(validation_per_task=2), "continuing a run takes no validation samples"),
])
def test_conflicting_or_missing_settings_are_refused(runs, tmp_path, options, message):
    dirs, files = runs["ella"]["dirs"], runs["files"]
    options = {"sequence": files["more"], "output_dir": tmp_path / "out", **options}
    for key, named in (("sequence", files), ("output_dir", dirs)):
        if isinstance(options[key], str):
            options[key] = named[options[key]]
    with pytest.raises(EllaError, match=message):
        run(continue_run=dirs["first"], **options)
    assert not (tmp_path / "out" / "results.json").exists()


def test_a_per_task_lambda_may_be_extended(runs):
    previous = PreviousRun(runs["ella"]["dirs"]["first"])
    assert previous.method_settings(None, {"lam": [10.0, 10.0, 3.0]})[1]["lam"] == [10.0, 10.0, 3.0]
    assert previous.method_settings("ella", {})[1]["lam"] == 10.0


def test_a_method_state_that_does_not_fit_is_refused(runs, tmp_path):
    saved = tmp_path / "saved"
    shutil.copytree(runs["ella"]["dirs"]["first"] / "model", saved)
    save_file({"olora.model.layers.0.self_attn.q_proj": torch.zeros(8, 32)}, saved / "method_state.safetensors")
    with pytest.raises(EllaError, match="holds tensors of olora, which ella does not have"):
        run(continue_run=saved, sequence=runs["files"]["more"], output_dir=tmp_path / "out")
    (saved / "method_state.safetensors").unlink()
    with pytest.raises(EllaError, match="lacks method_state.safetensors"):
        run(continue_run=saved, sequence=runs["files"]["more"], output_dir=tmp_path / "out2")

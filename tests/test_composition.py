"""Methods composed of parts: new combinations run end to end (library and CLI), invalid ones are refused with a
clear message, a state holds only the parts the method has, and a recipe equals its explicit parts exactly."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from ella import EllaError, EvaluationConfig, TrainingConfig, engine, get_method, run_sequence
from ella.cli import main
from ella.methods import METHODS, PARTS
from ella.models import tiny_model

from conftest import toy_tasks, with_crash_in_second_task

TRAINING = TrainingConfig(mixed_precision="no", batch_size=4, max_length=64)
EVALUATION = EvaluationConfig(mode="rank", zero_shot=False)
ADAPTED = sorted(f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qv")  # the tiny model's q and v
Q0 = "model.layers.0.self_attn.q_proj"  # 32 -> 32
REPLAY_KEYS = {"task", "input_ids", "input_lengths", "labels", "label_lengths"}


def run(tasks, method, training=TRAINING, **options):
    model, tokenizer = tiny_model()
    base = {name: value.clone() for name, value in model.state_dict().items()}
    model, result = run_sequence(model, tokenizer, tasks, method, training, EVALUATION, **options)
    return base, model, result


def owners(state: dict) -> set[str]:
    """The parts that a method state's keys name."""
    return {key.split(".", 1)[0] for key in state}


def ella_modules(state: dict) -> list[str]:
    """The modules of ELLA's W_past in a method state: ``ella.<module>`` (dense) or ``ella.<module>.left|right``
    (factors; W_past turns dense once the factors are as large)."""
    names = [key.removeprefix("ella.") for key in state if key.startswith("ella.")]
    return sorted({name.rsplit(".", 1)[0] if name.endswith((".left", ".right")) else name for name in names})


# (a) new combinations, end to end

def test_inclora_ella_replay_keeps_w_past_and_a_buffer(tasks, tmp_path):
    method = get_method("inclora+ella+replay", lam=10.0, buffer_size=4, lora_dropout=0.0)
    assert list(method.parts) == ["inclora", "ella", "replay"]
    assert method.update is method.parts["inclora"] and method.regularisers == [method.parts["ella"]]
    assert method.data_policy is method.parts["replay"]
    base, model, result = run(tasks, method, TrainingConfig(mixed_precision="no", batch_size=4, max_length=64,
                                                            learning_rate=1e-2), output_dir=tmp_path)
    assert result.complete and len(result.matrix) == 2
    # the data policy: task 2 trains on its 12 examples and the 4 kept of task 1; then 2 of each are kept
    replay = method.parts["replay"]
    assert [log["examples"] for log in result.task_logs] == [12, 12 + 4]
    assert {task: len(kept) for task, kept in replay.buffer.items()} == {0: 2, 1: 2}
    assert result.task_logs[1]["replay_buffer"] == {0: 2, 1: 2}
    # the regulariser: penalised from the second task on, and W_past is the sum of the merged updates
    assert result.task_logs[0]["penalty_mean"] == 0.0 and result.task_logs[1]["penalty_mean"] > 0.0
    assert result.task_logs[1]["diagnostics"]["lambda"] == 10.0
    w_past = method.parts["ella"].w_past
    assert sorted(w_past.modules) == ADAPTED
    weights = model.state_dict()
    for name in ADAPTED:
        torch.testing.assert_close(w_past.matrix(name), weights[name + ".weight"] - base[name + ".weight"],
                                   rtol=0, atol=1e-6)
    # the state: each part's tensors under its own name, saved as such, and loaded back part by part
    state = method.state_dict()
    assert owners(state) == {"ella", "replay"}
    assert {key for key in state if key.startswith("replay.")} == {f"replay.{key}" for key in REPLAY_KEYS}
    assert ella_modules(state) == ADAPTED
    saved = load_file(tmp_path / "method_state.safetensors")
    assert saved.keys() == state.keys() and all(torch.equal(saved[key], state[key].cpu()) for key in state)
    restored = get_method("inclora+ella+replay", lam=10.0, buffer_size=4)
    restored.load_state_dict(saved)
    assert restored.parts["replay"].buffer == replay.buffer
    for name in ADAPTED:
        torch.testing.assert_close(restored.parts["ella"].w_past.matrix(name), w_past.matrix(name))
    described = json.loads((tmp_path / "results.json").read_text())["method"]
    assert described["name"] == "inclora+ella+replay" and described["lam"] == 10.0
    assert described["buffer_size"] == 4 and described["target_modules"] == ["q_proj", "v_proj"]


def test_jumplora_olora_keeps_the_gated_tasks_a_orthogonal(tasks):
    method = get_method("jumplora+olora", lora_r=4)
    _, _, result = run(tasks, method)
    assert result.complete
    jump, olora = method.update, method.parts["olora"]
    assert jump is method.parts["jumplora"] and jump.step == jump.num_steps > 0  # the schedule ran in full
    # O-LoRA stacked both tasks' A's (2·4 rows) of every adapted module, A's of the gated LoRA
    assert sorted(olora.a_past) == ADAPTED and olora.a_past[Q0].shape == (2 * 4, 32)
    assert result.task_logs[0]["penalty_mean"] == 0.0 and result.task_logs[1]["penalty_mean"] > 0.0
    assert result.task_logs[1]["orthogonality_loss_end"] > 0
    for log in result.task_logs:  # each part reports its own figures
        assert 0 < log["sparsity"]["density"] < 1
    state = method.state_dict()
    assert set(state) == {f"olora.{name}" for name in ADAPTED}


def test_seqft_ewc_consolidates_every_weight(tasks):
    method = get_method("seqft+ewc", ewc_lambda=1e4, fisher_examples=4)
    assert method.default_learning_rate == PARTS["seqft"].default_learning_rate
    _, model, result = run(tasks, method, TrainingConfig(mixed_precision="no", batch_size=4, max_length=64,
                                                         learning_rate=1e-3))
    assert result.complete and not hasattr(model, "peft_config")  # full fine-tuning: no adapter
    ewc = method.parts["ewc"]
    parameters = dict(model.named_parameters())
    assert ewc.fisher.keys() == ewc.previous.keys() == parameters.keys()  # every weight of the model
    for name, param in parameters.items():
        torch.testing.assert_close(ewc.previous[name], param.detach().float())  # θ* = the end of the last task
    assert result.task_logs[0]["penalty_mean"] == 0.0 and result.task_logs[1]["penalty_mean"] > 0.0
    state = method.state_dict()
    assert set(state) == {f"ewc.{kind}.{name}" for kind in ("fisher", "previous") for name in parameters}


def test_a_composed_method_from_the_command_line(sequence_file, tmp_path, capsys):
    out_dir = tmp_path / "run"
    code = main(["run", "--model", "tiny-causal", "--sequence", str(sequence_file), "--method", "inclora+ella+replay",
                 "--lam", "10", "--buffer-size", "4", "--train-per-task", "4", "--test-per-task", "2",
                 "--batch-size", "2", "--max-length", "64", "--mixed-precision", "no", "--eval-mode", "rank",
                 "--output-dir", str(out_dir)])
    assert code == 0, capsys.readouterr().err
    results = json.loads((out_dir / "results.json").read_text())
    assert results["status"] == "complete" and results["tasks"] == ["colour", "parity"]
    assert results["method"]["name"] == "inclora+ella+replay"
    assert results["method"]["lam"] == 10.0 and results["method"]["buffer_size"] == 4
    logs = results["task_logs"]
    assert [log["examples"] for log in logs] == [4, 4 + 4] and logs[1]["replay_buffer"] == {"0": 2, "1": 2}
    assert logs[1]["penalty_mean"] > 0 and "diagnostics" in logs[1]
    state = load_file(out_dir / "method_state.safetensors")
    assert owners(state) == {"ella", "replay"}
    assert {key for key in state if key.startswith("replay.")} == {f"replay.{key}" for key in REPLAY_KEYS}
    assert ella_modules(state) == ADAPTED


def test_a_composed_run_resumes_to_the_uninterrupted_run(tmp_path):
    """Both parts' states come back from method_state.safetensors under their prefixes."""
    def method():
        return get_method("inclora+ella+replay", lam=10.0, buffer_size=4)

    training = TrainingConfig(mixed_precision="no", batch_size=4, max_length=64, learning_rate=1e-2)
    _, _, expected = run(toy_tasks(8, 4), method(), training, output_dir=tmp_path / "whole")
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        with_crash_in_second_task(lambda: run(toy_tasks(8, 4), method(), training, output_dir=out))
    _, _, resumed = run(toy_tasks(8, 4), method(), training, output_dir=out, resume=True)
    assert resumed.matrix == expected.matrix
    assert resumed.task_logs[-1]["replay_buffer"] == expected.task_logs[-1]["replay_buffer"] == {0: 2, 1: 2}
    whole = (tmp_path / "whole" / "method_state.safetensors").read_bytes()
    assert (out / "method_state.safetensors").read_bytes() == whole


# (b) invalid combinations and hyper-parameters

@pytest.mark.parametrize("name, message", [
    ("inclora+seqlora", r"'inclora\+seqlora' has 2 update parts \(inclora, seqlora\); a method has exactly one"),
    ("ella+replay", r"'ella\+replay' has 0 update parts \(none\); a method has exactly one"),
    ("ella+olora", r"has 0 update parts"),
    ("seqlora+ella", r"ella penalises each task's own update, which seqlora does not build: combine it with "
                     r"inclora, inflora or jumplora"),
    ("seqft+ella", r"which seqft does not build"),
    ("sculpting+olora", r"olora keeps each task's trained LoRA A orthogonal .* sculpting has no LoRA A that trains"),
    ("inflora+olora", r"inflora has no LoRA A that trains per task"),
    ("inclora+ewc", r"ewc pulls the parameters .* but inclora trains new ones every task: combine it with seqlora "
                    r"or seqft"),
    ("jumplora+ewc", r"but jumplora trains new ones every task"),
    ("inclora+replay+mtl", r"two data policies \(replay, mtl\); choose one"),
    ("inclora+ella+ella", r"names ella twice"),
    ("jumplora-ella+ella", r"'jumplora-ella\+ella' names ella twice"),  # a recipe's parts count too
    ("ella+inclora+ella", r"names ella twice"),
    ("magic", r"unknown method 'magic': choose one of .*ella.* or combine parts with \+"),
    ("inclora+magic", r"'magic' in 'inclora\+magic' is neither a part \(.*\) nor a method"),
    ("inclora+", r"'' in 'inclora\+' is neither a part"),
])
def test_invalid_combinations_are_refused_clearly(name, message):
    with pytest.raises(EllaError, match=message):
        get_method(name)


@pytest.mark.parametrize("name, hyperparameters, message", [
    ("inclora", dict(lam=1.0), r"lam: not a hyper-parameter of inclora \(it has: lora_alpha, lora_dropout, "
                               r"lora_r, target_modules\)"),
    ("inclora+ella", dict(buffer_size=3), r"buffer_size: not a hyper-parameter of inclora\+ella"),
    ("seqft", dict(lora_r=4), r"lora_r: not a hyper-parameter of seqft \(it has: none\)"),
    ("seqlora+ewc+replay", dict(lam=1.0, ewc_lambda=1.0), r"^lam: not a hyper-parameter"),
])
def test_a_foreign_hyperparameter_is_refused(name, hyperparameters, message):
    with pytest.raises(EllaError, match=message):
        get_method(name, **hyperparameters)


def test_a_foreign_option_on_the_command_line(sequence_file, tmp_path, capsys):
    code = main(["run", "--model", "tiny-causal", "--sequence", str(sequence_file), "--method", "inclora",
                 "--lam", "10", "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "--lam does not apply to method inclora" in err.strip().splitlines()[-1]
    code = main(["run", "--model", "tiny-causal", "--sequence", str(sequence_file), "--method", "seqlora+ella",
                 "--lam", "10", "--output-dir", str(tmp_path / "run")])
    assert code == 2 and "which seqlora does not build" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_jumplora_with_ella_needs_a_dense_or_svd_w_past(tasks, monkeypatch):
    """The gated updates are sparse, not low-rank: the default 'factors' W_past cannot hold them. The explicit
    combination is refused at setup, before anything trains; the recipe jumplora-ella defaults to dense."""
    model, tokenizer = tiny_model()
    method = get_method("jumplora+ella")
    assert method.parts["ella"].config.w_past == "factors"
    with pytest.raises(EllaError, match=r"'factors' W_past .* needs low-rank updates, but jumplora's are dense: "
                                        r"pass --w-past dense \(exact\) or --w-past svd"):
        method.setup(model, tasks)
    monkeypatch.setattr(engine, "train_task", lambda *args: pytest.fail("nothing may train"))
    with pytest.raises(EllaError, match="--w-past dense"):
        run_sequence(model, tokenizer, tasks, get_method("jumplora+ella"), TRAINING, EVALUATION)
    recipe = get_method("jumplora-ella")
    assert recipe.parts["ella"].config.w_past == "dense" and list(recipe.parts) == ["jumplora", "ella"]
    recipe.setup(model, tasks)
    for representation in ("dense", "svd"):
        get_method("jumplora+ella", w_past=representation).setup(model, tasks)
    get_method("jumplora-ella", w_past="svd").setup(model, tasks)  # a recipe's default can be overridden
    with pytest.raises(EllaError, match="needs low-rank updates"):
        get_method("jumplora-ella", w_past="factors").setup(model, tasks)


# (c) a state holds only the parts the method has

@pytest.mark.parametrize("name, state, foreign", [
    ("inclora", {"ella.x.q": torch.ones(2, 3)}, "ella"),
    ("inclora+ella", {"ella.x.q": torch.ones(2, 3), "replay.task": torch.zeros(1)}, "replay"),
    ("seqlora+ewc", {"olora.x.q": torch.ones(2, 3), "ewc.fisher.w": torch.ones(1),
                     "ewc.previous.w": torch.ones(1)}, "olora"),
    ("inclora+olora", {"inflora.x.q": torch.ones(3, 1)}, "inflora"),  # an update part's state is a part's too
    ("ella", {"x.q.left": torch.ones(2, 1), "x.q.right": torch.ones(3, 1)}, "x"),  # unprefixed: before 0.3
])
def test_load_state_dict_refuses_tensors_of_a_part_the_method_lacks(name, state, foreign):
    method = get_method(name)
    before = method.state_dict()
    with pytest.raises(EllaError, match=rf"holds tensors of {foreign}, which {re.escape(name)} does not have"):
        method.load_state_dict(state)
    after = method.state_dict()  # refused as a whole: no part took its share
    assert after.keys() == before.keys()


def test_the_refusal_names_the_parts_with_a_state_and_old_unprefixed_states():
    with pytest.raises(EllaError, match=r"its parts with a state: none\)"):
        get_method("inclora").load_state_dict({"ella.x.q": torch.ones(2, 3)})
    with pytest.raises(EllaError, match=r"its parts with a state: ella, replay\)"):
        get_method("inclora+ella+replay").load_state_dict({"ewc.fisher.w": torch.ones(1)})
    with pytest.raises(EllaError, match="without the part's prefix"):
        get_method("ella").load_state_dict({"model.layers.0.self_attn.q_proj.left": torch.ones(32, 8),
                                            "model.layers.0.self_attn.q_proj.right": torch.ones(32, 8)})


# (d) a recipe is exactly its parts

@pytest.mark.parametrize("recipe, parts, hyperparameters", [
    ("ella", "inclora+ella", dict(lam=10.0)),
    ("replay", "seqlora+replay", dict(buffer_size=4)),
])
def test_a_recipe_and_its_explicit_parts_give_the_identical_run(recipe, parts, hyperparameters):
    assert "+".join(METHODS[recipe].parts) == parts
    tasks = toy_tasks(8, 4)
    runs = []
    for name in (recipe, parts):
        method = get_method(name, **hyperparameters)
        _, model, result = run(tasks, method, TrainingConfig(mixed_precision="no", batch_size=4, max_length=64,
                                                             learning_rate=1e-2))
        weights = (model.merge_and_unload() if hasattr(model, "merge_and_unload") else model).state_dict()
        runs.append((method, result, weights))
    (first, first_result, first_weights), (second, second_result, second_weights) = runs
    assert first_result.matrix == second_result.matrix
    assert first_result.final_predictions == second_result.final_predictions
    state, other = first.state_dict(), second.state_dict()
    assert state and state.keys() == other.keys()
    assert all(torch.equal(state[key], other[key]) for key in state)  # bitwise
    assert first_weights.keys() == second_weights.keys()
    assert all(torch.equal(first_weights[key], second_weights[key]) for key in first_weights)
    assert {**first.describe(), "name": parts} == second.describe()  # the same settings, only the name differs


def test_a_refused_finish_takes_nothing_from_the_task(tasks):
    """Replay refuses to finish a task whose training_items it never saw; ELLA, which finishes before it, must not
    have taken the task's update into W_past by then (a second, valid finish would count it twice)."""
    model, _ = tiny_model()
    method = get_method("inclora+ella+replay", lam=1.0)
    method.setup(model, tasks)
    model = method.prepare(model, 0, tasks[0])
    with torch.no_grad():  # a non-zero update
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.fill_(0.1)
    with pytest.raises(EllaError, match="training_items"):
        method.finish(model, 0, tasks[0])
    assert method.state_dict() == {}


def test_a_second_composition_from_the_command_line(sequence_file, tmp_path, capsys):
    """JumpLoRA's gated updates under O-LoRA's orthogonality, a combination no recipe names."""
    out_dir = tmp_path / "run"
    code = main(["run", "--model", "tiny-causal", "--sequence", str(sequence_file), "--method", "jumplora+olora",
                 "--lambda1", "0.5", "--threshold-scope", "block", "--train-per-task", "4", "--test-per-task", "2",
                 "--batch-size", "2", "--max-length", "64", "--mixed-precision", "no", "--eval-mode", "rank",
                 "--output-dir", str(out_dir)])
    assert code == 0, capsys.readouterr().err
    results = json.loads((out_dir / "results.json").read_text())
    assert results["method"]["name"] == "jumplora+olora" and results["method"]["threshold_scope"] == "block"
    logs = results["task_logs"]
    assert all("sparsity" in log for log in logs) and "orthogonality_loss_end" in logs[1]
    assert logs[1]["penalty_mean"] > 0  # the earlier task's A's are there to be orthogonal to
    assert owners(load_file(out_dir / "method_state.safetensors")) == {"olora"}

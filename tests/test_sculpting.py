import pytest
import torch
import torch.nn.functional as F

from ella import EllaError, get_method
from ella.data import TaskEncoder, collate
from ella.evaluation import answer_token_nll
from ella.methods import TaskData
from ella.methods.sculpting import block_importance, retained_fractions
from ella.models import tiny_model


def test_retained_fraction_from_importance_by_hand():
    # mean importance 0.5 -> I = 0.5, 1.0, 1.5 -> 0.1 + I·0.7 = 0.45, 0.8, 1.15 (clipped to 0.99)
    fractions = retained_fractions({"a": 0.25, "b": 0.5, "c": 0.75}, mrr=0.1, trr=0.8, most=0.99)
    assert fractions == pytest.approx({"a": 0.45, "b": 0.8, "c": 0.99})
    # I = 0.8, 1.2, 1.0: above the mean a block keeps more than trr
    fractions = retained_fractions({"a": 0.4, "b": 0.6, "c": 0.5}, mrr=0.1, trr=0.8, most=0.99)
    assert fractions == pytest.approx({"a": 0.66, "b": 0.94, "c": 0.8})
    # I = 2.5, -0.5: 1.85 clipped to 0.99; a negative cosine keeps mrr
    fractions = retained_fractions({"a": 1.0, "b": -0.2}, mrr=0.1, trr=0.8, most=0.99)
    assert fractions == pytest.approx({"a": 0.99, "b": 0.1})
    # a mean of 0 or below cannot normalise: refused, not a division by zero or the blocks' order reversed
    for importance in ({"a": 0.0, "b": 0.0}, {"a": 0.1, "b": -0.3}):
        with pytest.raises(EllaError, match="needs a positive one"):
            retained_fractions(importance, mrr=0.1, trr=0.8, most=0.99)


def task_data(tasks, model, tokenizer, task_index=0):
    items = TaskEncoder(tokenizer, tasks[task_index], 64, seq2seq=False).training(tasks[task_index].train)

    def batches(batch_size=1, limit=None):
        chosen = items[:limit] if limit else items
        for start in range(0, len(chosen), batch_size):
            yield collate(chosen[start:start + batch_size], tokenizer.pad_token_id, False)

    return TaskData(items, num_steps=len(items) // 4, batches=batches)


def test_block_importance_is_the_cosine_of_block_input_and_output(tasks):
    model, tokenizer = tiny_model()
    data = task_data(tasks, model, tokenizer)
    importance = block_importance(model, data.batches(limit=3))
    assert set(importance) == {"model.layers.0", "model.layers.1"}
    expected, count = 0.0, 0
    with torch.no_grad():
        for batch in data.batches(limit=3):
            hidden = model(**batch, output_hidden_states=True).hidden_states
            cos = F.cosine_similarity(hidden[0], hidden[1], dim=-1)
            expected, count = expected + cos.sum().item(), count + cos.numel()
    assert importance["model.layers.0"] == pytest.approx(expected / count, rel=1e-5)


def frozen_directions(model, method):
    """U_hi, V_hi of every target matrix, from an independent SVD of the weights the task starts from."""
    directions = {}
    for name, layer in model.named_modules():
        if hasattr(layer, "osf_svd_params"):
            k = layer.effective_rank[method.update.adapter]
            U, _, Vh = torch.linalg.svd(layer.get_base_layer().weight.detach(), full_matrices=False)
            directions[name.removeprefix("base_model.model.")] = (U[:, :k], Vh[:k])
    return directions


@pytest.mark.parametrize("reproject", [True, False])
def test_update_has_no_component_in_the_frozen_directions_after_adamw(tasks, reproject):
    model, tokenizer = tiny_model()
    data = task_data(tasks, model, tokenizer)
    method = get_method("sculpting")
    method.setup(model, tasks)
    before = {name: module.weight.detach().clone() for name, module in model.named_modules()
              if isinstance(module, torch.nn.Linear)}
    model = method.prepare(model, 0, tasks[0], data)
    directions = frozen_directions(model, method)
    assert len(directions) == 2 * 7  # q, k, v, o, gate, up, down of two blocks
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        for batch in data.batches(batch_size=4):
            nll, mask = answer_token_nll(model, batch)
            (nll.sum() / mask.sum()).backward()
            method.after_backward(model)
            optimizer.step()
            optimizer.zero_grad()
            if reproject:
                method.after_step(model)
    merged = method.finish(model, 0, tasks[0])
    modules = dict(merged.named_modules())
    leaks = []
    for name, (u_high, v_high) in directions.items():
        update = modules[name].weight.detach() - before[name]
        assert update.norm() > 0
        leaks.append(((u_high.T @ update @ v_high.T).norm() / update.norm()).item())
        if reproject:  # the stronger property: nothing moves along U_hi on the left or V_hi on the right
            assert (u_high.T @ update).norm() / update.norm() < 1e-5
            assert (update @ v_high.T).norm() / update.norm() < 1e-5
    if reproject:
        assert max(leaks) < 1e-5
    else:  # AdamW alone drifts the factors back into the frozen directions: the re-projection is needed
        assert max(leaks) > 1e-3


def test_retained_rank_follows_each_blocks_importance(tasks):
    model, tokenizer = tiny_model()
    method = get_method("sculpting", min_retained=0.2, max_retained=0.7)
    method.setup(model, tasks)
    model = method.prepare(model, 0, tasks[0], task_data(tasks, model, tokenizer))
    sculpting = method.update
    for name, layer in model.named_modules():
        if hasattr(layer, "osf_svd_params"):
            block = ".".join(name.removeprefix("base_model.model.").split(".")[:3])
            weight = layer.get_base_layer().weight
            assert layer.effective_rank[sculpting.adapter] == int(min(weight.shape) * sculpting.retained[block])


def test_bad_sculpting_settings(tasks):
    with pytest.raises(EllaError, match="min_retained <= max_retained"):
        get_method("sculpting", min_retained=0.9, max_retained=0.5)
    model, _ = tiny_model()
    with pytest.raises(EllaError, match="wq not found"):
        get_method("sculpting", target_modules=["wq"]).setup(model, tasks)

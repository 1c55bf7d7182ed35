import pytest
import torch

from ella import EllaError
from ella.methods.w_past import LowRank, PastUpdates, truncate


def random_update(generator, d_out=12, d_in=10, r=2):
    return LowRank(torch.randn(d_out, r, generator=generator), torch.randn(d_in, r, generator=generator))


def test_truncation_is_the_best_low_rank_approximation():
    generator = torch.Generator().manual_seed(0)
    left, right = torch.randn(12, 6, generator=generator), torch.randn(10, 6, generator=generator)
    u, s, vh = torch.linalg.svd(left @ right.T)
    best = (u[:, :3] * s[:3]) @ vh[:3]
    new_left, new_right = truncate(left, right, 3)
    assert new_left.shape == (12, 3) and new_right.shape == (10, 3)
    torch.testing.assert_close(new_left @ new_right.T, best, rtol=1e-4, atol=1e-4)


def test_the_three_representations_hold_the_same_sum_while_exact():
    generator = torch.Generator().manual_seed(1)
    updates = [random_update(generator) for _ in range(3)]
    stores = {kind: PastUpdates(kind, rank=6) for kind in ("dense", "factors", "svd")}
    for update in updates:
        for store in stores.values():
            store.add("m", update)
    expected = sum(update.dense() for update in updates)
    for store in stores.values():
        torch.testing.assert_close(store.matrix("m"), expected, rtol=1e-5, atol=1e-5)
    probe = random_update(generator)
    values = {kind: store.penalty({"m": probe}).item() for kind, store in stores.items()}
    assert values["factors"] == pytest.approx(values["dense"], rel=1e-5)
    assert values["svd"] == pytest.approx(values["dense"], rel=1e-5)


def test_sizes_dense_flat_factors_growing_up_to_dense_svd_capped():
    generator = torch.Generator().manual_seed(2)
    stores = {kind: PastUpdates(kind, rank=4) for kind in ("dense", "factors", "svd")}
    sizes = {kind: [] for kind in stores}
    for _ in range(5):
        update = random_update(generator, r=2)
        for kind, store in stores.items():
            store.add("m", update)
            sizes[kind].append(store.nbytes())
    assert sizes["dense"] == [12 * 10 * 4] * 5
    # factors grow by (12 + 10)·2 floats a task until they would not be smaller than the 12 x 10 matrix (task 3)
    assert sizes["factors"] == [(12 + 10) * 2 * 4, (12 + 10) * 4 * 4, 120 * 4, 120 * 4, 120 * 4]
    assert sizes["svd"] == [(12 + 10) * 2 * 4, (12 + 10) * 4 * 4, (12 + 10) * 4 * 4, (12 + 10) * 4 * 4,
                            (12 + 10) * 4 * 4]


def test_factors_turn_dense_and_stay_exact():
    generator = torch.Generator().manual_seed(4)
    updates = [random_update(generator, r=2) for _ in range(5)]
    store, reference = PastUpdates("factors"), PastUpdates("dense")
    for update in updates:
        store.add("m", update)
        reference.add("m", update)
        torch.testing.assert_close(store.matrix("m"), reference.matrix("m"))
    assert isinstance(store.modules["m"], torch.Tensor)
    restored = PastUpdates("factors")
    restored.load(store.tensors())
    torch.testing.assert_close(restored.matrix("m"), reference.matrix("m"))


def test_dense_updates_need_dense_or_svd():
    update = torch.eye(3)
    with pytest.raises(EllaError, match="needs low-rank updates"):
        PastUpdates("factors").add("m", update)
    store = PastUpdates("svd", rank=3)
    store.add("m", update)
    torch.testing.assert_close(store.matrix("m"), torch.eye(3))


@pytest.mark.parametrize("cache_squares", [True, False])
@pytest.mark.parametrize("low_rank_update", [True, False])
def test_penalty_value_and_gradient_match_the_direct_formula(cache_squares, low_rank_update):
    """The factored ⟨L∘L, W²(R∘R)⟩ form, stacking, caching and checkpointing change nothing: same value, same
    gradient as ‖(L Rᵀ) ⊙ W_past‖² computed directly, for several modules of two shapes."""
    generator = torch.Generator().manual_seed(3)
    past = PastUpdates("factors", cache_squares=cache_squares)
    shapes = {"a": (12, 10), "b": (12, 10), "c": (5, 7)}
    for name, (d_out, d_in) in shapes.items():
        past.add(name, random_update(generator, d_out, d_in, r=3))
    lefts = {n: torch.randn(o, 2, generator=generator, requires_grad=True) for n, (o, _) in shapes.items()}
    rights = {n: torch.randn(i, 2, generator=generator, requires_grad=True) for n, (_, i) in shapes.items()}
    updates = {n: LowRank(lefts[n], rights[n]) if low_rank_update else lefts[n] @ rights[n].T for n in shapes}
    value = past.penalty(updates)
    value.backward()
    expected = 0
    reference = {n: (lefts[n].detach().clone().requires_grad_(), rights[n].detach().clone().requires_grad_())
                 for n in shapes}
    for name, (left, right) in reference.items():
        expected = expected + ((left @ right.T) * past.matrix(name)).square().sum()
    expected.backward()
    torch.testing.assert_close(value, expected)
    for name, (left, right) in reference.items():
        torch.testing.assert_close(lefts[name].grad, left.grad)
        torch.testing.assert_close(rights[name].grad, right.grad)


def test_bad_representation():
    with pytest.raises(EllaError, match="unknown W_past representation"):
        PastUpdates("sparse")
    with pytest.raises(EllaError, match="rank must be at least 1"):
        PastUpdates("svd", rank=0)

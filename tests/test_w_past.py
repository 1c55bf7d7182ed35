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


def test_sizes_dense_flat_factors_growing_svd_capped():
    generator = torch.Generator().manual_seed(2)
    stores = {kind: PastUpdates(kind, rank=4) for kind in ("dense", "factors", "svd")}
    sizes = {kind: [] for kind in stores}
    for _ in range(5):
        update = random_update(generator, r=2)
        for kind, store in stores.items():
            store.add("m", update)
            sizes[kind].append(store.nbytes())
    assert sizes["dense"] == [12 * 10 * 4] * 5
    assert sizes["factors"] == [(12 + 10) * 2 * t * 4 for t in range(1, 6)]
    assert sizes["svd"] == [(12 + 10) * 2 * 4, (12 + 10) * 4 * 4, (12 + 10) * 4 * 4, (12 + 10) * 4 * 4,
                            (12 + 10) * 4 * 4]


def test_dense_updates_need_dense_or_svd():
    update = torch.eye(3)
    with pytest.raises(EllaError, match="needs low-rank updates"):
        PastUpdates("factors").add("m", update)
    store = PastUpdates("svd", rank=3)
    store.add("m", update)
    torch.testing.assert_close(store.matrix("m"), torch.eye(3))


def test_penalty_gradient_is_the_same_with_and_without_checkpointing():
    generator = torch.Generator().manual_seed(3)
    past = PastUpdates("factors")
    past.add("m", random_update(generator))
    left = torch.randn(12, 2, generator=generator, requires_grad=True)
    right = torch.randn(10, 2, generator=generator, requires_grad=True)
    past.penalty({"m": LowRank(left, right)}).backward()
    reference_left, reference_right = left.detach().clone().requires_grad_(), right.detach().clone().requires_grad_()
    ((reference_left @ reference_right.T) * past.matrix("m")).square().sum().backward()
    torch.testing.assert_close(left.grad, reference_left.grad)
    torch.testing.assert_close(right.grad, reference_right.grad)


def test_bad_representation():
    with pytest.raises(EllaError, match="unknown W_past representation"):
        PastUpdates("sparse")
    with pytest.raises(EllaError, match="rank must be at least 1"):
        PastUpdates("svd", rank=0)

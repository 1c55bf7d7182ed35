"""W_past, the sum of the earlier tasks' updates that ELLA penalises against, in three representations.

- ``dense``: one d_out x d_in matrix per module. Exact; d_out·d_in floats, whatever the number of tasks.
- ``factors`` (the default): W_past = L Rᵀ kept exactly; each task appends its s·B (d_out x r) to L and Aᵀ
  (d_in x r) to R, so a module takes (d_out + d_in)·r·t floats, until that reaches d_out·d_in: from then on the
  module is kept dense. Exact, and never larger than ``dense``: constant in size once the sequence is long.
- ``svd``: the factors truncated to rank ``rank`` by SVD after every task (exact until r·t exceeds it): a small
  constant size (d_out + d_in)·rank, at the price of a penalty error that grows with the number of tasks
  (measured in benchmarks/results/efficiency.md). Truncation keeps the largest singular directions.

The stored state is what the representation says. For speed the penalty keeps W_past² dense on the device during a
task (``cache_squares``, the default); without it, nothing dense stays resident (see ``PastUpdates.penalty``).
A low-rank ΔW is never made dense.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from ..errors import EllaError

REPRESENTATIONS = ("dense", "factors", "svd")


@dataclass
class LowRank:
    """The matrix left @ rightᵀ (left d_out x k, right d_in x k), never formed unless asked."""

    left: torch.Tensor
    right: torch.Tensor

    def dense(self) -> torch.Tensor:
        return self.left @ self.right.transpose(-2, -1)


def dense(update: torch.Tensor | LowRank) -> torch.Tensor:
    return update.dense() if isinstance(update, LowRank) else update


def _shape(matrix: torch.Tensor | LowRank) -> tuple[int, ...]:
    return (*matrix.left.shape, *matrix.right.shape) if isinstance(matrix, LowRank) else tuple(matrix.shape)


def _dims(matrix: torch.Tensor | LowRank) -> tuple[int, int]:
    """(d_out, d_in) of a dense or factored matrix."""
    return (matrix.left.shape[0], matrix.right.shape[0]) if isinstance(matrix, LowRank) else tuple(matrix.shape)


def truncate(left: torch.Tensor, right: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-``rank`` factors of left @ rightᵀ, via QR of each side and an SVD of the small core:
    left = Q_l R_l, right = Q_r R_r, R_l R_rᵀ = U S Vᵀ  ->  (Q_l U S, Q_r V), truncated."""
    if left.shape[1] <= rank:
        return left, right
    q_left, r_left = torch.linalg.qr(left)
    q_right, r_right = torch.linalg.qr(right)
    u, s, vh = torch.linalg.svd(r_left @ r_right.T)
    return (q_left @ u[:, :rank]) * s[:rank], q_right @ vh[:rank].T


def masked_energy(update: torch.Tensor | LowRank, past_squared: torch.Tensor) -> torch.Tensor:
    """‖ΔW ⊙ W_past‖_F² = Σ_ij ΔW_ij²·(W_past²)_ij for each matrix of a stack (n, d_out, d_in).

    A low-rank ΔW = L Rᵀ stays factored: ΔW_ij² = Σ_kk' (L_k∘L_k')_i (R_k∘R_k')_j, so the sum is
    ⟨L∘L, W_past² (R∘R)⟩ with r² columns: two matrix products and no dense ΔW, several times faster than
    element-wise work on d_out x d_in matrices.
    """
    if isinstance(update, LowRank):
        left = (update.left.unsqueeze(-1) * update.left.unsqueeze(-2)).flatten(-2)
        right = (update.right.unsqueeze(-1) * update.right.unsqueeze(-2)).flatten(-2)
        return (left * (past_squared @ right)).sum((-2, -1))
    return (update.square() * past_squared).sum((-2, -1))


def _stacked_matrix(*stack: torch.Tensor) -> torch.Tensor:
    """A stack of dense matrices, from (matrices,) or from (lefts, rights)."""
    return stack[0] if len(stack) == 1 else stack[0] @ stack[1].transpose(-2, -1)


def _masked_energy_rebuilding_past(update: torch.Tensor | LowRank, *past: torch.Tensor) -> torch.Tensor:
    return masked_energy(update, _stacked_matrix(*past).square())


def chunks(names: list[str], elements_per_module: int, budget: int = 1 << 26) -> list[list[str]]:
    """Modules in groups whose dense d_out x d_in matrices hold at most ``budget`` elements together (256 MB fp32)."""
    size = max(1, budget // elements_per_module)
    return [names[i:i + size] for i in range(0, len(names), size)]


class PastUpdates:
    """W_past of every adapted module, keyed by module name, in one representation."""

    def __init__(self, representation: str = "factors", rank: int = 64, cache_squares: bool = True):
        if representation not in REPRESENTATIONS:
            raise EllaError(f"unknown W_past representation {representation!r}: choose one of "
                            f"{', '.join(REPRESENTATIONS)}")
        if rank < 1:
            raise EllaError(f"the W_past rank must be at least 1 (got {rank})")
        self.representation, self.rank, self.cache_squares = representation, rank, cache_squares
        self.modules: dict[str, torch.Tensor | LowRank] = {}
        self._cache: dict[tuple[str, ...], torch.Tensor] = {}  # W_past² stacks for the penalty

    def __bool__(self) -> bool:
        return bool(self.modules)

    @torch.no_grad()
    def add(self, name: str, update: torch.Tensor | LowRank) -> None:
        """W_past^name ← W_past^name + update."""
        self._cache.clear()
        if self.representation == "dense":
            past = self.modules.get(name)
            self.modules[name] = dense(update).float() + (past if past is not None else 0)
            return
        past = self.modules.get(name)
        if self.representation == "factors" and isinstance(past, torch.Tensor):  # already dense
            self.modules[name] = past + dense(update).float()
            return
        if not isinstance(update, LowRank):
            if self.representation == "factors":
                raise EllaError("the 'factors' W_past representation needs low-rank updates; this method's "
                                "updates are dense (e.g. JumpLoRA's gated ones): use 'svd' or 'dense'")
            u, s, vh = torch.linalg.svd(update.float(), full_matrices=False)
            update = LowRank(u[:, :self.rank] * s[:self.rank], vh[:self.rank].T)
        left, right = update.left.float(), update.right.float()
        if past is not None:
            left = torch.cat([past.left, left], dim=1)
            right = torch.cat([past.right, right], dim=1)
        if self.representation == "svd":
            left, right = truncate(left, right, self.rank)
        elif (left.shape[0] + right.shape[0]) * left.shape[1] >= left.shape[0] * right.shape[0]:
            self.modules[name] = left @ right.T  # exact factors no smaller than the matrix itself: keep it dense
            return
        self.modules[name] = LowRank(left.contiguous(), right.contiguous())

    def matrix(self, name: str) -> torch.Tensor:
        """The dense W_past of one module (built on demand for the factored forms)."""
        return dense(self.modules[name])

    def penalty(self, updates: dict[str, torch.Tensor | LowRank], reduction: str = "sum") -> torch.Tensor:
        """Σ_m ‖ΔW^m ⊙ W_past^m‖_F² (or the mean over modules).

        Modules of the same shapes are stacked and computed together (a few large operations instead of many
        small ones). W_past² is constant within a task: with ``cache_squares`` it is kept dense on the device for
        the task (fastest); without, it is rebuilt from the stored form in bounded chunks, here and again in the
        backward pass (activation checkpointing), so no dense copy stays resident.
        """
        groups: dict[tuple, list[str]] = {}
        for name, past in self.modules.items():
            update = updates[name]
            groups.setdefault((_shape(update), _shape(past)), []).append(name)
        terms = []
        for names in groups.values():
            d_out, d_in = _dims(self.modules[names[0]])
            for chunk in (chunks(names, d_out * d_in) if not self.cache_squares else [names]):
                if not isinstance(updates[chunk[0]], LowRank):  # dense updates exist already: no stacked copy
                    squares = self._squares(chunk) if self.cache_squares else _stacked_matrix(*self._stack(chunk))
                    if not self.cache_squares:
                        squares = squares.square()
                    terms.append(torch.stack([masked_energy(updates[n], square) for n, square in zip(chunk, squares)]))
                    continue
                update = LowRank(torch.stack([updates[n].left for n in chunk]),
                                 torch.stack([updates[n].right for n in chunk]))
                if self.cache_squares:
                    terms.append(masked_energy(update, self._squares(chunk)))
                else:
                    terms.append(checkpoint(_masked_energy_rebuilding_past, update, *self._stack(chunk),
                                            use_reentrant=False))
        total = torch.cat(terms)
        return total.sum() if reduction == "sum" else total.mean()

    def _stack(self, names: list[str]) -> tuple[torch.Tensor, ...]:
        parts = [self.modules[name] for name in names]
        if isinstance(parts[0], LowRank):
            return torch.stack([p.left for p in parts]), torch.stack([p.right for p in parts])
        return (torch.stack(parts),)

    def _squares(self, names: list[str]) -> torch.Tensor:
        """W_past² of ``names`` as one dense stack, cached until W_past changes."""
        key = tuple(names)
        if key not in self._cache:
            self._cache[key] = _stacked_matrix(*self._stack(names)).square()
        return self._cache[key]

    def shapes(self) -> dict[str, tuple[int, int]]:
        """(d_out, d_in) of every module's W_past."""
        return {name: _dims(past) for name, past in self.modules.items()}

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors().values())

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat named tensors for safetensors: ``<module>`` (dense) or ``<module>.left`` / ``<module>.right``."""
        out = {}
        for name, past in self.modules.items():
            if isinstance(past, LowRank):
                out[f"{name}.left"], out[f"{name}.right"] = past.left, past.right
            else:
                out[name] = past
        return out

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        modules: dict[str, torch.Tensor | LowRank] = {}
        for key, value in tensors.items():
            if key.endswith((".left", ".right")):
                name, side = key.rsplit(".", 1)
                other = tensors[f"{name}.{'right' if side == 'left' else 'left'}"]
                left, right = (value, other) if side == "left" else (other, value)
                modules[name] = LowRank(left.float(), right.float())
            else:
                modules[key] = value.float()
        factored = {isinstance(past, LowRank) for past in modules.values()}
        allowed = {"dense": {False}, "svd": {True}, "factors": {True, False}}[self.representation]
        if not factored <= allowed:
            raise EllaError(f"the saved W_past is {'factored' if True in factored else 'dense'} but this run uses "
                            f"the {self.representation!r} representation; pass the matching --w-past")
        self.modules = modules
        self._cache.clear()

    def to(self, device: torch.device) -> "PastUpdates":
        self._cache.clear()
        self.modules = {name: LowRank(p.left.to(device), p.right.to(device)) if isinstance(p, LowRank)
                        else p.to(device) for name, p in self.modules.items()}
        return self

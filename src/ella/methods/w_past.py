"""W_past, the sum of the earlier tasks' updates that ELLA penalises against, in three representations.

- ``dense``: one d_out x d_in matrix per module. Exact; d_out·d_in floats, whatever the number of tasks.
- ``factors``: W_past = L Rᵀ kept exactly as factors; each task appends its s·B (d_out x r) to L and Aᵀ (d_in x r)
  to R, so the size (d_out + d_in)·r·t grows by r columns per task. Needs low-rank updates (plain LoRA).
- ``svd``: the factors truncated to rank ``rank`` by SVD after every task (exact until r·t exceeds it):
  constant size (d_out + d_in)·rank. Truncation keeps the largest singular directions, which are the
  high-energy coordinates the penalty exists to protect.

Factored forms never keep a dense W_past resident, and a low-rank ΔW is never kept dense: the penalty builds one
module's dense matrices at a time and builds them again in the backward pass (activation checkpointing)
instead of storing them.
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
        return self.left @ self.right.T


def dense(update: torch.Tensor | LowRank) -> torch.Tensor:
    return update.dense() if isinstance(update, LowRank) else update


def truncate(left: torch.Tensor, right: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-``rank`` factors of left @ rightᵀ, via QR of each side and an SVD of the small core:
    left = Q_l R_l, right = Q_r R_r, R_l R_rᵀ = U S Vᵀ  ->  (Q_l U S, Q_r V), truncated."""
    if left.shape[1] <= rank:
        return left, right
    q_left, r_left = torch.linalg.qr(left)
    q_right, r_right = torch.linalg.qr(right)
    u, s, vh = torch.linalg.svd(r_left @ r_right.T)
    return (q_left @ u[:, :rank]) * s[:rank], q_right @ vh[:rank].T


def masked_energy(update: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
    """‖ΔW ⊙ W_past‖_F² for one module."""
    return (update * past).square().sum()


def _masked_energy_of_factors(update_left, update_right, *past) -> torch.Tensor:
    past_matrix = past[0] if len(past) == 1 else past[0] @ past[1].T
    return masked_energy(update_left @ update_right.T, past_matrix)


class PastUpdates:
    """W_past of every adapted module, keyed by module name, in one representation."""

    def __init__(self, representation: str = "svd", rank: int = 64):
        if representation not in REPRESENTATIONS:
            raise EllaError(f"unknown W_past representation {representation!r}: choose one of "
                            f"{', '.join(REPRESENTATIONS)}")
        if rank < 1:
            raise EllaError(f"the W_past rank must be at least 1 (got {rank})")
        self.representation, self.rank = representation, rank
        self.modules: dict[str, torch.Tensor | LowRank] = {}

    def __bool__(self) -> bool:
        return bool(self.modules)

    def __len__(self) -> int:
        return len(self.modules)

    @torch.no_grad()
    def add(self, name: str, update: torch.Tensor | LowRank) -> None:
        """W_past^name ← W_past^name + update."""
        if self.representation == "dense":
            past = self.modules.get(name)
            self.modules[name] = dense(update).float() + (past if past is not None else 0)
            return
        if not isinstance(update, LowRank):
            if self.representation == "factors":
                raise EllaError("the 'factors' W_past representation needs low-rank updates; this method's "
                                "updates are dense (e.g. JumpLoRA's gated ones): use 'svd' or 'dense'")
            u, s, vh = torch.linalg.svd(update.float(), full_matrices=False)
            update = LowRank(u[:, :self.rank] * s[:self.rank], vh[:self.rank].T)
        left, right = update.left.float(), update.right.float()
        if name in self.modules:
            left = torch.cat([self.modules[name].left, left], dim=1)
            right = torch.cat([self.modules[name].right, right], dim=1)
        if self.representation == "svd":
            left, right = truncate(left, right, self.rank)
        self.modules[name] = LowRank(left.contiguous(), right.contiguous())

    def matrix(self, name: str) -> torch.Tensor:
        """The dense W_past of one module (built on demand for the factored forms)."""
        return dense(self.modules[name])

    def penalty(self, updates: dict[str, torch.Tensor | LowRank], reduction: str = "sum") -> torch.Tensor:
        """Σ_m ‖ΔW^m ⊙ W_past^m‖_F² (or the mean over modules), one module's dense matrices at a time."""
        terms = []
        for name, past in self.modules.items():
            update = updates[name]
            if isinstance(update, LowRank):  # build ΔW (and a factored W_past) here and again in the backward pass
                past_tensors = (past.left, past.right) if isinstance(past, LowRank) else (past,)
                terms.append(checkpoint(_masked_energy_of_factors, update.left, update.right, *past_tensors,
                                        use_reentrant=False))
            else:  # a dense update is already in memory (the layer's forward pass made it)
                terms.append(masked_energy(update, dense(past)))
        total = torch.stack(terms)
        return total.sum() if reduction == "sum" else total.mean()

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
        kinds = {isinstance(past, LowRank) for past in modules.values()}
        if kinds and kinds != {self.representation != "dense"}:
            raise EllaError(f"the saved W_past is {'factored' if True in kinds else 'dense'} but this run uses the "
                            f"{self.representation!r} representation; pass the matching --w-past")
        self.modules = modules

    def to(self, device: torch.device) -> "PastUpdates":
        self.modules = {name: LowRank(p.left.to(device), p.right.to(device)) if isinstance(p, LowRank)
                        else p.to(device) for name, p in self.modules.items()}
        return self

"""InfLoRA: interference-free low-rank adaptation (Liang & Li, "InfLoRA: Interference-Free Low-Rank Adaptation for
Continual Learning", CVPR 2024), with the earlier tasks' input subspace kept as in GPM (Saha et al., "Gradient
Projection Memory for Continual Learning", ICLR 2021).

An update part: each task gets a fresh LoRA ΔW_t = s·B_t·A_t (as ``inclora``) whose A_t is designed, not trained.
Per adapted module, before training, the inputs x that the task's training examples send into the layer give the
covariance C = Σ x xᵀ (d_in x d_in, over every token).
With M (d_in x k, orthonormal columns) the earlier tasks' input subspace,

    C' = (I − M Mᵀ) C (I − M Mᵀ),        A_t = the top-r eigenvectors of C', as rows (orthonormal, A_t M = 0)

and only B_t trains (from zero). Where C' has fewer than r non-zero eigenvalues, A_t's remaining rows are other
directions orthogonal to M. After the task, as in the reference code, the same examples run through the trained
model once more, and their covariance C (of the inputs the layers now receive) gives M the task's own subspace:
the fewest top eigenvectors u_1..u_k of C' such that the energy of C the enlarged M captures reaches the
threshold τ_t of task t (0-based) of T, which rises linearly from τ to τ_end as in the reference code,

    τ_t = τ + (τ_end − τ)·t/T,    (tr(Mᵀ C M) + Σ_{i≤k} λ_i(C')) / tr(C) ≥ τ_t,    M ← orthonormalised [M, u_1..u_k]

keeping at most d_in − r columns (room for the next task's A); then the LoRA is merged into the model. (The paper
keeps the same subspace with DualGPM, which stores M or its complement, whichever is smaller.)

Where ella departs from the reference code (liangyanshuo/InfLoRA, written for ViTs): energy is GPM's, the
eigenvalues of C (the squared singular values of the inputs), where the reference squares the singular values of
C itself and so keeps fewer directions at the same τ; the first task keeps the fewest directions that reach τ_0,
as every later task does, where the reference keeps one fewer there; C comes from ``stats_examples`` (64) examples,
not the whole training set; and A's rows have norm 1 under peft's scaling α/r (4 at the defaults), where the
reference scales them to 1/√3 with no scaling, so the same learning rate takes steps about 7 times larger: the
learning rate is a hyper-parameter to choose on validation.

Why it is interference-free: the earlier tasks' inputs lie in span(M) up to 1 − τ of their energy, and
ΔW_t x = s·B_t·(A_t x) = 0 for every x in span(M), so the new task leaves those outputs as they were. Training B_t
alone equals fine-tuning W with every update confined to the rows of A_t (ΔW = ΔW A_tᵀ A_t): the new task's own
principal input directions off span(M).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft.tuners.lora import LoraLayer

from ..data import Task
from ..errors import EllaError
from .base import UPDATE, TaskData, hyperparameter, observe, register_method, register_part, require_data
from .inclora import TaskLoRA
from .lora import LoraHyperparameters, check_state_fits
from .w_past import LowRank


@dataclass
class InfLoRAHyperparameters(LoraHyperparameters):
    stats_examples: int = hyperparameter(64, "training examples of each task whose inputs to the adapted layers "
                                             "give the covariance C")
    gpm_threshold: float = hyperparameter(0.95, "τ: after the first task the input subspace M grows until it captures "
                                                "this fraction of the energy tr(C) of the task's inputs")
    gpm_threshold_end: float = hyperparameter(1.0, "τ_end: task t of T uses τ + (τ_end − τ)·t/T (t from 0), rising "
                                                   "from τ towards τ_end, which no task reaches, as in the reference "
                                                   "code")

    def __post_init__(self):
        super().__post_init__()
        if self.stats_examples < 1:
            raise EllaError(f"stats_examples must be at least 1 (got {self.stats_examples})")
        if not 0 < self.gpm_threshold < 1:
            raise EllaError(f"gpm_threshold must be in (0, 1) (got {self.gpm_threshold}); GPM uses 0.95 to 0.99")
        if not self.gpm_threshold <= self.gpm_threshold_end <= 1:
            raise EllaError(f"gpm_threshold_end must be in [gpm_threshold, 1] (got {self.gpm_threshold_end}); the "
                            "reference code rises from 0.95 to 1.0")


def input_covariances(model: torch.nn.Module, layers: dict[str, LoraLayer], batches) -> dict[str, torch.Tensor]:
    """C = Σ x xᵀ (fp32) over every token's input x to each of ``layers``, running ``model`` in eval mode
    (no dropout) over ``batches``."""
    covariances = {name: torch.zeros(layer.in_features, layer.in_features, device=layer.get_base_layer().weight.device)
                   for name, layer in layers.items()}

    def record(name):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            covariances[name] += x.T @ x
        return hook

    observe(model, [(layer, record(name)) for name, layer in layers.items()], batches, pre=True)
    return covariances


def residual_eigen(covariance: torch.Tensor, basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The d_in − k eigenvalues (descending) and eigenvectors (columns) of C' = (I − M Mᵀ) C (I − M Mᵀ) on the
    complement of M (its other k eigenvalues are 0, along M). Computed as Qᵀ C Q in an orthonormal basis Q of that
    complement, so that every eigenvector, also those of eigenvalue 0, is orthogonal to M."""
    complement = torch.linalg.qr(basis, mode="complete").Q[:, basis.shape[1]:]
    values, vectors = torch.linalg.eigh(complement.T @ covariance @ complement)
    return values.flip(0).clamp(min=0), complement @ vectors.flip(1)


def designed_lora_a(covariance: torch.Tensor, basis: torch.Tensor, rank: int) -> torch.Tensor:
    """A (rank x d_in): the top-``rank`` eigenvectors of C' as rows."""
    return residual_eigen(covariance, basis)[1][:, :rank].T


def extend_basis(basis: torch.Tensor, covariance: torch.Tensor, threshold: float, max_columns: int) -> torch.Tensor:
    """M with the fewest top eigenvectors of C' added so that it captures ``threshold`` of tr(C), at most
    ``max_columns`` columns in all; re-orthonormalised."""
    values, vectors = residual_eigen(covariance, basis)
    captured = torch.trace(basis.T @ covariance @ basis)
    # energy with the top j eigenvectors added, j = 0..n: how many j fall short of the threshold is the count needed
    energies = captured + torch.cat([values.new_zeros(1), values.cumsum(0)])
    needed = int((energies < threshold * torch.trace(covariance)).sum())
    added = min(needed, max_columns - basis.shape[1])
    return torch.linalg.qr(torch.cat([basis, vectors[:, :added]], dim=1)).Q


@register_part
class InfLoRA:
    name, kind = "inflora", UPDATE
    summary = "a fresh LoRA per task whose A is fixed to the task's top input directions off the earlier tasks'"
    config_class = InfLoRAHyperparameters
    default_learning_rate = 1e-3
    keeps_parameters = False
    lora_per_task = True
    low_rank_updates = True

    def __init__(self, config: InfLoRAHyperparameters):
        self.config = config
        self.lora = TaskLoRA(config)  # the task's LoRA, whose A is designed here
        self.bases: dict[str, torch.Tensor] = {}  # module name -> M, the earlier tasks' input subspace (d_in x k)
        self.num_tasks = 0  # T, for τ_t

    @property
    def adapter(self) -> str:
        return self.lora.adapter

    @property
    def target_modules(self) -> list[str]:
        return self.lora.target_modules

    def setup(self, model: torch.nn.Module, tasks: list[Task]) -> None:
        self.lora.setup(model, tasks)
        self.num_tasks = len(tasks)

    def layers(self, model: torch.nn.Module) -> dict[str, LoraLayer]:
        return self.lora.layers(model)

    def threshold(self, task_index: int) -> float:
        """τ_t = τ + (τ_end − τ)·t/T."""
        start, end = self.config.gpm_threshold, self.config.gpm_threshold_end
        return start + (end - start) * task_index / self.num_tasks

    def covariances(self, model: torch.nn.Module, data: TaskData) -> dict[str, torch.Tensor]:
        examples = data.batches(batch_size=1, limit=self.config.stats_examples)  # one at a time: no padding tokens
        return input_covariances(model, self.layers(model), examples)

    def task_updates(self, model: torch.nn.Module) -> dict[str, LowRank]:
        return self.lora.task_updates(model)

    def merged_updates(self, model: torch.nn.Module) -> dict[str, LowRank]:
        return self.lora.merged_updates(model)

    def prepare(self, model: torch.nn.Module, task_index: int, task: Task,
                data: TaskData | None = None) -> torch.nn.Module:
        data = require_data(data, self.name, "to measure the inputs of the adapted layers")
        model = self.lora.prepare(model, task_index, task, data)
        adapter, rank = self.adapter, self.config.lora_r
        layers = self.layers(model)
        check_state_fits(self.name, {name: (None, basis.shape[0]) for name, basis in self.bases.items()}, layers)
        # with B = 0 the new LoRA leaves every output as it was: these are the model's inputs before the task
        covariances = self.covariances(model, data)
        for name, layer in layers.items():
            covariance = covariances[name]
            basis = self.basis(name, covariance)
            if layer.in_features - basis.shape[1] < rank:
                raise EllaError(f"module {name} has {layer.in_features} inputs, {basis.shape[1]} of them taken by the "
                                f"earlier tasks' subspace: no room for A's lora_r = {rank} orthonormal rows; choose "
                                f"lora_r <= {layer.in_features - basis.shape[1]}")
            weight = layer.lora_A[adapter].weight
            with torch.no_grad():
                weight.copy_(designed_lora_a(covariance, basis, rank))
            weight.requires_grad_(False)
        return model

    def finish(self, model: torch.nn.Module, task_index: int, task: Task,
               data: TaskData | None = None) -> torch.nn.Module:
        data = require_data(data, self.name, "to measure the inputs of the adapted layers after training")
        for name, covariance in self.covariances(model, data).items():  # the trained model's inputs
            self.bases[name] = extend_basis(self.basis(name, covariance), covariance, self.threshold(task_index),
                                            covariance.shape[0] - self.config.lora_r)
        return self.lora.finish(model, task_index, task, data)

    def basis(self, name: str, covariance: torch.Tensor) -> torch.Tensor:
        """M of module ``name`` next to its covariance (an empty d_in x 0 matrix before the first task)."""
        basis = self.bases.get(name)
        return covariance.new_zeros(covariance.shape[0], 0) if basis is None else basis.to(covariance)

    def report(self) -> dict:
        """How much of each module's input space the earlier tasks' subspaces take (mean of k / d_in)."""
        fractions = [basis.shape[1] / basis.shape[0] for basis in self.bases.values()]
        return {"input_subspace_fraction": sum(fractions) / len(fractions)} if fractions else {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: basis.contiguous() for name, basis in self.bases.items()}  # QR's Q is column-major

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.bases = dict(state)


register_method("inflora", "inflora",
                "IncLoRA with A fixed to the task's top input directions off the earlier tasks' (GPM) subspace; "
                "B trains")

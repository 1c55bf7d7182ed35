"""EWC: online elastic weight consolidation, a regulariser on an update part that keeps its parameters through the
sequence: the ``ewc`` method is ``seqlora+ewc`` (one LoRA trained through all tasks); ``seqft+ewc`` is the classic
EWC on every weight.

From the second task on, the loss adds a Fisher-weighted pull towards the parameters the previous task ended with:

    L = CE + (λ/2) · Σ_i F_i (θ_i − θ*_i)²        (i runs over the update part's trainable parameters:
                                                    the LoRA's, or every weight under seqft)

θ* are the parameters at the end of the previous task. F is the diagonal Fisher information, accumulated over the
tasks (online EWC): F ← F + F_t after task t, with F_t the empirical Fisher of the task, the mean over up to
``fisher_examples`` of its training examples n of the squared gradient of that example's answer loss ℓ_n
(the mean NLL of its answer tokens, the training loss of a batch of one):

    F_t,i = (1/N) Σ_n (∂ℓ_n / ∂θ_i)²

Coordinates that earlier tasks' losses are sensitive to (large F_i) are held near θ*, the others stay free.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data import Task
from ..errors import EllaError
from ..evaluation import answer_token_nll
from .base import REGULARISER, TaskData, device_of, hyperparameter, register_method, register_part, require_data, zero


@dataclass
class EWCHyperparameters:
    # The pull λ·F·(θ − θ*) matches a per-example gradient √F once a parameter drifted 1/(λ√F). SmolLM2-135M's
    # LoRA Fisher was 2e-6 (median) to 2e-4 (mean), so λ = 1e4 puts that drift at 0.007-0.07, the scale of the
    # LoRA weights themselves; at λ = 1 the penalty was a thousandth of the loss.
    ewc_lambda: float = hyperparameter(1e4, "penalty weight λ (0: SeqLoRA); depends on the Fisher's scale")
    fisher_examples: int = hyperparameter(64, "training examples of each task that estimate its Fisher")

    def __post_init__(self):
        if not self.ewc_lambda >= 0:
            raise EllaError(f"ewc_lambda must be non-negative (got {self.ewc_lambda}); 0 is SeqLoRA")
        if self.fisher_examples < 1:
            raise EllaError(f"fisher_examples must be at least 1 (got {self.fisher_examples})")


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: param for name, param in model.named_parameters() if param.requires_grad}


def empirical_fisher(model: torch.nn.Module, batches) -> dict[str, torch.Tensor]:
    """F_t of the module docstring for every trainable parameter, from ``batches`` of one example each; in eval
    mode (no dropout). The gradients come from ``torch.autograd.grad``, so the parameters' ``.grad`` stay as
    they were."""
    params = trainable_parameters(model)
    fisher = {name: torch.zeros_like(param, dtype=torch.float32) for name, param in params.items()}
    count = 0
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            nll, mask = answer_token_nll(model, batch)
            grads = torch.autograd.grad(nll.sum() / mask.sum(), list(params.values()), materialize_grads=True)
            for name, grad in zip(params, grads):
                fisher[name] += grad.float() ** 2
            count += 1
    finally:
        model.train(was_training)
    return {name: value / max(count, 1) for name, value in fisher.items()}


@register_part
class EWC:
    name, kind = "ewc", REGULARISER
    summary = "(λ/2)·Σ F·(θ − θ*)²: online EWC, a Fisher-weighted pull to the previous task's parameters"
    config_class = EWCHyperparameters

    @staticmethod
    def check_update(update: type) -> None:
        if not update.keeps_parameters:
            raise EllaError(f"ewc pulls the parameters towards their values after the previous task, but {update.name} "
                            "trains new ones every task: combine it with seqlora or seqft")

    def __init__(self, config: EWCHyperparameters):
        self.config = config
        self.fisher: dict[str, torch.Tensor] = {}  # parameter name -> Σ_t F_t
        self.previous: dict[str, torch.Tensor] = {}  # parameter name -> θ* (end of the previous task)

    def prepare(self, model: torch.nn.Module, task_index: int, task: Task, data: TaskData | None = None) -> None:
        params = trainable_parameters(model)
        wrong = sorted(name for name, fisher in self.fisher.items()
                       if name not in params or params[name].shape != fisher.shape)
        if wrong:
            raise EllaError(f"the EWC state does not fit this model: {len(wrong)} parameter(s), e.g. {wrong[0]}, do "
                            "not train here or differ in shape; load a state saved with the same model and LoRA "
                            "settings")
        device = device_of(model)
        # in the parameters' order, which a loaded state (in its file's order) lacks: the penalty sums in this order
        self.fisher = {name: self.fisher[name].float().to(device) for name in params if name in self.fisher}
        self.previous = {name: self.previous[name].float().to(device) for name in params if name in self.previous}

    def penalty(self, model: torch.nn.Module) -> torch.Tensor:
        if not self.fisher:  # the first task (or λ = 0 throughout): nothing to consolidate
            return zero(model)
        params = dict(model.named_parameters())
        total = sum((fisher * (params[name].float() - self.previous[name]) ** 2).sum()
                    for name, fisher in self.fisher.items())
        return self.config.ewc_lambda / 2 * total

    def finish(self, model: torch.nn.Module, task_index: int, task: Task, data: TaskData | None = None) -> None:
        if self.config.ewc_lambda > 0:  # F and θ* serve only the penalty: with λ = 0 keep nothing
            data = require_data(data, self.name, "to estimate the Fisher information")
            task_fisher = empirical_fisher(model, data.batches(batch_size=1, limit=self.config.fisher_examples))
            self.fisher = {name: self.fisher.get(name, 0) + value for name, value in task_fisher.items()}
            self.previous = {name: param.detach().float().clone()
                             for name, param in trainable_parameters(model).items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**{f"fisher.{name}": value for name, value in self.fisher.items()},
                **{f"previous.{name}": value for name, value in self.previous.items()}}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        fisher = {key.removeprefix("fisher."): value for key, value in state.items() if key.startswith("fisher.")}
        previous = {key.removeprefix("previous."): value for key, value in state.items()
                    if key.startswith("previous.")}
        if len(fisher) + len(previous) != len(state) or fisher.keys() != previous.keys():
            raise EllaError("not an EWC state: expected a 'fisher.<parameter>' and a 'previous.<parameter>' tensor "
                            "for every parameter; load the method_state.safetensors of an ewc run")
        self.fisher, self.previous = fisher, previous


register_method("ewc", "seqlora+ewc",
                "SeqLoRA + (λ/2)·Σ F·(θ − θ*)²: online EWC, a Fisher-weighted pull to the previous task's LoRA")

"""What every objective shares: its output type, the optional hooks the trainer calls, and a registry.

The trainer calls, for every epoch and never branching on the objective type:

    traj = objective.prepare(traj, collective)             # epoch-level statistics (e.g. DDPO advantages)
    batch = objective.select_transitions(traj, generator)  # which transitions to train on
    out = objective(batch, policy, lookahead, beta=beta)   # LossOutput; out.loss.backward()

``trainable_modules()`` returns the objective's own heads (flow networks); the policy is passed in on
every call and never owned by the objective.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gfnalign.core.batches import TrajectoryBatch, TransitionBatch
from gfnalign.core.protocols import Lookahead, PolicyModel


def _no_gather(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass(frozen=True)
class Collective:
    """What an objective sees of the other processes when it computes epoch statistics in ``prepare``.

    ``gather(x)``: every process's ``x`` (same shape on each) concatenated along dim 0 in rank order;
    ``rank`` / ``world``: this process's place. The default is one process. The trainer builds it from
    its process group, so objectives never import a distributed backend.
    """

    rank: int = 0
    world: int = 1
    gather: Callable[[torch.Tensor], torch.Tensor] = _no_gather

    def own_rows(self, gathered: torch.Tensor) -> torch.Tensor:
        """This process's slice of a gathered tensor."""
        return gathered.reshape(self.world, -1, *gathered.shape[1:])[self.rank]


SINGLE_PROCESS = Collective()


@dataclass
class LossOutput:
    """``loss``: scalar to backpropagate (mean over transitions). ``residual``: [N] per-transition
    balance residual or surrogate (detached, for tests and logging). ``metrics``: flat floats, keys
    namespaced like ``loss/<term>``."""

    loss: torch.Tensor
    residual: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)


class Objective(nn.Module):
    """Base class: holds the objective's heads as sub-modules so ``state_dict`` checkpoints them."""

    name: str = "objective"
    #: True when the objective needs ∇r (lookahead.grad_log_reward), i.e. a differentiable reward.
    needs_reward_gradient: bool = False
    #: True when the objective uses the frozen reference policy (adapters off).
    needs_reference: bool = False
    #: True when the loss needs every transition of a trajectory in the same batch (trajectory balance):
    #: the training loops then cut micro-batches only at trajectory boundaries.
    whole_trajectories: bool = False
    #: True when :meth:`log_start_weight` returns a learned value (a tilted start is possible).
    learns_start_value: bool = False
    #: Which cached lookahead fields of a TransitionBatch the objective reads: ``"reward"`` for
    #: ``lookahead_reward_t`` / ``lookahead_reward_next``. The trainer fills the cache only for these (and
    #: only for the selected transitions); an objective that reads nothing costs no lookahead work.
    lookahead_reads: frozenset[str] = frozenset()
    #: True when the loss is the mean of independent per-transition terms (no leave-one-out groups, no
    #: trajectory sums): the trainer may then backpropagate a micro-batch in parts within its memory budget.
    transition_separable: bool = False

    def prepare(self, traj: TrajectoryBatch, collective: Collective = SINGLE_PROCESS) -> TrajectoryBatch:
        return traj

    def select_transitions(self, traj: TrajectoryBatch, generator: torch.Generator | None = None) -> TransitionBatch:
        raise NotImplementedError

    def forward(  # type: ignore[override]
        self, batch: TransitionBatch, policy: PolicyModel, lookahead: Lookahead | None, *, beta: float
    ) -> LossOutput:
        raise NotImplementedError

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {name: module for name, module in self.named_children()}

    def after_optimizer_step(self) -> None:
        """Called by the training loops after every optimizer step (e.g. to move a target network)."""

    def log_start_weight(
        self, policy: PolicyModel, lookahead: Lookahead | None, x: torch.Tensor, cond: Any, *, beta: float
    ) -> torch.Tensor | None:
        """``[N]`` log of (the start law this objective's optimum needs) / N(0, I) at start states ``x``, up to a
        constant, or None when the objective learns no value at the start (see
        :mod:`gfnalign.sampling.start`: sampling with it removes the value-function bias)."""
        return None


# name -> factory(**options) -> Objective ; filled by each objective module at import.
REGISTRY: dict[str, Callable[..., Objective]] = {}


def register(name: str) -> Callable[[Callable[..., Objective]], Callable[..., Objective]]:
    def deco(factory: Callable[..., Objective]) -> Callable[..., Objective]:
        REGISTRY[name] = factory
        return factory

    return deco


def build_objective(name: str, **options: Any) -> Objective:
    """Construct a registered objective by name, e.g. ``build_objective("dag-db", state_shape=(4, 8, 8))``."""
    import gfnalign.objectives  # noqa: F401  (registers the built-ins)

    if name not in REGISTRY:
        raise ValueError(f"method={name!r} is not known; choose one of {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name](**options)

"""Machinery shared by the gradient-informed (∇-DB) objectives: scores, flow scores, residual terms.

Per-transition reduction of a squared score residual: the **mean over the state dimensions**
(``mean_dims(r**2)``), like the authors' element-wise MSE. It keeps the loss scale independent of the
latent size and comparable with their λ values; the scores themselves are exact gradients of the
log-densities (of ``sum``-reduced log-probs, or divided by D for ``log_prob_reduction="mean"``).
Note that score residuals scale like (c_t/σ_t²)·Δε, so low-noise steps dominate (spec/nabla_gfn.md §1.3).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from gfnalign.core.batches import TransitionBatch
from gfnalign.core.kernels import GaussianKernel
from gfnalign.core.protocols import Lookahead, PolicyModel
from gfnalign.objectives.common import (
    GAMMAS,
    TransitionObjective,
    apply_rows,
    check_choice,
    check_nonneg,
    gamma_weight,
    lookahead_grad,
)
from gfnalign.objectives.heads import make_flow_score_head


def reverse_score(kernel: GaussianKernel, x_next: torch.Tensor, x_t: torch.Tensor, *, create_graph: bool) -> torch.Tensor:
    """∇_{x_t} log P_F(x_next | x_t) (summed log-density) by autograd through the network at ``x_t``."""
    log_p = kernel.log_prob(x_next, "sum")
    if not log_p.requires_grad:
        raise RuntimeError(
            "the reverse score ∇_{x_t} log P_F needs a graph from x_t through the policy's eps; the policy "
            "returned an eps without grad_fn (for reference=True, freeze the weights with requires_grad_(False) "
            "instead of running under torch.no_grad())"
        )
    (grad,) = torch.autograd.grad(log_p.sum(), x_t, create_graph=create_graph, retain_graph=True)
    return grad


class ScoreBalanceObjective(TransitionObjective):
    """Common options of the ∇-DB objectives (see the subclasses for the losses)."""

    default_fraction = 0.1
    default_stratified = True
    needs_reward_gradient = True

    def __init__(
        self,
        state_shape: Sequence[int] | None = None,
        cond_dim: int | None = None,
        *,
        flow_score_head: nn.Module | None = None,
        forward_looking: bool = True,
        gamma: str = "alpha_bar",
        reverse_loss_weight: float = 1.0,
        reverse_trains_policy: bool = False,
        use_flow_head: bool = True,
        head_hidden: int | None = None,
        head_zero_init: bool = True,
        num_train_timesteps: int = 1000,
        **common: Any,
    ):
        super().__init__(**common)
        check_choice("gamma", gamma, GAMMAS)
        self.gamma = gamma
        self.forward_looking = bool(forward_looking)
        self.reverse_loss_weight = check_nonneg("reverse_loss_weight", reverse_loss_weight)
        self.reverse_trains_policy = bool(reverse_trains_policy)
        self.flow_score_head: nn.Module | None = None
        if use_flow_head:
            if flow_score_head is None:
                if state_shape is None:
                    raise ValueError(f"{self.name}: pass state_shape (e.g. (4, 64, 64) or (2,)) or flow_score_head")
                flow_score_head = make_flow_score_head(
                    state_shape, cond_dim, hidden=head_hidden, num_train_timesteps=num_train_timesteps,
                    zero_init=head_zero_init,
                )
            self.flow_score_head = flow_score_head

    @property
    def uses_reverse(self) -> bool:
        return self.reverse_loss_weight > 0

    # -- flow scores -----------------------------------------------------------------------------------
    def head(self, x: torch.Tensor, t: torch.Tensor, cond: Any, rows: torch.Tensor) -> torch.Tensor:
        """g_phi on ``rows`` (zeros elsewhere, and everywhere without a head)."""
        if self.flow_score_head is None:
            return torch.zeros_like(x)
        return apply_rows(self.flow_score_head, rows, x, t, cond, x).to(x.dtype)

    def forward_looking_term(
        self, lookahead: Lookahead | None, cached: torch.Tensor | None, x: torch.Tensor, t: torch.Tensor, cond: Any,
        alpha_bar: torch.Tensor, terminal: torch.Tensor, beta: float,
    ) -> torch.Tensor:
        """``beta * γ * ∇r(x̂0(x))`` where forward-looking applies, plus ``beta * ∇r(x)`` on terminal rows
        (γ = 1 at the clean terminal state); zeros on the remaining rows."""
        rows = terminal if not self.forward_looking else torch.ones_like(terminal)
        if not bool(rows.any()):
            return torch.zeros_like(x)
        grad = lookahead_grad(lookahead, cached, x, t, cond, terminal, rows)
        g = torch.where(terminal, torch.ones_like(alpha_bar), gamma_weight(self.gamma, alpha_bar))
        return beta * g.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1))) * grad

    # -- policy scores ---------------------------------------------------------------------------------
    def policy_scores(
        self, policy: PolicyModel, batch: TransitionBatch, *, reference: bool
    ) -> tuple[torch.Tensor, GaussianKernel, torch.Tensor, torch.Tensor | None]:
        """``(eps, kernel, forward score [N,...], reverse score or None)``, scores of summed log-densities.

        The reference's scores are detached; the policy's reverse score keeps its graph only with
        ``reverse_trains_policy``.
        """
        need_rev = self.uses_reverse
        x_t = batch.x_t.detach().requires_grad_(True) if need_rev else batch.x_t
        if reference and not need_rev:
            with torch.no_grad():
                eps, kernel = self.policy_kernel(policy, batch, reference=True)
        else:
            eps, kernel = self.policy_kernel(policy, batch, reference=reference, x_t=x_t)
        fwd = kernel.score(batch.x_next)
        rev = None
        if need_rev:
            create = self.reverse_trains_policy and not reference
            rev = reverse_score(kernel, batch.x_next, x_t, create_graph=create)
            if not create:
                rev = rev.detach()
        if reference:
            eps, fwd = eps.detach(), fwd.detach()
        return eps, kernel, fwd, rev

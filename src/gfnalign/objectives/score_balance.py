"""Machinery shared by the gradient-informed (∇-DB) objectives: scores, flow scores, residual terms.

Per-transition reduction of a squared score residual: the **mean over the state dimensions**
(``mean_dims(r**2)``), like the authors' element-wise MSE. It keeps the loss scale independent of the
latent size and comparable with their λ values; the scores themselves are exact gradients of the
log-densities (of ``sum``-reduced log-probs, or divided by D for ``log_prob_reduction="mean"``).
Note that score residuals scale like (c_t/σ_t²)·Δε, so low-noise steps dominate (spec/nabla_gfn.md §1.3).

Reproducing the ∇-GFlowNet code: use ``log_prob_reduction="sum"`` (the default). Its scores are exact
per-element gradients −(x_next − μ)/σ² and its "mean" is only the MSE reduction over elements, which
this implementation always applies; ``"mean"`` here would divide the scores by D (β·D rescaling).
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
    apply_two,
    check_choice,
    check_nonneg,
    gamma_weight,
    lookahead_pair,
)
from gfnalign.objectives.heads import make_flow_score_head

#: per-transition weights of the squared score residuals (see :func:`residual_weights`)
RESIDUAL_WEIGHTS = ("none", "sigma2")


def residual_weights(kernel: GaussianKernel, mode: str) -> torch.Tensor:
    """``[N]`` weight of each transition's squared score residuals.

    ``"none"``: 1 (the authors' plain score-space MSE). ``"sigma2"``: σ_t², the variance of the policy's
    Gaussian step x_t -> x_next (a fixed function of the schedule and eta, never trained). σ_t²·‖r‖² is
    ‖σ_t²·r‖²/σ_t², i.e. the residual measured as a *mean shift* (σ_t²·score) in units of the step's
    own variance: score residuals carry a noise term ∝ z/σ_t (see :class:`~gfnalign.objectives.nabla_db.NablaDB`),
    whose square ~1/σ_t² this weight brings to O(1) at every step.

    A positive per-transition weight changes only how the transitions are weighed: every zero-residual
    solution stays a zero-residual solution (the fixed point of an exactly balanced chain is unchanged).
    Where no exact solution exists (a Gaussian P_F against a fixed P_B), the least-squares compromise does
    move, towards fitting the high-noise steps better.
    """
    check_choice("residual_weight", mode, RESIDUAL_WEIGHTS)
    n = kernel.mean.shape[0]
    if mode == "none":
        return torch.ones(n, dtype=kernel.mean.dtype, device=kernel.mean.device)
    var = (kernel.std.detach() ** 2).to(kernel.mean.dtype)
    return var.expand_as(kernel.mean).flatten(1)[:, 0].clone()


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


def mean_vjp(kernel: GaussianKernel, vector: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
    """J_μ(x_t)ᵀ · vector, J_μ = ∂μ/∂x_t of a kernel built with a graph from ``x_t``: one vector-Jacobian
    product through the network (its graph is freed), detached."""
    (grad,) = torch.autograd.grad((kernel.mean * vector.detach()).sum(), x_t, retain_graph=False)
    return grad.detach()


def expected_reverse_score(kernel: GaussianKernel, target_mean: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
    """E_{x_next ~ N(target_mean, σ²)}[∇_{x_t} log P(x_next | x_t)] = J_μ(x_t)ᵀ (target_mean − μ(x_t)) / σ².

    ``kernel`` = N(μ(x_t), σ²) built with a graph from ``x_t`` (σ must not depend on x_t, as in DDPM/DDIM).
    """
    return mean_vjp(kernel, (target_mean - kernel.mean) / kernel.std**2, x_t)


class ScoreBalanceObjective(TransitionObjective):
    """Common options of the ∇-DB objectives (see the subclasses for the losses)."""

    default_fraction = 0.1
    default_stratified = True
    needs_reward_gradient = True
    transition_separable = True  # score residuals per transition (∇ w.r.t. each row's own state)

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
    def flow_scores(
        self, batch: TransitionBatch, lookahead: Lookahead | None, beta: float, t: torch.Tensor,
        t_next: torch.Tensor, a: torch.Tensor, an: torch.Tensor, *, at_t: bool, final_head: bool,
        at_next: bool = True, reward_grad_t: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``(ψ(x_next), ψ(x_t) or None, g_phi(x_final) or None)``, each like x.

        ψ(x, t) = g_phi(x, t, c) + beta·γ(ᾱ_t)·∇r(x̂0(x)) (the second term with ``forward_looking``);
        on terminal rows ψ(x_next) = beta·∇r(x_final) (γ = 1, no g_phi). ``g_phi(x_final)`` (terminal rows,
        zeros elsewhere) is returned when ``final_head`` for the terminal loss. The head runs once over all
        the states it is needed at, and so does the Lookahead. ``at_next=False``: ψ(x_next) is not needed
        at non-terminal rows (returned as zeros there), which saves the head and the Lookahead on them. ``reward_grad_t``: ∇r(x̂0(x_t)) already read from
        one of the objective's own passes (:meth:`shared_reward_grad`); the Lookahead is then called at x_next only.
        """
        x_t, x_next, cond, last = batch.x_t, batch.x_next, batch.cond, batch.is_last
        ones, zeros = torch.ones_like(last), torch.zeros_like(last)

        def bcast(w: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
            return w.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))

        # reward-gradient terms (raw ∇r from the cache or one Lookahead call)
        rows_next = ones if (self.forward_looking and at_next) else last
        rows_t = ones if (self.forward_looking and at_t and reward_grad_t is None) else zeros
        grad_t, grad_next = lookahead_pair(
            "grad", lookahead, batch.lookahead_grad_t, batch.lookahead_grad_next,
            x_t, t, rows_t, x_next, t_next, rows_next, last, cond,
        )
        if reward_grad_t is not None:
            grad_t = reward_grad_t
        gamma_next = torch.where(last, torch.ones_like(an), gamma_weight(self.gamma, an))
        psi_next = beta * bcast(gamma_next, x_next) * grad_next
        psi_t = beta * bcast(gamma_weight(self.gamma, a), x_t) * grad_t if at_t else None
        g_final = None
        if self.flow_score_head is not None:
            head_next = (~last if at_next else zeros) | (last if final_head else zeros)
            g_next, g_t = apply_two(self.flow_score_head, x_next, t_next, head_next, x_t, t, ones if at_t else zeros,
                                    cond, x_next, x_t)
            m = last.reshape(-1, *([1] * (x_next.dim() - 1)))
            psi_next = psi_next + torch.where(m, torch.zeros_like(g_next), g_next)
            if final_head:
                g_final = torch.where(m, g_next, torch.zeros_like(g_next))
            if at_t:
                psi_t = psi_t + g_t
        return psi_next, psi_t, g_final

    def prefetch_lookahead_grads(
        self, batch: TransitionBatch, lookahead: Lookahead | None, t: torch.Tensor, t_next: torch.Tensor, *,
        at_t: bool, at_next: bool = True, shared: bool = False,
    ) -> TransitionBatch:
        """The batch with the Lookahead's ∇r(x̂0) filled in at the states :meth:`flow_scores` will read
        (``lookahead_grad_t`` / ``_next``, as a cache), computed now, before any of the objective's network
        passes keeps a graph: the Lookahead's own x̂0 pass and its decoder + reward backward are the largest
        transient of a transition at image size, and so never coexist with the policy's or the reference's
        graph (peak memory). The values are the ones :meth:`flow_scores` would compute (same rows, same
        Lookahead call). ``shared``: ∇r(x̂0(x_t)) will be read from one of the objective's own passes, so
        the x_t rows are left out."""
        if lookahead is None:
            return batch
        last = batch.is_last
        ones, zeros = torch.ones_like(last), torch.zeros_like(last)
        rows_next = ones if (self.forward_looking and at_next) else last
        rows_t = ones if (self.forward_looking and at_t and not shared) else zeros
        fill_t = batch.lookahead_grad_t is None and bool(rows_t.any())
        fill_next = batch.lookahead_grad_next is None and bool(rows_next.any())
        if not (fill_t or fill_next):
            return batch
        grad_t, grad_next = lookahead_pair(
            "grad", lookahead, batch.lookahead_grad_t, batch.lookahead_grad_next,
            batch.x_t, t, rows_t, batch.x_next, t_next, rows_next, last, batch.cond,
        )
        fields = {}
        if fill_t:
            fields["lookahead_grad_t"] = grad_t
        if fill_next:
            fields["lookahead_grad_next"] = grad_next
        return batch.with_fields(**fields)

    # -- policy scores ---------------------------------------------------------------------------------
    def policy_scores(
        self, policy: PolicyModel, batch: TransitionBatch, *, reference: bool, lookahead: Lookahead | None = None,
    ) -> tuple[torch.Tensor, GaussianKernel, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``(eps, kernel, forward score [N,...], reverse score or None, ∇r(x̂0(x_t)) or None)``, scores of
        summed log-densities.

        The reference's scores are detached; the policy's reverse score keeps its graph only with
        ``reverse_trains_policy``. With ``lookahead`` (a lookahead whose x̂0 comes from this very pass, see
        :meth:`shared_lookahead_pass`) the pass is built with a graph from x_t and the lookahead's
        ∇_{x_t} r(x̂0(x_t)) is read from it (no second network pass at x_t).
        """
        need_rev = self.uses_reverse
        need_graph = need_rev or lookahead is not None
        x_t = batch.x_t.detach().requires_grad_(True) if need_graph else batch.x_t
        if reference and not need_graph:
            with torch.no_grad():
                eps, kernel = self.policy_kernel(policy, batch, reference=True)
        else:
            eps, kernel = self.policy_kernel(policy, batch, reference=reference, x_t=x_t)
        reward_grad = None
        if lookahead is not None:
            reward_grad = self.shared_reward_grad(lookahead, x_t, eps, policy, batch)
        fwd = kernel.score(batch.x_next)
        rev = None
        if need_rev:
            create = self.reverse_trains_policy and not reference
            rev = reverse_score(kernel, batch.x_next, x_t, create_graph=create)
            if not create:
                rev = rev.detach()
        if reference:
            eps, fwd = eps.detach(), fwd.detach()
        return eps, kernel, fwd, rev, reward_grad

    # -- a lookahead read from the objective's own pass ------------------------------------------------
    def shared_lookahead_pass(
        self, lookahead: Lookahead | None, policy: PolicyModel, batch: TransitionBatch, *, at_t: bool
    ) -> str | None:
        """``"policy"`` / ``"reference"``: the pass at x_t that ∇r(x̂0(x_t)) can be read from, or None when
        the lookahead gradient at x_t is not needed, is cached on the batch, or comes from another network
        (a lookahead without :class:`~gfnalign.core.protocols.SharedPassLookahead`'s ``x0_pass``)."""
        if not (at_t and self.forward_looking) or batch.lookahead_grad_t is not None or lookahead is None:
            return None
        x0_pass = getattr(lookahead, "x0_pass", None)
        return x0_pass(policy) if callable(x0_pass) else None

    @staticmethod
    def shared_reward_grad(
        lookahead: Lookahead, x_t: torch.Tensor, eps: torch.Tensor, policy: PolicyModel, batch: TransitionBatch
    ) -> torch.Tensor:
        """∇_{x_t} r(x̂0(x_t)) with x̂0 = ``schedule.predict_x0`` of the policy's output (ε for VP, the velocity
        for rectified flow), which has a graph from the leaf ``x_t``: ∇_{x0} r by the lookahead (decoder and
        reward), then one VJP through that graph, which is kept for the loss. Equal to ``lookahead.grad_log_reward`` at the (never terminal) x_t, without its network pass."""
        x0 = policy.schedule.predict_x0(x_t, eps, batch.step)
        g0 = lookahead.grad_log_reward_x0(x0.detach(), batch.cond)  # type: ignore[attr-defined]
        (grad,) = torch.autograd.grad(x0, x_t, grad_outputs=g0.to(x0.dtype), retain_graph=True)
        return grad.detach()

"""∇-DB: gradient-informed detailed balance with the noising P_B (spec/nabla_gfn.md §2)."""

from __future__ import annotations

from typing import Any

import torch

from gfnalign.core.batches import TransitionBatch
from gfnalign.core.protocols import Lookahead, PolicyModel
from gfnalign.objectives.base import LossOutput, register
from gfnalign.objectives.common import apply_two, approx_kl, check_choice, mean_dims
from gfnalign.objectives.score_balance import RESIDUAL_WEIGHTS, ScoreBalanceObjective, residual_weights

FORWARD_CONTROLS = ("none", "antithetic")


@register("nabla-db")
class NablaDB(ScoreBalanceObjective):
    r"""∇-DB: squared residuals of the gradients of the log detailed-balance condition.

    With flow score ψ(x, t) = ∇_x log F(x, t) parametrised as

        ψ(x, t) = g_phi(x, t, c) + beta * γ(ᾱ_t) * ∇_x r(x̂0(x))     (forward_looking; g_phi alone otherwise)
        ψ(x_final) = beta * ∇r(x_final)                              (terminal boundary, γ = 1, no g_phi)

    the per-transition loss is

        r_fwd = ∇_{x_next}[log P_F^θ − log P_B](x_t, x_next) − ψ(x_next, t_next)
        r_rev = ∇_{x_t}[log P_F^θ − log P_B](x_t, x_next) + ψ(x_t, t)
        L = mean_N [ mean_dims r_fwd² + w_B · mean_dims r_rev² + λ·mean_dims(ε_θ − ε_old)² ]

    P_B scores are closed form (:meth:`gfnalign.core.NoiseSchedule.score_pb_next` / ``score_pb_t``),
    s_θ^→ is closed form in ε_θ, s_θ^← is autograd through the policy at x_t.

    Fixed point: both gradient identities ⇒ the log-DB residual is a per-step constant, absorbed by
    the (unnormalised) flows; with the terminal boundary the terminal marginal is ∝ exp(beta·r(x))
    (Lebesgue measure: like DAG-DB, the prior is kept only through initialisation / trust region).
    ``log_prob_reduction="mean"`` divides the P_F/P_B scores by D: target ∝ exp(D·beta·r).

    Where gradients stop:

    ==============================  ==================================  =============
    term                            theta (policy)                      phi (g head)
    ==============================  ==================================  =============
    s_θ^→ (closed form in ε_θ)      yes                                 --
    s_θ^← (autograd w.r.t. x_t)     only with reverse_trains_policy     --
    P_B scores                      constant                            constant
    g_phi(x_next), g_phi(x_t)       --                                  yes
    beta·γ·∇r(x̂0), beta·∇r(x_T)     no                                  no
    trust region                    yes                                 --
    ==============================  ==================================  =============

    ``prior_score=True`` adds the pretrained model's marginal score −ε_#(x, t)/√(1−ᾱ_t) (Tweedie; detached,
    one reference pass) to ψ at non-terminal states, so g_phi only learns the correction to the pretrained
    flow score instead of the whole ∇log p_t from zero (the fixed point is unchanged: ψ is just
    re-parametrised; ``needs_reference`` becomes True).

    ``residual_weight`` (``"none"`` default | ``"sigma2"``): multiply each transition's squared residuals
    (forward and reverse) by the step variance σ_t² (:func:`~gfnalign.objectives.score_balance.residual_weights`),
    i.e. measure them in mean space. It changes only the weighting: a zero-residual solution stays one.
    But with a Gaussian P_F against the fixed P_B no exact solution exists, so the least-squares
    compromise moves: on the toy (ring4-linear β=0.5, grid9-quadratic) it was far worse (see BENCHMARKS.md).

    ``forward_control`` (``"none"`` default | ``"antithetic"``): a control variate for the policy gradient
    of the forward loss. Given x_t, x_next = μ_old + σ_t z (μ_old from ``batch.eps_old``, the sampling
    mean), and s_θ^→ − s_B^→ = (μ_θ − μ_old)/σ_t² + [terms in x_t] + κ_t z with κ_t = −σ_t/(1 − ᾱ_next)
    (θ- and φ-free). That κ_t z is *not* pure noise: ψ(x_next) depends on z too and cancels most of it
    (−ψ(μ_old+σz) ≈ −ψ(μ_old) − σ J_ψ z), so subtracting κ_t z alone would add variance. What is exact:
    ∂r_fwd/∂θ = ∂μ_θ/σ_t² depends on x_t only, so the θ-gradient E[2 r ∂r/∂θ] needs only E[r | x_t], and
    the antithetic residual r̄ = ½(r(z) + r(−z)) (the second term at the mirrored state 2μ_old − x_next,
    one extra flow-score / lookahead pass, no graph) has the same conditional mean. The θ-gradient becomes
    2 r̄ ∂μ_θ/σ_t²: unbiased, with every odd-in-z term (κ_t z and ψ's linear part) removed. The head's
    gradient and the loss value are unchanged (φ regresses E[·|x_next], where the mirror would bias it),
    so the fixed point is unchanged.

    ``reverse_trains_policy`` (default False, like the authors' code) builds the reverse score with
    ``create_graph=True`` so the reverse loss also trains θ (second order, expensive). Squared score
    residuals are averaged over dimensions per transition (see :mod:`.score_balance`).
    """

    name = "nabla-db"
    needs_reward_gradient = True
    needs_reference = False

    def __init__(self, *args: Any, prior_score: bool = False, residual_weight: str = "none",
                 forward_control: str = "none", **kw: Any):
        super().__init__(*args, **kw)
        check_choice("residual_weight", residual_weight, RESIDUAL_WEIGHTS)
        check_choice("forward_control", forward_control, FORWARD_CONTROLS)
        self.residual_weight = residual_weight
        self.forward_control = forward_control
        self.prior_score = bool(prior_score)
        # instance attribute: the trainer reads the flag from the built objective
        self.needs_reference = self.prior_score

    def reference_scores(
        self, policy: PolicyModel, batch: TransitionBatch, t: torch.Tensor, t_next: torch.Tensor,
        a: torch.Tensor, an: torch.Tensor, *, at_t: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tweedie's marginal score of the pretrained model, −ε_#(x, t)/σ_t (σ_t = √(1−ᾱ_t) for VP), at x_next
        (non-terminal rows) and x_t (when ``at_t``); detached, one reference pass."""
        last = batch.is_last
        with torch.no_grad():
            e_next, e_t = apply_two(lambda x, tt, c: policy.eps(x, tt, c, reference=True),
                                    batch.x_next, t_next, ~last, batch.x_t, t,
                                    torch.ones_like(last) if at_t else torch.zeros_like(last),
                                    batch.cond, batch.x_next, batch.x_t)

        sched = policy.schedule
        return (sched.marginal_score(batch.x_next, e_next, batch.step, after=True),
                sched.marginal_score(batch.x_t, e_t, batch.step))

    def forward(  # type: ignore[override]
        self, batch: TransitionBatch, policy: PolicyModel, lookahead: Lookahead | None, *, beta: float
    ) -> LossOutput:
        batch = self.working_precision(batch)
        x_t, x_next = batch.x_t, batch.x_next
        t, t_next, a, an = policy.schedule.at_steps(batch.step, dtype=x_t.dtype, device=x_t.device)
        scale = self.reduction_scale(x_t)

        # with lookahead.model = policy, ∇r(x̂0(x_t)) is read from the policy's own pass at x_t
        shared = self.shared_lookahead_pass(lookahead, policy, batch, at_t=self.uses_reverse) == "policy"
        batch = self.prefetch_lookahead_grads(batch, lookahead, t, t_next, at_t=self.uses_reverse, shared=shared)
        eps, kernel, fwd, rev, grad_t = self.policy_scores(policy, batch, reference=False,
                                                           lookahead=lookahead if shared else None)

        psi_next, psi_t, _ = self.flow_scores(batch, lookahead, beta, t, t_next, a, an,
                                              at_t=self.uses_reverse, final_head=False, reward_grad_t=grad_t)
        if self.prior_score:
            prior_next, prior_t = self.reference_scores(policy, batch, t, t_next, a, an, at_t=self.uses_reverse)
            psi_next = psi_next + prior_next  # zero on terminal rows
            psi_t = None if psi_t is None else psi_t + prior_t
        w = residual_weights(kernel, self.residual_weight)
        r_fwd = scale * (fwd - policy.schedule.score_pb_next(x_t, x_next, batch.step)) - psi_next
        l_fwd = w * mean_dims(r_fwd**2)
        terms = {"fwd": l_fwd}
        per = l_fwd
        residual = l_fwd.detach()
        if self.forward_control == "antithetic":
            per = per + self._antithetic_correction(batch, policy, lookahead, beta, kernel, fwd, r_fwd, w,
                                                    t, t_next, a, an, scale)

        if self.uses_reverse:
            assert rev is not None and psi_t is not None
            r_rev = scale * (rev - policy.schedule.score_pb_t(x_t, x_next, batch.step)) + psi_t
            l_rev = w * mean_dims(r_rev**2)
            terms["rev"] = l_rev
            per = per + self.reverse_loss_weight * l_rev
            residual = residual + self.reverse_loss_weight * l_rev.detach()

        tr = self.trust_region_term(eps, batch)
        terms["trust_region"] = tr
        log_pf = kernel.log_prob(x_next, self.log_prob_reduction)
        return self.output(per + tr, residual, terms, {"policy/approx_kl": approx_kl(log_pf, self.old_log_pf(batch, log_pf))})

    def _antithetic_correction(
        self, batch: TransitionBatch, policy: PolicyModel, lookahead: Lookahead | None, beta: float, kernel: Any,
        fwd: torch.Tensor, r_fwd: torch.Tensor, w: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor,
        a: torch.Tensor, an: torch.Tensor, scale: float,
    ) -> torch.Tensor:
        """``[N]`` term with value 0 that replaces the θ-gradient of the forward loss by its antithetic
        estimate (see the class docstring, ``forward_control``); the φ-gradient is left as it is."""
        x_t, x_next = batch.x_t, batch.x_next
        with torch.no_grad():
            mean_old = policy.schedule.forward_kernel(x_t.detach(), batch.eps_old.to(x_t), batch.step, self.eta).mean
            x_mirror = 2 * mean_old - x_next.detach()
            mirrored = batch.with_fields(x_next=x_mirror, lookahead_grad_next=None)
            psi_m, _, _ = self.flow_scores(mirrored, lookahead, beta, t, t_next, a, an, at_t=False, final_head=False)
            if self.prior_score:
                psi_m = psi_m + self.reference_scores(policy, mirrored, t, t_next, a, an, at_t=False)[0]
        # forward residuals whose only graph is the policy's (closed-form) forward score
        r_theta = scale * fwd
        r_theta = r_theta - r_theta.detach() + r_fwd.detach()  # value r_fwd, graph through s_θ^→ only
        r_mirror = scale * (kernel.score(x_mirror) - policy.schedule.score_pb_next(x_t, x_mirror, batch.step)) - psi_m
        r_bar = 0.5 * (r_theta + r_mirror)
        # plain loss w·|r|²: θ-gradient 2w·r·∂r/∂θ; replace it by 2w·r̄·∂r̄/∂θ (∂r̄/∂θ = ∂r/∂θ)
        plain_theta = w * mean_dims(r_theta * r_theta.detach() * 2 - r_theta.detach() ** 2)
        anti_theta = w * mean_dims(r_bar * r_bar.detach() * 2 - r_bar.detach() ** 2)
        out = anti_theta - plain_theta
        return out - out.detach()

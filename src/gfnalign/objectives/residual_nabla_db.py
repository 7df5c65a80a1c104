"""Residual ∇-DB: ∇-GFlowNet's objective relative to the pretrained policy (spec/nabla_gfn.md §3)."""

from __future__ import annotations

from typing import Any

from gfnalign.core.batches import TransitionBatch
from gfnalign.core.protocols import Lookahead, PolicyModel
from gfnalign.objectives.base import LossOutput, register
from gfnalign.objectives.common import approx_kl, check_nonneg, mean_dims
from gfnalign.objectives.score_balance import ScoreBalanceObjective


@register("residual-nabla-db")
class ResidualNablaDB(ScoreBalanceObjective):
    r"""Residual ∇-DB (Liu et al. 2025): balance the *difference* to the pretrained policy (#) in score space.

    With s_θ^→ = ∇_{x_next} log P_F^θ(x_next|x_t), s_θ^← = ∇_{x_t} log P_F^θ(x_next|x_t) (same for #),
    s = ``pretrained_strength`` and the residual flow score

        ψ(x, t) = g_phi(x, t, c) + beta * γ(ᾱ_t) * ∇_x r(x̂0(x))      (forward-looking, γ from ``gamma``)
        ψ(x_final) = beta * ∇r(x_final)                               (terminal: γ = 1, no g_phi)

    the per-transition loss is

        r_fwd = s_θ^→ − [ s·s_#^→ + ψ(x_next, t_next) ]
        r_rev = s_θ^← − [ s·s_#^← − ψ(x_t, t) ]
        L = mean_N [ mean_dims r_fwd² + w_B·mean_dims r_rev² + w_T·1[is_last]·mean_dims g_phi(x_final, 0)²
                     + λ·mean_dims(ε_θ − ε_old)² ]

    Fixed point (s = 1): P_F^θ/P_F^# = F~(x_next)/F~(x_t) with F~(x_final) = R^β, so the terminal
    marginal is ∝ p_pretrained(x)·exp(beta·r(x)); P_B never appears. With s < 1 the prior is weakened
    (heuristically ∝ p^s·R^β, not proven). ``log_prob_reduction="mean"`` divides the policy scores by D,
    so the balance holds for F~^D: the target becomes ∝ p_pretrained·exp(D·beta·r) (β·D rescaling).

    Where gradients stop:

    ==============================  ==================================  =============
    term                            theta (policy)                      phi (g head)
    ==============================  ==================================  =============
    s_θ^→ (closed form in ε_θ)      yes                                 --
    s_#^→, s_#^← (reference)        no                                  --
    s_θ^← (autograd w.r.t. x_t)     only with reverse_trains_policy     --
    g_phi(x_next), g_phi(x_t)       --                                  yes
    beta·γ·∇r(x̂0) (lookahead)       no                                  no
    terminal g_phi loss             --                                  yes
    trust region                    yes                                 --
    ==============================  ==================================  =============

    Decisions (spec/nabla_gfn.md §8–9): the reverse loss is applied on the last transition too (its x_t
    is not terminal, so the condition is well defined; the authors switch it off); the policy's reverse
    score is *not* multiplied by s (authors' quirk 12); the terminal loss is averaged over all N
    transitions (rows that are not last contribute 0) rather than over the terminal rows only, so the
    loss is a plain per-transition mean; γ = 1 at the terminal state (authors: ᾱ_0 = 0.99915).
    ``no_flow=True`` drops g_phi, the reverse and the terminal losses (forward loss with the
    forward-looking guess only). Defaults: fraction 0.1 with stratified trunks (the authors').
    """

    name = "residual-nabla-db"
    needs_reward_gradient = True
    needs_reference = True

    def __init__(
        self,
        state_shape: Any = None,
        cond_dim: int | None = None,
        *,
        no_flow: bool = False,
        pretrained_strength: float = 1.0,
        reverse_loss_weight: float = 1.0,
        terminal_loss_weight: float = 1.0,
        **options: Any,
    ):
        self_no_flow = bool(no_flow)
        super().__init__(
            state_shape, cond_dim, use_flow_head=not self_no_flow,
            reverse_loss_weight=0.0 if self_no_flow else reverse_loss_weight, **options,
        )
        self.no_flow = self_no_flow
        s = float(pretrained_strength)
        if not 0.0 < s <= 1.0:
            raise ValueError(f"pretrained_strength={pretrained_strength} must be in (0, 1]")
        self.pretrained_strength = s
        self.terminal_loss_weight = check_nonneg("terminal_loss_weight", terminal_loss_weight)

    def forward(  # type: ignore[override]
        self, batch: TransitionBatch, policy: PolicyModel, lookahead: Lookahead | None, *, beta: float
    ) -> LossOutput:
        batch = self.working_precision(batch)
        x_t, x_next = batch.x_t, batch.x_next
        t, t_next, a, an = policy.schedule.at_steps(batch.step, dtype=x_t.dtype, device=x_t.device)
        last = batch.is_last
        scale = self.reduction_scale(x_t)
        s = self.pretrained_strength

        eps, kernel, fwd, rev = self.policy_scores(policy, batch, reference=False)
        _, _, fwd_ref, rev_ref = self.policy_scores(policy, batch, reference=True)

        final_head = self.flow_score_head is not None and self.terminal_loss_weight > 0 and bool(last.any())
        psi_next, psi_t, g_final = self.flow_scores(batch, lookahead, beta, t, t_next, a, an,
                                                    at_t=self.uses_reverse, final_head=final_head)
        # forward residual at x_next
        r_fwd = scale * fwd - (s * scale * fwd_ref + psi_next)
        l_fwd = mean_dims(r_fwd**2)
        terms = {"fwd": l_fwd}
        per = l_fwd
        residual = l_fwd.detach()

        if self.uses_reverse:
            assert rev is not None and rev_ref is not None and psi_t is not None
            r_rev = scale * rev - (s * scale * rev_ref - psi_t)
            l_rev = mean_dims(r_rev**2)
            terms["rev"] = l_rev
            per = per + self.reverse_loss_weight * l_rev
            residual = residual + self.reverse_loss_weight * l_rev.detach()

        if g_final is not None:
            l_term = mean_dims(g_final**2)
            terms["terminal"] = l_term
            per = per + self.terminal_loss_weight * l_term

        tr = self.trust_region_term(eps, batch)
        terms["trust_region"] = tr
        log_pf = kernel.log_prob(x_next, self.log_prob_reduction)
        metrics = {"policy/approx_kl": approx_kl(log_pf, self.old_log_pf(batch, log_pf))}
        return self.output(per + tr, residual, terms, metrics)

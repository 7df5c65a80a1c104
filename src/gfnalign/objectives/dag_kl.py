"""DAG-KL: the DAG flow loss for the head, a REINFORCE/PPO surrogate for the policy (spec/dag.md §3)."""

from __future__ import annotations

from typing import Any

import torch

from gfnalign.core.batches import TransitionBatch
from gfnalign.core.protocols import Lookahead, PolicyModel
from gfnalign.objectives.base import LossOutput, register
from gfnalign.objectives.common import check_nonneg, ppo_clip_options
from gfnalign.objectives.dag_db import DAGDB


def leave_one_out_advantage(reward: torch.Tensor, adv_clip: float, eps: float = 1e-8) -> torch.Tensor:
    """RLOO advantage normalised by a leave-one-out std, clipped to ±adv_clip (``[N]``, N ≥ 2)."""
    n = reward.shape[0]
    if n < 2:
        raise ValueError(
            "dag-kl needs at least 2 transitions per batch for its leave-one-out baseline; "
            "raise the train batch size or the transition fraction"
        )
    baseline = (reward.sum() - reward) / (n - 1)
    u = (reward - baseline) ** 2
    v = (u.sum() - u) / (n - 1)
    return ((reward - baseline) / (v.sqrt() + eps)).clamp(-adv_clip, adv_clip)


@register("dag-kl")
class DAGKL(DAGDB):
    r"""DAG-KL: the DAG-DB flow loss trains φ; the policy follows a clipped REINFORCE gradient.

    With δ the DAG-DB residual (forward-looking log F, terminal log F = beta·reward)::

        L_flow = δ_sg²                 with log P_F^θ stop-gradiented inside δ_sg (trains φ only);
                                       2(e^{−δ_sg} + δ_sg − 1) with ``flow_loss="exponential"``
        r_i    = −δ_sg,i (detached)    per-transition "reward" (contains −log P_F: an entropy bonus)
        b_i    = (Σ_j r_j − r_i)/(N−1)                     leave-one-out baseline over the batch
        v_i    = (Σ_j u_j − u_i)/(N−1),  u_j = (r_j − b_j)² leave-one-out variance
        A_i    = clip((r_i − b_i)/(√v_i + 1e-8), −adv_clip, adv_clip)
        ρ_i    = exp(log P_F^θ − log P_F^old)
        L_PG   = max(−A ρ, −A clip(ρ, 1−clip_range, 1+clip_range))
        L      = mean_N [ L_flow + kl_weight·L_PG + λ·mean_dims(ε_θ − ε_old)² ]

    Fixed point: the unclipped policy gradient is −A·ρ·∇log P_F ∝ δ·∇log P_F, a REINFORCE estimate of
    ∇_θ KL(P_F^θ(·|x_t) ‖ P_B(x_t|·)F(·)/F(x_t)); it vanishes when P_F^θ = P_B·F(x_next)/F(x_t), i.e. at
    detailed balance, so the terminal marginal is ∝ exp(beta·r) as for DAG-DB.

    Where gradients stop:

    ===========================  =============  =============
    term                         theta (policy) phi (f head)
    ===========================  =============  =============
    L_flow (f_phi terms)         no (sg)        yes
    L_PG via ρ                   yes            no (A detached)
    β·r̂, β·reward, log P_B        no             no
    trust region                 yes            --
    ===========================  =============  =============

    ``relative=True`` (prior-relative balance, see :class:`DAGDB`): log P_B is replaced by the frozen
    pretrained kernel's log P_F^#(x_next | x_t) inside δ, so the REINFORCE gradient estimates
    ∇_θ KL(P_F^θ(·|x_t) ‖ P_F^#(·|x_t)·G(·)/G(x_t)) and vanishes at the pretrained path measure tilted by
    exp(beta·r): the terminal law is ∝ p_#-sampler·exp(beta·r) (up to the start's value-function bias).
    log P_F^# is a constant for θ and φ.

    The flow options of DAG-DB apply unchanged (``flow_gradient``, ``target_ema``, ``gamma``, ``flow_loss``, the head).

    Choices (spec/dag.md §8.5): the RLOO group is the whole transition batch passed in (mixed
    timesteps and prompts, like the authors' per-GPU micro-batch; it is not shared across ranks);
    the baseline and LOO-std follow the authors; ``clip_range`` defaults to 0.2 because the default
    reduction is ``sum`` (the authors' 1e-4 is for per-dimension mean log-ratios, ≈ ±1.6 nats summed on
    SD1.5); pass ``log_prob_reduction="mean", clip_range=1e-4`` to reproduce them. ``kl_weight`` is the
    authors' ``klpf`` (default 1.0; the paper's value is unknown).
    """

    name = "dag-kl"

    def __init__(self, *args: Any, kl_weight: float = 1.0, clip_range: float = 0.2, adv_clip: float = 5.0, **kw: Any):
        super().__init__(*args, **kw)
        if self.policy_loss != "squared":
            raise ValueError(f"policy_loss={self.policy_loss!r}: dag-kl trains its policy with the clipped REINFORCE "
                             "gradient; policy_loss is a dag-db option (remove it)")
        self.kl_weight = check_nonneg("kl_weight", kl_weight)
        self.clip_range, self.adv_clip = ppo_clip_options(self, clip_range, adv_clip)

    def forward(  # type: ignore[override]
        self, batch: TransitionBatch, policy: PolicyModel, lookahead: Lookahead | None, *, beta: float
    ) -> LossOutput:
        delta, log_pf, eps, metrics = self.delta(batch, policy, lookahead, beta)
        delta_sg = delta - log_pf + log_pf.detach()  # same value, no gradient to θ through log P_F
        flow = self.flow_fit(delta_sg)
        adv = leave_one_out_advantage(-delta_sg.detach(), self.adv_clip)
        log_ratio = log_pf - self.old_log_pf(batch, log_pf)
        ratio = log_ratio.exp()
        clipped = ratio.clamp(1 - self.clip_range, 1 + self.clip_range)
        pg = torch.maximum(-adv * ratio, -adv * clipped)
        tr = self.trust_region_term(eps, batch)
        metrics["policy/clipfrac"] = float(((ratio.detach() - 1).abs() > self.clip_range).to(ratio.dtype).mean())
        metrics["policy/advantage_abs_mean"] = float(adv.abs().mean())
        return self.output(flow + self.kl_weight * pg + tr, delta, {"flow": flow, "pg": pg, "trust_region": tr}, metrics)

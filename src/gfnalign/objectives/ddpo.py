"""DDPO (Black et al. 2023): PPO-clip on per-prompt normalised terminal rewards (baseline, reward maximiser)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from gfnalign.core.batches import TrajectoryBatch, TransitionBatch
from gfnalign.core.protocols import Lookahead, PolicyModel
from gfnalign.objectives.base import LossOutput, register
from gfnalign.objectives.common import TransitionObjective, approx_kl, ppo_clip_options


def per_prompt_advantages(reward: torch.Tensor, prompt_id: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``(r − mean_prompt) / (std_prompt + eps)`` ``[B]`` (population std); prompts with fewer than two
    samples in the batch use the global mean and std instead."""
    r = reward.to(torch.float64)
    if not bool(torch.isfinite(r).all()):
        raise ValueError("traj.reward has NaN/inf entries; fill it with finite rewards before ddpo.prepare")
    adv = torch.empty_like(r)
    g_mean, g_std = r.mean(), r.std(unbiased=False)
    ids = prompt_id.to(r.device)
    for pid in torch.unique(ids):
        m = ids == pid
        if int(m.sum()) >= 2:
            mean, std = r[m].mean(), r[m].std(unbiased=False)
        else:
            mean, std = g_mean, g_std
        adv[m] = (r[m] - mean) / (std + eps)
    return adv.to(reward.dtype)


@register("ddpo")
class DDPO(TransitionObjective):
    r"""DDPO-clip: PPO on the per-step log-probabilities with per-prompt normalised terminal rewards.

    ``prepare(traj)`` sets ``traj.advantage`` = (r − mean_prompt)/(std_prompt + 1e-8) (global statistics for
    prompts with < 2 samples in the epoch). Per transition::

        A = clip(advantage, −adv_clip, adv_clip)
        ρ = exp(log P_F^θ(x_next|x_t) − log P_F^old)
        L = mean_N [ max(−A ρ, −A clip(ρ, 1 − clip_range, 1 + clip_range)) + λ·mean_dims(ε_θ − ε_old)² ]

    Fixed point: none in the GFlowNet sense; it ascends E[r], a reward maximiser (the baseline).

    Where gradients stop:

    ==================  ==============
    term                theta (policy)
    ==================  ==============
    ρ (log P_F^θ)       yes
    advantage A         no (data)
    trust region        yes
    ==================  ==============

    Default reduction is ``"mean"`` (DDPO's code): its ``clip_range=1e-4`` acts on per-dimension mean
    log-ratios (≈ ±1.6 nats summed on SD1.5); with ``sum`` the same clip range would clip almost every
    step. With ``log_prob_reduction="sum"`` use a PPO-typical ``clip_range`` such as 0.2. There are no
    heads and no reference. ``residual`` reports ρ − 1 (0 on-policy).
    """

    name = "ddpo"
    default_reduction = "mean"
    needs_reward_gradient = False
    needs_reference = False

    def __init__(self, *, clip_range: float = 1e-4, adv_clip: float = 5.0, **common: Any):
        common.pop("state_shape", None)
        common.pop("cond_dim", None)
        super().__init__(**common)
        self.clip_range, self.adv_clip = ppo_clip_options(self, clip_range, adv_clip)

    def prepare(self, traj: TrajectoryBatch) -> TrajectoryBatch:
        return replace(traj, advantage=per_prompt_advantages(traj.reward, traj.prompt_id))

    def forward(  # type: ignore[override]
        self, batch: TransitionBatch, policy: PolicyModel, lookahead: Lookahead | None, *, beta: float
    ) -> LossOutput:
        batch = self.working_precision(batch)
        if batch.advantage is None:
            raise ValueError("ddpo: batch.advantage is None; call objective.prepare(traj) before select_transitions")
        eps, kernel = self.policy_kernel(policy, batch)
        log_pf = kernel.log_prob(batch.x_next, self.log_prob_reduction)
        adv = batch.advantage.to(log_pf).clamp(-self.adv_clip, self.adv_clip)
        ratio = (log_pf - self.old_log_pf(batch, log_pf)).exp()
        pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - self.clip_range, 1 + self.clip_range))
        tr = self.trust_region_term(eps, batch)
        metrics = {
            "policy/approx_kl": approx_kl(log_pf, self.old_log_pf(batch, log_pf)),
            "policy/clipfrac": float(((ratio.detach() - 1).abs() > self.clip_range).to(ratio.dtype).mean()),
        }
        return self.output(pg + tr, ratio.detach() - 1, {"pg": pg, "trust_region": tr}, metrics)

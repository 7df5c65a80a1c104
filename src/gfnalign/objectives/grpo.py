"""Flow-GRPO (Liu et al. 2025, yifan123/flow_grpo): PPO-clip with group-normalised advantages and a KL
penalty to the frozen reference, on the stochastic kernel of the sampler (the Flow-GRPO SDE on flow
schedules; any kernel works). A reward maximiser: the baseline the GFlowNet objectives are compared with."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from gfnalign.core.batches import TrajectoryBatch, TransitionBatch
from gfnalign.core.protocols import Lookahead, PolicyModel
from gfnalign.objectives.base import SINGLE_PROCESS, Collective, LossOutput, register
from gfnalign.objectives.common import (
    TransitionObjective,
    approx_kl,
    check_choice,
    check_nonneg,
    mean_dims,
    ppo_clip_options,
)

KL_FORMS = ("flow_grpo", "exact")


def group_advantages(
    reward: torch.Tensor, prompt_id: torch.Tensor, *, global_std: bool = False, eps: float = 1e-4
) -> torch.Tensor:
    """``(r − mean_group) / (std + eps)`` ``[B]`` with population statistics over each prompt's group;
    ``global_std=True`` divides by the std of all rewards instead (Flow-GRPO's ``sample.global_std``).
    A group of one has advantage 0, as in flow_grpo's stat tracker."""
    r = reward.to(torch.float64)
    if not bool(torch.isfinite(r).all()):
        raise ValueError("traj.reward has NaN/inf entries; fill it with finite rewards before grpo.prepare")
    ids = prompt_id.to(r.device)
    adv = torch.empty_like(r)
    all_std = r.std(unbiased=False)
    for pid in torch.unique(ids):
        m = ids == pid
        std = all_std if global_std else r[m].std(unbiased=False)
        adv[m] = (r[m] - r[m].mean()) / (std + eps)
    return adv.to(reward.dtype)


@register("grpo")
class GRPO(TransitionObjective):
    r"""Flow-GRPO: PPO-clip on per-step log-probabilities with group-normalised advantages and a KL penalty.

    ``prepare(traj, collective)`` sets ``traj.advantage`` = (r − mean_group)/(std + 1e-4), the group being the
    samples of one prompt in the epoch on every process (rewards and prompt ids are gathered first, as
    flow_grpo does; ``global_std``: the std of every reward). Per transition::

        A = clip(advantage, −adv_clip, adv_clip)
        ρ = exp(log P_F^θ(x_next|x_t) − log P_F^old)
        L = max(−A ρ, −A clip(ρ, 1 − clip_range, 1 + clip_range)) + kl_beta · KL + λ·mean_dims(out_θ − out_old)²

    ``kl_form="flow_grpo"`` (default) is the penalty as flow_grpo computes it,
    ``mean_dims(μ_θ − μ_ref)² / (2 s_t²)`` with ``s_t² = std² / (σ_t − σ_next)`` the SDE's noise per unit σ
    (flow_grpo's ``std_dev_t``; σ is the interpolant's noise scale, √(1−ᾱ) on VP schedules); it equals the
    exact per-step KL times ``(σ_t − σ_next)/D``. ``kl_form="exact"`` is KL(P_F^θ ‖ P_F^ref) of the step,
    ``Σ_dims (μ_θ − μ_ref)² / (2 std²)``, reduced like the log-probabilities.

    Fixed point: none in the GFlowNet sense; it ascends E[r] with a reference penalty (a baseline).

    Where gradients stop:

    ==================  ==============
    term                theta (policy)
    ==================  ==============
    ρ (log P_F^θ)       yes
    advantage A         no (data)
    KL (μ_θ side)       yes; μ_ref is detached (reference pass under no_grad)
    trust region        yes
    ==================  ==============

    Defaults follow flow_grpo: ``log_prob_reduction="mean"`` with ``clip_range=1e-4``, ``adv_clip=5``,
    ``kl_beta=0`` (its SD3.5 configs use 0.01–0.04). flow_grpo's ``timestep_fraction=0.99`` trains the first
    ⌊0.99·K⌋ steps, i.e. all but the last; here every step trains by default (``fraction`` subsamples).
    ``residual`` reports ρ − 1.
    """

    name = "grpo"
    transition_separable = True  # group advantages are fixed in prepare(); clip and KL per transition
    default_reduction = "mean"
    needs_reward_gradient = False
    needs_reference = False
    lookahead_reads: frozenset[str] = frozenset()  # terminal rewards only: no lookahead work

    def __init__(self, *, clip_range: float = 1e-4, adv_clip: float = 5.0, kl_beta: float = 0.0,
                 kl_form: str = "flow_grpo", global_std: bool = False, **common: Any):
        common.pop("state_shape", None)
        common.pop("cond_dim", None)
        super().__init__(**common)
        self.clip_range, self.adv_clip = ppo_clip_options(self, clip_range, adv_clip)
        self.kl_beta = check_nonneg("kl_beta", kl_beta)
        check_choice("kl_form", kl_form, KL_FORMS)
        self.kl_form = kl_form
        self.global_std = bool(global_std)
        # instance attribute: the trainer reads the flag from the built objective
        self.needs_reference = self.kl_beta > 0

    def prepare(self, traj: TrajectoryBatch, collective: Collective = SINGLE_PROCESS) -> TrajectoryBatch:
        # flow_grpo gathers every process's rewards and prompts before grouping, so a prompt's group holds
        # all of its samples of the epoch wherever they were drawn
        all_reward = collective.gather(traj.reward.detach().to(torch.float64))
        all_ids = collective.gather(traj.prompt_id.detach().to(torch.int64))
        adv = group_advantages(all_reward, all_ids, global_std=self.global_std)
        return replace(traj, advantage=collective.own_rows(adv).to(device=traj.reward.device, dtype=traj.reward.dtype))

    def kl_term(self, kernel: Any, kernel_ref: Any, policy: PolicyModel, batch: TransitionBatch) -> torch.Tensor:
        """[N] the KL penalty of the step (see the class docstring), gradient through μ_θ only."""
        sq = (kernel.mean - kernel_ref.mean.detach()) ** 2
        var = kernel.std.detach() ** 2
        if self.kl_form == "exact":
            return (sq / (2 * var)).flatten(1).sum(1) * self.reduction_scale(sq)
        lv = policy.schedule.levels(batch.step, dtype=sq.dtype, device=sq.device)
        d_sigma = (torch.as_tensor(lv.sigma_t) - torch.as_tensor(lv.sigma_next)).reshape(-1, *([1] * (sq.dim() - 1)))
        return mean_dims(sq / (2 * var / d_sigma))

    def forward(  # type: ignore[override]
        self, batch: TransitionBatch, policy: PolicyModel, lookahead: Lookahead | None, *, beta: float
    ) -> LossOutput:
        batch = self.working_precision(batch)
        if batch.advantage is None:
            raise ValueError("grpo: batch.advantage is None; call objective.prepare(traj) before select_transitions")
        out, kernel = self.policy_kernel(policy, batch)
        log_pf = kernel.log_prob(batch.x_next, self.log_prob_reduction)
        old = self.old_log_pf(batch, log_pf)
        adv = batch.advantage.to(log_pf).clamp(-self.adv_clip, self.adv_clip)
        ratio = (log_pf - old).exp()
        pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - self.clip_range, 1 + self.clip_range))
        terms = {"pg": pg}
        per = pg
        if self.kl_beta > 0:
            with torch.no_grad():
                _, kernel_ref = self.policy_kernel(policy, batch, reference=True)
            kl = self.kl_term(kernel, kernel_ref, policy, batch)
            terms["kl"] = kl
            per = per + self.kl_beta * kl
        tr = self.trust_region_term(out, batch)
        terms["trust_region"] = tr
        metrics = {
            "policy/approx_kl": approx_kl(log_pf, old),
            "policy/clipfrac": float(((ratio.detach() - 1).abs() > self.clip_range).to(ratio.dtype).mean()),
        }
        return self.output(per + tr, ratio.detach() - 1, terms, metrics)

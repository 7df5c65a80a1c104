"""DDPO (Black et al. 2023): PPO-clip on per-prompt normalised terminal rewards (baseline, reward maximiser)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn

from gfnalign.core.batches import TrajectoryBatch, TransitionBatch
from gfnalign.core.protocols import Lookahead, PolicyModel
from gfnalign.objectives.base import SINGLE_PROCESS, Collective, LossOutput, register
from gfnalign.objectives.common import TransitionObjective, approx_kl, ppo_clip_options


class PerPromptStatTracker(nn.Module):
    """DDPO's per-prompt reward statistics, kept across epochs (Black et al. 2023, ddpo-pytorch).

    For each prompt id, the last ``buffer_size`` rewards seen (all processes' samples, oldest first).
    :meth:`update` appends this epoch's rewards and returns the advantages ``(r − mean)/(std + 1e-6)``
    with the prompt's buffered mean and population std, or the whole epoch's mean and std while the
    prompt's buffer holds fewer than ``min_count`` rewards. Rows with ``prompt_id < 0`` (a prompt outside
    the prompt list) always use the epoch's statistics. The buffers are module buffers, so checkpoints
    carry them; they grow with the largest prompt id seen.
    """

    def __init__(self, buffer_size: int = 16, min_count: int = 16):
        super().__init__()
        if buffer_size < 1:
            raise ValueError(f"per_prompt_buffer={buffer_size} must be >= 1 (or 0 to normalise over the epoch)")
        if not 1 <= min_count:
            raise ValueError(f"per_prompt_min_count={min_count} must be >= 1")
        self.buffer_size, self.min_count = int(buffer_size), int(min_count)
        self.register_buffer("values", torch.zeros(0, self.buffer_size, dtype=torch.float64))
        self.register_buffer("counts", torch.zeros(0, dtype=torch.int64))

    def _grow(self, num_prompts: int) -> None:
        extra = num_prompts - self.counts.shape[0]
        if extra > 0:
            self.values = torch.cat([self.values, self.values.new_zeros(extra, self.buffer_size)])
            self.counts = torch.cat([self.counts, self.counts.new_zeros(extra)])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        # the buffers grow during training; take the checkpoint's size before loading
        counts = state_dict.get(prefix + "counts")
        if counts is not None:
            self.values = self.values.new_zeros(counts.shape[0], self.buffer_size)
            self.counts = self.counts.new_zeros(counts.shape[0])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def update(self, reward: torch.Tensor, prompt_id: torch.Tensor) -> torch.Tensor:
        """Advantages ``[N]`` (float64) for the epoch's rewards ``[N]`` of all processes; updates the buffers."""
        r = reward.detach().to(self.values.device, torch.float64)
        ids = prompt_id.detach().to(self.values.device, torch.int64)
        if not bool(torch.isfinite(r).all()):
            raise ValueError("traj.reward has NaN/inf entries; fill it with finite rewards before ddpo.prepare")
        self._grow(int(ids.max()) + 1 if ids.numel() else 0)
        epoch_mean, epoch_std = r.mean(), r.std(unbiased=False)
        adv = (r - epoch_mean) / (epoch_std + 1e-6)
        for pid in torch.unique(ids[ids >= 0]).tolist():
            rows = ids == pid
            n_old = int(self.counts[pid])
            kept = torch.cat([self.values[pid, :n_old], r[rows]])[-self.buffer_size:]
            self.values[pid].zero_()
            self.values[pid, : kept.numel()] = kept
            self.counts[pid] = kept.numel()
            if kept.numel() >= self.min_count:
                adv[rows] = (r[rows] - kept.mean()) / (kept.std(unbiased=False) + 1e-6)
        return adv


@register("ddpo")
class DDPO(TransitionObjective):
    r"""DDPO-clip: PPO on the per-step log-probabilities with per-prompt normalised terminal rewards.

    ``prepare(traj, collective)`` gathers every process's rewards and prompt ids first, then sets
    ``traj.advantage`` as ddpo-pytorch does: with ``per_prompt_buffer`` = S > 0 (default 16), a
    :class:`PerPromptStatTracker` keeps each prompt's last S rewards across epochs and normalises by their
    mean and std once a prompt has ``per_prompt_min_count`` (default 16) of them, by the whole epoch's
    before that (``(r − mean)/(std + 1e-6)``); ``per_prompt_buffer: 0`` normalises by the whole epoch's
    rewards, ``(r − mean)/(std + 1e-8)`` (ddpo-pytorch without per-prompt tracking). Prompts are keyed by
    their id in the prompt list (ddpo-pytorch keys by text: the same text listed twice is one prompt there,
    two here). Per transition::

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
    transition_separable = True  # advantages are fixed in prepare(); the clipped term is per transition
    default_reduction = "mean"
    needs_reward_gradient = False
    needs_reference = False
    lookahead_reads: frozenset[str] = frozenset()  # terminal rewards only: no lookahead work

    def __init__(
        self,
        *,
        clip_range: float = 1e-4,
        adv_clip: float = 5.0,
        per_prompt_buffer: int = 16,
        per_prompt_min_count: int = 16,
        **common: Any,
    ):
        common.pop("state_shape", None)
        common.pop("cond_dim", None)
        super().__init__(**common)
        self.clip_range, self.adv_clip = ppo_clip_options(self, clip_range, adv_clip)
        if int(per_prompt_buffer) < 0:
            raise ValueError(f"per_prompt_buffer={per_prompt_buffer} must be >= 0 (0: normalise over the epoch)")
        self.stat_tracker = (
            PerPromptStatTracker(int(per_prompt_buffer), int(per_prompt_min_count)) if per_prompt_buffer else None
        )

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {}  # the stat tracker is state, not a head

    def prepare(self, traj: TrajectoryBatch, collective: Collective = SINGLE_PROCESS) -> TrajectoryBatch:
        reward = traj.reward.detach().to(torch.float64)
        if not bool(torch.isfinite(reward).all()):
            raise ValueError("traj.reward has NaN/inf entries; fill it with finite rewards before ddpo.prepare")
        all_reward = collective.gather(reward)
        if self.stat_tracker is None:
            adv = (all_reward - all_reward.mean()) / (all_reward.std(unbiased=False) + 1e-8)
        else:
            all_ids = collective.gather(traj.prompt_id.detach().to(torch.int64))
            adv = self.stat_tracker.update(all_reward, all_ids)
        own = collective.own_rows(adv).to(device=traj.reward.device, dtype=traj.reward.dtype)
        return replace(traj, advantage=own)

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

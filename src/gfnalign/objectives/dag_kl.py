"""DAG-KL: the DAG flow loss for the head, a REINFORCE/PPO surrogate for the policy (spec/dag.md §3)."""

from __future__ import annotations

from typing import Any

import torch

from gfnalign.core.batches import TrajectoryBatch, TransitionBatch
from gfnalign.core.protocols import Lookahead, PolicyModel
from gfnalign.objectives.base import LossOutput, register
from gfnalign.objectives.common import check_nonneg, ppo_clip_options
from gfnalign.objectives.dag_db import DAGDB
from gfnalign.sampling.subsample import select_slots


def leave_one_out_advantage(reward: torch.Tensor, adv_clip: float, eps: float = 1e-8) -> torch.Tensor:
    """RLOO advantage normalised by a leave-one-out std, clipped to ±adv_clip, over the last dimension
    (``[..., n]``, n ≥ 2: each row of a ``[groups, n]`` tensor is one group)."""
    n = reward.shape[-1]
    if n < 2:
        raise ValueError(
            "dag-kl needs at least 2 transitions per leave-one-out group; raise training.micro_batch (a "
            "multiple of method.options.rloo_group) or the sampled batch"
        )
    baseline = (reward.sum(-1, keepdim=True) - reward) / (n - 1)
    u = (reward - baseline) ** 2
    v = (u.sum(-1, keepdim=True) - u) / (n - 1)
    return ((reward - baseline) / (v.sqrt() + eps)).clamp(-adv_clip, adv_clip)


def rloo_groups(traj_id: torch.Tensor, group_size: int) -> list[torch.Tensor]:
    """Consecutive runs of rows forming the leave-one-out groups of one call: a group closes after
    ``group_size`` rows or before a row whose trajectory it already holds (``group_size`` 0: one group)."""
    n = traj_id.shape[0]
    if group_size == 0:
        return [torch.arange(n)]
    ids = traj_id.tolist()
    groups, start, seen = [], 0, set()
    for i, tid in enumerate(ids):
        if len(seen) == group_size or tid in seen:
            groups.append(torch.arange(start, i))
            start, seen = i, set()
        seen.add(tid)
    groups.append(torch.arange(start, n))
    return groups


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

    Leave-one-out groups (``rloo_group`` = G, default 8 as the authors' per-GPU micro-batch): like the
    authors' code, a group is G *different trajectories*, each at its own timestep. ``select_transitions``
    draws each trajectory's steps as usual (``fraction`` / ``stratified``), permutes them independently per
    trajectory, and orders the rows group by group: for each block of G trajectories, position j holds
    trajectory i's j-th permuted step, i = 0..G−1. In ``forward`` a group is G consecutive rows, cut short
    by the end of the call or by a trajectory repeating (so keep ``training.micro_batch`` a multiple of
    G; the trainer splits rows in order). ``rloo_group: 0`` makes every call one group in the plain
    trajectory-major order (the toy loop's single-call update). Groups are per process, as the authors'.

    Choices (spec/dag.md §8.5): the baseline and LOO-std follow the authors; ``clip_range`` defaults to 0.2 because the default
    reduction is ``sum`` (the authors' 1e-4 is for per-dimension mean log-ratios, ≈ ±1.6 nats summed on
    SD1.5); pass ``log_prob_reduction="mean", clip_range=1e-4`` to reproduce them. ``kl_weight`` is the
    authors' ``klpf`` (default 1.0; the paper's value is unknown).
    """

    name = "dag-kl"
    transition_separable = False  # leave-one-out baselines couple the transitions of a group

    def __init__(self, *args: Any, kl_weight: float = 1.0, clip_range: float = 0.2, adv_clip: float = 5.0,
                 rloo_group: int = 8, **kw: Any):
        super().__init__(*args, **kw)
        if isinstance(rloo_group, bool) or not isinstance(rloo_group, int) or rloo_group == 1 or rloo_group < 0:
            raise ValueError(f"rloo_group={rloo_group!r} must be an integer >= 2 (trajectories per leave-one-out "
                             "group; the authors use 8) or 0 (each call is one group)")
        self.rloo_group = rloo_group
        if self.policy_loss != "squared":
            raise ValueError(f"policy_loss={self.policy_loss!r}: dag-kl trains its policy with the clipped REINFORCE "
                             "gradient; policy_loss is a dag-db option (remove it)")
        self.kl_weight = check_nonneg("kl_weight", kl_weight)
        self.clip_range, self.adv_clip = ppo_clip_options(self, clip_range, adv_clip)

    def select_transitions(self, traj: TrajectoryBatch, generator: torch.Generator | None = None) -> TransitionBatch:
        slots = select_slots(traj.batch_size, traj.num_steps, fraction=self.fraction, stratified=self.stratified,
                             include_last=self.include_last, generator=generator)  # [B, J], ascending
        B, J = slots.shape
        if self.rloo_group == 0:
            return traj.transitions(torch.arange(B).repeat_interleave(J), slots.reshape(-1))
        gen_device = generator.device if generator is not None else torch.device("cpu")
        keys = torch.rand(B, J, generator=generator, device=gen_device, dtype=torch.float64).cpu()
        slots = slots.gather(1, keys.argsort(dim=1))  # each trajectory's steps in its own random order
        rows_traj, rows_slot = [], []
        for start in range(0, B, self.rloo_group):
            members = torch.arange(start, min(start + self.rloo_group, B))
            rows_traj.append(members.repeat(J))  # position-major: j = 0 for every member, then j = 1, ...
            rows_slot.append(slots[members].t().reshape(-1))
        return traj.transitions(torch.cat(rows_traj), torch.cat(rows_slot))

    def forward(  # type: ignore[override]
        self, batch: TransitionBatch, policy: PolicyModel, lookahead: Lookahead | None, *, beta: float
    ) -> LossOutput:
        delta, log_pf, eps, metrics = self.delta(batch, policy, lookahead, beta)
        delta_sg = delta - log_pf + log_pf.detach()  # same value, no gradient to θ through log P_F
        flow = self.flow_fit(delta_sg)
        reward = -delta_sg.detach()
        adv = torch.empty_like(reward)
        for rows in rloo_groups(batch.traj_id.cpu(), self.rloo_group):
            rows = rows.to(reward.device)
            adv[rows] = leave_one_out_advantage(reward[rows], self.adv_clip)
        log_ratio = log_pf - self.old_log_pf(batch, log_pf)
        ratio = log_ratio.exp()
        clipped = ratio.clamp(1 - self.clip_range, 1 + self.clip_range)
        pg = torch.maximum(-adv * ratio, -adv * clipped)
        tr = self.trust_region_term(eps, batch)
        metrics["policy/clipfrac"] = float(((ratio.detach() - 1).abs() > self.clip_range).to(ratio.dtype).mean())
        metrics["policy/advantage_abs_mean"] = float(adv.abs().mean())
        return self.output(flow + self.kl_weight * pg + tr, delta, {"flow": flow, "pg": pg, "trust_region": tr}, metrics)

"""Reward backpropagation baselines: ReFL, DRaFT-K, DRaFT-LV (reward maximisers)."""

from __future__ import annotations

from typing import Any

import torch

from gfnalign.core.batches import TrajectoryBatch, TransitionBatch
from gfnalign.core.protocols import Lookahead, PolicyModel
from gfnalign.objectives.base import LossOutput, register
from gfnalign.objectives.common import TransitionObjective, check_choice, index_rows, mean_dims

VARIANTS = ("refl", "draft-k", "draft-lv")


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).flatten(1).sum(dim=1)


@register("reward-backprop")
class RewardBackprop(TransitionObjective):
    r"""Direct reward backpropagation through the last sampling steps (needs a differentiable reward).

    The reward gradient comes only from ``lookahead.grad_log_reward(x, t, cond, terminal=True)`` = ∇r(x)
    at a clean state. Per trajectory:

    * ``draft-k`` (DRaFT-K): re-run the last ``k`` recorded steps with gradient. The noise of each step
      is recovered from the record, z = (x_next − mean_old)/σ with mean_old from the stored ε_old, and
      x is chained: x_{j+1}(θ) = mean_θ(x_j(θ)) + σ_j z_j, starting from the stored x_t of the first
      re-run step. ``loss = −β⟨g, x_final(θ)⟩`` with ``g = ∇r(x_final(θ).detach())``, whose gradient is
      −β∇_θ r(x_final(θ)).
    * ``draft-lv`` (DRaFT-LV, Clark et al. 2023): k = 1. The sampled final state x_final (detached) is
      re-noised ``lv_samples`` = n times to the last step's start level with the interpolant's noising
      kernel (VP: x_t^(i) = √(ᾱ_t/ᾱ')·x_final + √(1 − ᾱ_t/ᾱ')·ε_i), and the last step is re-run on each with
      gradient (one network call per draw): x_final^(i)(θ) = mean_θ(x_t^(i)) + σ z_i.
      ``loss = −(β/n) Σ_i ⟨g_i, x_final^(i)(θ)⟩``, g_i = ∇r(x_final^(i)). The n draws have different
      inputs, hence different ∂x_final/∂θ, which is where the variance reduction comes from; ε_i and z_i
      come from torch's global RNG (the trainer seeds it per rank).
    * ``refl`` (ReFL): one random step among the last ``ceil(K·refl_late_fraction)`` of each trajectory,
      ``loss = −β⟨∇r(x̂0), x̂0_θ(x_t)⟩`` with x̂0_θ Tweedie's prediction of the current policy at the
      stored x_t.

    Plus ``λ·mean_dims(ε_θ − ε_old)²`` on every re-run step (DRaFT-LV: on the recorded step, which costs one
    more network call when λ > 0). Fixed point: none (ascends r). These
    objectives override ``select_transitions`` (fraction/stratified are ignored) and need each
    trajectory's rows together in one call (DRaFT chains k consecutive steps ending at the last step).
    ``log_prob_reduction`` has no effect (no log-probabilities are used). ``residual`` is the
    reparametrisation check mean_dims(x_{j+1}(θ) − x_next recorded)² per row (ReFL:
    mean_dims(x̂0_θ − x̂0_old)²), zero when θ equals the behaviour policy; DRaFT-LV reports the mean over
    draws of mean_dims(x_final^(i) − x_final)², the spread of the re-generated final states.

    Where gradients stop:

    ============================  ==============
    term                          theta (policy)
    ============================  ==============
    x_final(θ) / x̂0_θ chain       yes (all re-run steps)
    g = ∇r (lookahead)            no (detached)
    recovered noise z             no
    trust region                  yes
    ============================  ==============
    """

    name = "reward-backprop"
    needs_reward_gradient = True
    needs_reference = False
    lookahead_reads: frozenset[str] = frozenset()  # ∇r at its own re-generated states, never a cached value

    def __init__(
        self,
        *,
        variant: str = "draft-k",
        k: int = 1,
        lv_samples: int = 2,
        refl_late_fraction: float = 0.25,
        **common: Any,
    ):
        common.pop("state_shape", None)
        common.pop("cond_dim", None)
        super().__init__(**common)
        check_choice("variant", variant, VARIANTS)
        self.variant = variant
        self.k = 1 if variant == "draft-lv" else int(k)
        if self.k < 1:
            raise ValueError(f"k={k} must be >= 1 (number of final steps to backpropagate through)")
        self.lv_samples = int(lv_samples) if variant == "draft-lv" else 1
        if self.lv_samples < 1:
            raise ValueError(f"lv_samples={lv_samples} must be >= 1")
        self.refl_late_fraction = float(refl_late_fraction)
        if not 0.0 < self.refl_late_fraction <= 1.0:
            raise ValueError(f"refl_late_fraction={refl_late_fraction} must be in (0, 1]")

    # -- which transitions -----------------------------------------------------------------------------
    def select_transitions(self, traj: TrajectoryBatch, generator: torch.Generator | None = None) -> TransitionBatch:
        B, K = traj.batch_size, traj.num_steps
        if self.variant == "refl":
            window = max(1, min(K, int(-(-K * self.refl_late_fraction // 1))))
            gen_device = generator.device if generator is not None else torch.device("cpu")
            u = torch.rand(B, generator=generator, device=gen_device, dtype=torch.float64).cpu()
            slot = (K - window) + torch.minimum((u * window).floor().long(), torch.tensor(window - 1))
            return traj.transitions(torch.arange(B), slot)
        if self.k > K:
            raise ValueError(f"k={self.k} exceeds the number of sampling steps {K}")
        slots = torch.arange(K - self.k, K, dtype=torch.int64).repeat(B)
        return traj.transitions(torch.arange(B).repeat_interleave(self.k), slots)

    # -- loss ------------------------------------------------------------------------------------------
    def _chains(self, batch: TransitionBatch) -> torch.Tensor:
        """``[B', k]`` row indices: each row one trajectory's k consecutive steps ending at the last."""
        N, k = len(batch), self.k
        key = batch.traj_id.to(torch.int64) * (int(batch.step.max()) + 1) + batch.step.to(torch.int64)
        order = key.argsort()
        if N % k:
            raise ValueError(f"reward-backprop ({self.variant}) got {N} rows, not a multiple of k={k}; keep each "
                             "trajectory's k rows together (micro-batch size a multiple of k)")
        idx = order.reshape(N // k, k)
        tid, step = batch.traj_id[idx], batch.step[idx]
        ok = bool((tid == tid[:, :1]).all()) and bool((step[:, 1:] - step[:, :-1] == 1).all()) \
            and bool(batch.is_last[idx[:, -1]].all())
        if not ok:
            raise ValueError(f"reward-backprop ({self.variant}) needs, per trajectory, its last k={k} steps in "
                             "order; use the objective's own select_transitions and keep rows of a trajectory together")
        return idx

    def forward(  # type: ignore[override]
        self, batch: TransitionBatch, policy: PolicyModel, lookahead: Lookahead | None, *, beta: float
    ) -> LossOutput:
        batch = self.working_precision(batch)
        if lookahead is None:
            raise ValueError("reward-backprop needs a Lookahead with grad_log_reward (a differentiable reward)")
        sched = policy.schedule
        if self.variant == "refl":
            return self._refl(batch, policy, lookahead, beta)
        if self.variant == "draft-lv":
            return self._draft_lv(batch, policy, lookahead, beta)
        idx = self._chains(batch)
        Bp, k = idx.shape
        cond_all = batch.cond
        first = idx[:, 0]
        x = batch.x_t[first].detach()
        cond = index_rows(cond_all, first)
        residual = torch.zeros(len(batch), dtype=x.dtype, device=x.device)
        tr_total = torch.zeros(Bp, dtype=x.dtype, device=x.device)
        loss_traj = torch.zeros(Bp, dtype=x.dtype, device=x.device)
        for j in range(k):
            rows = idx[:, j]
            t, t_next, a, an = sched.at_steps(batch.step[rows], dtype=x.dtype, device=x.device)
            eps = policy.eps(x, t, cond, reference=False)
            kern = sched.forward_kernel(x, eps, batch.step[rows], self.eta)
            old = sched.forward_kernel(batch.x_t[rows], batch.eps_old[rows].to(x), batch.step[rows], self.eta)
            x_rec = batch.x_next[rows]
            z = old.noise_of(x_rec).detach()
            tr_total = tr_total + self.trust_region_term(eps, batch.index(rows))
            x = kern.sample(z)
            residual[rows] = mean_dims((x - x_rec) ** 2).detach()
            if j == k - 1:
                g = lookahead.grad_log_reward(x.detach(), t_next, cond, terminal=torch.ones_like(batch.is_last[rows]))
                loss_traj = -beta * _dot(g.detach().to(x), x)
        per_traj = loss_traj + tr_total
        loss = per_traj.mean()
        metrics = {
            "loss/total": float(loss.detach()),
            "loss/reward": float(loss_traj.detach().mean()),
            "loss/trust_region": float(tr_total.detach().mean()),
            "residual/abs_mean": float(residual.abs().mean()),
        }
        return LossOutput(loss=loss, residual=residual, metrics=metrics)

    def _draft_lv(self, batch: TransitionBatch, policy: PolicyModel, lookahead: Lookahead, beta: float) -> LossOutput:
        idx = self._chains(batch)[:, 0]  # k = 1: one row per trajectory, its last step
        rows = batch.index(idx)
        x_final = rows.x_next.detach()
        sched = policy.schedule
        t, t_next, _, _ = sched.at_steps(rows.step, dtype=x_final.dtype, device=x_final.device)
        renoise = sched.backward_kernel(x_final, rows.step)  # the interpolant's noising kernel P_B(x_t | x_final)
        terminal = torch.ones_like(rows.is_last)
        reward_term = torch.zeros(len(rows), dtype=x_final.dtype, device=x_final.device)
        spread = torch.zeros_like(reward_term)
        for _ in range(self.lv_samples):
            x_t = renoise.sample(torch.randn_like(x_final))
            out = policy.eps(x_t, t, rows.cond, reference=False)
            x_new = sched.forward_kernel(x_t, out, rows.step, self.eta).sample(torch.randn_like(x_final))
            g = lookahead.grad_log_reward(x_new.detach(), t_next, rows.cond, terminal=terminal)
            reward_term = reward_term - beta * _dot(g.detach().to(x_new), x_new)
            spread = spread + mean_dims((x_new - x_final) ** 2).detach()
        reward_term = reward_term / self.lv_samples
        if self.trust_region:
            eps, _ = self.policy_kernel(policy, rows)
            tr = self.trust_region_term(eps, rows)
        else:
            tr = torch.zeros_like(reward_term)
        residual = torch.zeros(len(batch), dtype=x_final.dtype, device=x_final.device)
        residual[idx] = spread / self.lv_samples
        loss = (reward_term + tr).mean()
        metrics = {
            "loss/total": float(loss.detach()),
            "loss/reward": float(reward_term.detach().mean()),
            "loss/trust_region": float(tr.detach().mean()),
            "residual/abs_mean": float(residual.abs().mean()),
        }
        return LossOutput(loss=loss, residual=residual, metrics=metrics)

    def _refl(self, batch: TransitionBatch, policy: PolicyModel, lookahead: Lookahead, beta: float) -> LossOutput:
        x_t = batch.x_t
        t, _, a, _ = policy.schedule.at_steps(batch.step, dtype=x_t.dtype, device=x_t.device)
        eps, _ = self.policy_kernel(policy, batch)
        x0 = policy.schedule.predict_x0(x_t, eps, batch.step)
        x0_old = policy.schedule.predict_x0(x_t, batch.eps_old.to(x_t), batch.step)
        zeros_t = torch.zeros_like(t)
        g = lookahead.grad_log_reward(x0.detach(), zeros_t, batch.cond, terminal=torch.ones_like(batch.is_last))
        reward_term = -beta * _dot(g.detach().to(x0), x0)
        tr = self.trust_region_term(eps, batch)
        return self.output(reward_term + tr, mean_dims((x0 - x0_old) ** 2), {"reward": reward_term, "trust_region": tr})

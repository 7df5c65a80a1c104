"""RTB: relative trajectory balance (Venkatraman et al., NeurIPS 2024) against the frozen pretrained chain."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from gfnalign.core.batches import TrajectoryBatch, TransitionBatch
from gfnalign.core.protocols import Lookahead, PolicyModel
from gfnalign.objectives.base import LossOutput, register
from gfnalign.objectives.common import TransitionObjective, approx_kl, check_choice, check_terminal_reward
from gfnalign.objectives.heads import make_log_flow_head
from gfnalign.sampling.subsample import select_slots

#: "prompt": log Z_c = a learned scalar + a zero-initialised head of the pooled prompt conditioning;
#: "start": log Z(x_start, c) = a learned scalar + a log-flow head at the trajectory's first state (it
#: learns log G(x_start), the pretrained chain's soft value at the start; see the class docstring).
LOG_Z_MODES = ("prompt", "start")
#: where the log P_F^θ of the steps without gradient come from: "recompute" (a no-grad pass of the current
#: policy, exact) or "recorded" (the behaviour policy's value stored by the rollout: no extra pass, exact
#: only on-policy, i.e. for the first update after each rollout).
DETACHED_LOG_PF = ("recompute", "recorded")


class PromptLogZ(nn.Module):
    """``log Z_c``: a scalar plus a zero-initialised MLP of the mean-pooled conditioning (scalar only when
    ``cond_dim`` is None or ``cond`` is None). ``forward(cond, n) -> [n]``."""

    def __init__(self, cond_dim: int | None, hidden: int = 128):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(()))
        self.cond_dim = cond_dim
        self.net = None
        if cond_dim is not None:
            self.net = nn.Sequential(nn.Linear(cond_dim, hidden), nn.SiLU(), nn.Linear(hidden, 1))
            nn.init.zeros_(self.net[2].weight)
            nn.init.zeros_(self.net[2].bias)

    def forward(self, cond: Any, n: int) -> torch.Tensor:
        out = self.bias.expand(n)
        if self.net is not None and isinstance(cond, torch.Tensor):
            c = cond.to(self.bias.dtype)
            if c.dim() == 3:
                c = c.mean(dim=1)
            if c.dim() != 2 or c.shape[1] != self.cond_dim:
                raise ValueError(f"cond has shape {tuple(cond.shape)}; rtb's log Z head expects [n, {self.cond_dim}] "
                                 f"or [n, L, {self.cond_dim}] (cond_dim is the conditioning width)")
            out = out + self.net(c).squeeze(1)
        return out


class StartLogZ(nn.Module):
    """``log Z(x_start, c)``: a scalar plus a log-flow head (zero-initialised) at the first state."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(()))
        self.head = head

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        out = self.head(x, t, cond)
        return out + self.bias.to(out.dtype)


@register("rtb")
class RTB(TransitionObjective):
    r"""Relative trajectory balance: one squared residual per trajectory against the frozen pretrained chain.

    For a trajectory τ = (x_start → … → x_final) of K steps::

        delta(τ) = log Z + Σ_k log P_F^θ(x_{k+1} | x_k) − Σ_k log P_F^#(x_{k+1} | x_k) − beta · r(x_final)
        L        = mean_τ delta(τ)² + λ · mean_rows mean_dims(ε_θ − ε_old)²

    P_F^# is the frozen pretrained policy (``reference=True``, no grad); log-probs are summed over dimensions
    (``mean`` divides them by D, i.e. targets exp(D·beta·r)). ``log_z``:

    * ``"prompt"`` (default): log Z_c = a scalar + a zero-initialised MLP of the pooled prompt conditioning
      (a scalar alone when the model is unconditional);
    * ``"start"``: log Z(x_start, c) = a scalar + a log-flow head at the first state.

    Fixed point: delta = 0 for every τ means P^θ(τ | x_start) = P^#(τ | x_start)·exp(beta·r(x_final))/Z, which
    is a normalised law for every start only if Z = G(x_start) := E_#[exp(beta·r(x_final)) | x_start]. With
    ``log_z="start"`` the loss can vanish: the head learns log G(x_start) and the policy the per-start tilt
    P^#(τ | x_start)·R/G(x_start); the terminal law is the pretrained **sampler's** marginal tilted by
    R = exp(beta·r) exactly when G(x_start) is constant (a start with no memory of the image) — otherwise
    a per-noise tilt (the value-function bias, DESIGN.md §5), which drawing the start ∝ N(0, I)·G(x_start)
    removes (:meth:`log_start_value` gives the learned log G(x_start) for that). With ``"prompt"`` and a
    start that carries signal, no θ makes delta vanish; the minimiser is a compromise near the per-noise
    tilt. On images (Stable Diffusion: √ᾱ_start ≈ 0.07) rtb samples ∝ p_#-sampler(x)·exp(beta·r(x)) up
    to that bias.

    Memory and variance (``grad_fraction``, ``detached_log_pf``): every trained trajectory needs all K
    steps' log P_F^θ and log P_F^# values, but its gradient is 2·delta·Σ_k ∇log P_F^θ(k), a sum over steps.
    With ``grad_fraction`` f < 1 only J = max(1, ⌊f·K⌋) stratified steps per trajectory keep their graph
    and their gradient is scaled by K/J (unbiased for the full one, more variance); the other steps are
    evaluated without graph (``detached_log_pf="recompute"``, one no-grad pass each) or read from the
    rollout (``"recorded"``: no pass at all; exact only on-policy). Activation memory scales with J·B
    instead of K·B. The reference pass costs K no-grad passes per trajectory either way.

    The trainer must keep every trajectory's K transitions in one micro-batch: ``whole_trajectories`` is
    True and :meth:`select_transitions` returns all of them (rows trajectory-major, steps ascending).

    Where gradients stop:

    ===========================  =============  =============
    term                         theta (policy) phi (log Z)
    ===========================  =============  =============
    log Z (scalar / head)        --             yes
    log P_F^θ, grad rows         yes (×K/J)     --
    log P_F^θ, other rows        no             --
    log P_F^# (reference)        constant       constant
    beta · reward                no             no
    trust region                 yes            --
    ===========================  =============  =============
    """

    name = "rtb"
    needs_reward_gradient = False
    needs_reference = True
    whole_trajectories = True

    def __init__(
        self,
        state_shape: Sequence[int] | None = None,
        cond_dim: int | None = None,
        *,
        log_z: str = "prompt",
        log_flow_head: nn.Module | None = None,
        head_hidden: int | None = None,
        num_train_timesteps: int = 1000,
        grad_fraction: float = 1.0,
        detached_log_pf: str = "recompute",
        **common: Any,
    ):
        for key in ("fraction", "stratified", "include_last"):
            if common.get(key) is not None and key in common:
                raise ValueError(f"{key}={common[key]!r} is not an option of rtb: it trains on whole trajectories; "
                                 "use grad_fraction (the share of steps that carry gradient) instead")
            common.pop(key, None)
        super().__init__(**common)
        check_choice("log_z", log_z, LOG_Z_MODES)
        check_choice("detached_log_pf", detached_log_pf, DETACHED_LOG_PF)
        self.log_z_mode = log_z
        self.learns_start_value = log_z == "start"
        self.detached_log_pf = detached_log_pf
        grad_fraction = float(grad_fraction)
        if not 0.0 < grad_fraction <= 1.0:  # also rejects NaN
            raise ValueError(f"grad_fraction={grad_fraction} must be in (0, 1] (the share of each trajectory's steps "
                             "that carry gradient; 1 = all)")
        self.grad_fraction = grad_fraction
        if log_z == "prompt":
            if log_flow_head is not None:
                raise ValueError("log_flow_head is used by log_z='start' only; remove it or set log_z='start'")
            self.log_z = PromptLogZ(cond_dim)
        else:
            if log_flow_head is None:
                if state_shape is None:
                    raise ValueError("rtb with log_z='start': pass state_shape (e.g. (4, 64, 64) or (2,)) or log_flow_head")
                log_flow_head = make_log_flow_head(state_shape, cond_dim, hidden=head_hidden,
                                                   num_train_timesteps=num_train_timesteps, zero_init=True)
            self.log_z = StartLogZ(log_flow_head)

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"log_z": self.log_z}

    # -- the trainer's hooks ---------------------------------------------------------------------------------
    def select_transitions(self, traj: TrajectoryBatch, generator: torch.Generator | None = None) -> TransitionBatch:
        """Every step of every trajectory (trajectory-major, steps ascending), with ``grad_mask`` marking the
        J stratified steps per trajectory that carry gradient."""
        B, K = traj.batch_size, traj.num_steps
        traj_idx = torch.arange(B, dtype=torch.int64).repeat_interleave(K)
        slot = torch.arange(K, dtype=torch.int64).repeat(B)
        batch = traj.transitions(traj_idx, slot)
        if self.grad_fraction >= 1.0:
            return batch
        picked = select_slots(B, K, fraction=self.grad_fraction, stratified=True, include_last=False,
                              generator=generator)
        mask = torch.zeros(B, K, dtype=torch.bool)
        mask.scatter_(1, picked, True)
        return batch.with_fields(grad_mask=mask.reshape(-1).to(batch.x_t.device))

    def log_start_value(self, policy: PolicyModel, x: torch.Tensor, cond: Any) -> torch.Tensor | None:
        """``[N]`` the learned log G(x_start) at start states ``x`` (log_z="start"), else None."""
        if self.log_z_mode != "start":
            return None
        t = policy.schedule.timesteps[:1].to(x.device).expand(x.shape[0])
        return self.log_z(x, t, cond)

    @torch.no_grad()
    def log_start_weight(
        self, policy: PolicyModel, lookahead: Lookahead | None, x: torch.Tensor, cond: Any, *, beta: float
    ) -> torch.Tensor | None:
        """log G(x_start) (log_z="start"; in units of D·log P with ``mean`` reduction), else None."""
        value = self.log_start_value(policy, x, cond)
        return None if value is None else value / self.reduction_scale(x)

    # -- the loss -------------------------------------------------------------------------------------------
    def _segments(self, batch: TransitionBatch, num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(segment id [N], first row of each trajectory [B])``; checks that trajectories are whole."""
        ids, inverse, counts = torch.unique_consecutive(batch.traj_id, return_inverse=True, return_counts=True)
        if bool((counts != num_steps).any()) or ids.unique().numel() != ids.numel():
            raise ValueError(
                f"rtb needs all {num_steps} steps of each trajectory together in one batch (got runs of "
                f"{sorted(set(counts.tolist()))} rows per trajectory); use rtb's own select_transitions and split "
                "micro-batches at trajectory boundaries (the trainer does this for objectives with whole_trajectories)")
        first = torch.cumsum(counts, 0) - counts
        steps_ok = bool((batch.step.reshape(-1, num_steps) == torch.arange(num_steps, device=batch.step.device)).all())
        if not steps_ok:
            raise ValueError("rtb: each trajectory's rows must hold steps 0..K-1 in order")
        return inverse, first

    def forward(  # type: ignore[override]
        self, batch: TransitionBatch, policy: PolicyModel, lookahead: Lookahead | None, *, beta: float
    ) -> LossOutput:
        batch = self.working_precision(batch)
        check_terminal_reward(batch)
        K = policy.schedule.num_steps
        seg, first = self._segments(batch, K)
        B = int(first.numel())
        red = self.log_prob_reduction
        N = len(batch)
        dtype = batch.x_t.dtype
        grad_rows = torch.ones(N, dtype=torch.bool, device=batch.x_t.device) if batch.grad_mask is None \
            else batch.grad_mask.to(batch.x_t.device)
        J = grad_rows.reshape(B, K).sum(1)
        if bool((J == 0).any()):
            raise ValueError("rtb: every trajectory needs at least one step with gradient (grad_mask)")
        idx = grad_rows.nonzero(as_tuple=True)[0]
        sub = batch.index(idx)
        eps, kernel = self.policy_kernel(policy, sub)
        log_pf_grad = kernel.log_prob(sub.x_next, red)
        log_pf = torch.zeros(N, dtype=dtype, device=batch.x_t.device)
        rest = (~grad_rows).nonzero(as_tuple=True)[0]
        if rest.numel():
            if self.detached_log_pf == "recorded":
                log_pf[rest] = self.old_log_pf(batch, log_pf)[rest]
            else:
                with torch.no_grad():
                    other = batch.index(rest)
                    log_pf[rest] = self.policy_kernel(policy, other)[1].log_prob(other.x_next, red).to(dtype)
        with torch.no_grad():
            log_ref = self.policy_kernel(policy, batch, reference=True)[1].log_prob(batch.x_next, red).to(dtype)
        # value of every log P_F^θ exact, gradient of the grad rows scaled by K/J (unbiased for the full sum)
        scale = (K / J.to(dtype))[seg[idx]]
        surrogate = log_pf_grad.detach() + scale * (log_pf_grad - log_pf_grad.detach())
        log_pf = log_pf.index_put((idx,), surrogate.to(dtype))
        sum_pf = torch.zeros(B, dtype=dtype, device=log_pf.device).index_add(0, seg, log_pf)
        sum_ref = torch.zeros(B, dtype=dtype, device=log_pf.device).index_add(0, seg, log_ref)
        start = batch.index(first)
        if self.log_z_mode == "start":
            t0, _, _, _ = policy.schedule.at_steps(start.step, dtype=dtype, device=start.x_t.device)
            log_z = self.log_z(start.x_t, t0, start.cond)
        else:
            log_z = self.log_z(start.cond, B)
        log_z = log_z.to(dtype)
        terminal = beta * start.reward.to(log_pf.device, dtype)
        delta = log_z + sum_pf - sum_ref - terminal
        tb = delta**2
        tr = self.trust_region_term(eps, sub)
        loss = tb.mean() + (tr.mean() if self.trust_region else 0.0)
        residual = delta.detach()[seg]
        metrics = {
            "loss/total": float(loss.detach()),
            "loss/tb": float(tb.detach().mean()),
            "loss/trust_region": float(tr.detach().mean()),
            "residual/abs_mean": float(delta.detach().abs().mean()),
            "flow/log_z_mean": float(log_z.detach().mean()),
            "policy/log_ratio_ref_mean": float((sum_pf - sum_ref).detach().mean()),
            "policy/approx_kl": approx_kl(log_pf_grad, self.old_log_pf(sub, log_pf_grad)),
        }
        return LossOutput(loss=loss, residual=residual, metrics=metrics)

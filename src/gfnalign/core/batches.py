"""Typed, shape-checked batches: whole trajectories from a rollout, and the transitions an objective trains on.

Shapes: ``[B]`` trajectories, ``[K]`` steps, ``[N]`` transitions; ``...`` is the state shape
(``[C,H,W]`` for latents, ``[d]`` in the toy). ``cond`` is a tensor with the batch dimension first, or
``None`` when the model is unconditional.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch


def _index(value: Any, idx: torch.Tensor) -> Any:
    if value is None or isinstance(value, str):  # per-batch metadata, not per-row data
        return value
    if isinstance(value, torch.Tensor):
        return value[idx.to(value.device)]
    if isinstance(value, list | tuple):
        return [value[int(i)] for i in idx.tolist()]
    raise TypeError(f"cannot index a batch field of type {type(value).__name__}")


def _to(value: Any, device: torch.device | str) -> Any:
    return value.to(device) if isinstance(value, torch.Tensor) else value


def _check_leading(name: str, value: Any, n: int) -> None:
    if value is None:
        return
    size = value.shape[0] if isinstance(value, torch.Tensor) else len(value)
    if size != n:
        raise ValueError(f"batch field {name!r} has leading size {size}, expected {n}")


@dataclass(frozen=True)
class TrajectoryBatch:
    """What a rollout records for B trajectories of K steps.

    Attributes:
        states: [B, K+1, ...] x at every step, noisiest first; ``states[:, -1]`` is the terminal sample.
        steps: [K] int64 step indices into the policy's NoiseSchedule (``arange(K)`` for a full rollout).
        log_pf: [B, K] log P_F of each taken step under the behaviour policy (reduction as configured).
        eps: [B, K, ...] guided eps the behaviour policy predicted at each state (trust region, recompute).
        cond: [B, ...] conditioning or None.
        reward: [B] raw terminal reward r(x_final), float32 (NaN allowed until validated by the trainer).
        prompt_id: [B] int64, index of the prompt (groups for per-prompt normalisation).
        traj_id: [B] int64, unique id of each trajectory in this epoch.
        lookahead_reward: [B, K+1] optional cached r(x0_hat) at every state (the last entry is the reward).
        advantage: [B] optional per-trajectory advantage (DDPO), filled by an objective's ``prepare``.
        prompts: optional list of B prompt strings (for logging and rewards).
        log_prob_reduction: optional, how ``log_pf`` was reduced (``"sum"`` / ``"mean"``); objectives use it
            to convert ``log_pf_old`` to their own reduction (``None``: assumed to match).
    """

    states: torch.Tensor
    steps: torch.Tensor
    log_pf: torch.Tensor
    eps: torch.Tensor
    cond: torch.Tensor | None
    reward: torch.Tensor
    prompt_id: torch.Tensor
    traj_id: torch.Tensor
    lookahead_reward: torch.Tensor | None = None
    advantage: torch.Tensor | None = None
    prompts: list[str] | None = field(default=None, compare=False)
    log_prob_reduction: str | None = None

    def __post_init__(self) -> None:
        B, K1 = self.states.shape[:2]
        K = K1 - 1
        if self.steps.shape != (K,):
            raise ValueError(f"steps must have shape [{K}] for states with {K1} entries, got {tuple(self.steps.shape)}")
        if self.log_pf.shape != (B, K):
            raise ValueError(f"log_pf must have shape [{B}, {K}], got {tuple(self.log_pf.shape)}")
        if self.eps.shape != (B, K, *self.states.shape[2:]):
            raise ValueError(f"eps must have shape [{B}, {K}, ...state], got {tuple(self.eps.shape)}")
        for name in ("cond", "reward", "prompt_id", "traj_id", "advantage", "prompts"):
            _check_leading(name, getattr(self, name), B)
        if self.lookahead_reward is not None and self.lookahead_reward.shape != (B, K1):
            raise ValueError(f"lookahead_reward must have shape [{B}, {K1}], got {tuple(self.lookahead_reward.shape)}")

    @property
    def batch_size(self) -> int:
        return int(self.states.shape[0])

    @property
    def num_steps(self) -> int:
        return int(self.states.shape[1]) - 1

    @property
    def final(self) -> torch.Tensor:
        return self.states[:, -1]

    def index(self, idx: torch.Tensor) -> TrajectoryBatch:
        """Sub-batch of trajectories ``idx`` ([b] int64)."""
        return replace(
            self,
            **{f.name: _index(getattr(self, f.name), idx) for f in fields(self) if f.name != "steps"},
        )

    def to(self, device: torch.device | str) -> TrajectoryBatch:
        return replace(self, **{f.name: _to(getattr(self, f.name), device) for f in fields(self)})

    def transitions(self, traj_idx: torch.Tensor, slot: torch.Tensor) -> TransitionBatch:
        """Gather transitions: row i is step-slot ``slot[i]`` of trajectory ``traj_idx[i]`` ([N] each).

        ``slot`` indexes positions 0..K-1 of this rollout; the schedule step is ``steps[slot]``.
        """
        traj_idx = traj_idx.to(self.states.device)
        slot = slot.to(self.states.device)
        K = self.num_steps
        la = self.lookahead_reward
        return TransitionBatch(
            x_t=self.states[traj_idx, slot],
            x_next=self.states[traj_idx, slot + 1],
            step=self.steps.to(slot.device)[slot],
            is_last=slot == K - 1,
            cond=_index(self.cond, traj_idx),
            log_pf_old=self.log_pf[traj_idx, slot],
            eps_old=self.eps[traj_idx, slot],
            reward=self.reward[traj_idx],
            traj_id=self.traj_id[traj_idx],
            prompt_id=self.prompt_id[traj_idx],
            lookahead_reward_t=None if la is None else la[traj_idx, slot],
            lookahead_reward_next=None if la is None else la[traj_idx, slot + 1],
            advantage=None if self.advantage is None else self.advantage[traj_idx],
            log_prob_reduction=self.log_prob_reduction,
        )


@dataclass(frozen=True)
class TransitionBatch:
    """N transitions x_t -> x_next, each from a recorded trajectory.

    Attributes:
        x_t, x_next: [N, ...] states before and after the step (detached data).
        step: [N] int64 index into the policy's NoiseSchedule (gives t, t_next, alpha-bars).
        is_last: [N] bool, the step lands on the terminal state.
        cond: [N, ...] or None.
        log_pf_old: [N] log P_F under the behaviour policy at sampling time.
        eps_old: [N, ...] guided eps of the behaviour policy at x_t (trust region anchor).
        reward: [N] raw terminal reward of the transition's trajectory.
        traj_id, prompt_id: [N] int64.
        lookahead_reward_t / _next: [N] optional cached r(x0_hat) at x_t / x_next.
        lookahead_grad_t / _next: [N, ...] optional cached ∇r(x0_hat) at x_t / x_next.
        advantage: [N] optional per-trajectory advantage (DDPO).
        log_prob_reduction: optional, how ``log_pf_old`` was reduced (``None``: assumed to match the objective).
        grad_mask: [N] optional bool, the rows whose log P_F carries gradient (whole-trajectory objectives
            such as ``rtb`` backpropagate through a subsample of steps; ``None``: every row).
    """

    x_t: torch.Tensor
    x_next: torch.Tensor
    step: torch.Tensor
    is_last: torch.Tensor
    cond: torch.Tensor | None
    log_pf_old: torch.Tensor
    eps_old: torch.Tensor
    reward: torch.Tensor
    traj_id: torch.Tensor
    prompt_id: torch.Tensor
    lookahead_reward_t: torch.Tensor | None = None
    lookahead_reward_next: torch.Tensor | None = None
    lookahead_grad_t: torch.Tensor | None = None
    lookahead_grad_next: torch.Tensor | None = None
    advantage: torch.Tensor | None = None
    log_prob_reduction: str | None = None
    grad_mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        N = self.x_t.shape[0]
        state = tuple(self.x_t.shape[1:])
        for name in ("x_next", "eps_old", "lookahead_grad_t", "lookahead_grad_next"):
            v = getattr(self, name)
            if v is not None and tuple(v.shape) != (N, *state):
                raise ValueError(f"{name} must have shape {(N, *state)}, got {tuple(v.shape)}")
        for name in ("step", "is_last", "log_pf_old", "reward", "traj_id", "prompt_id",
                     "lookahead_reward_t", "lookahead_reward_next", "advantage", "grad_mask"):
            v = getattr(self, name)
            if v is not None and tuple(v.shape) != (N,):
                raise ValueError(f"{name} must have shape [{N}], got {tuple(v.shape)}")
        _check_leading("cond", self.cond, N)
        if self.is_last.dtype != torch.bool:
            raise ValueError(f"is_last must be a bool tensor, got {self.is_last.dtype}")
        if self.grad_mask is not None and self.grad_mask.dtype != torch.bool:
            raise ValueError(f"grad_mask must be a bool tensor, got {self.grad_mask.dtype}")

    def __len__(self) -> int:
        return int(self.x_t.shape[0])

    def index(self, idx: torch.Tensor) -> TransitionBatch:
        return replace(self, **{f.name: _index(getattr(self, f.name), idx) for f in fields(self)})

    def to(self, device: torch.device | str) -> TransitionBatch:
        return replace(self, **{f.name: _to(getattr(self, f.name), device) for f in fields(self)})

    def with_fields(self, **changes: Any) -> TransitionBatch:
        return replace(self, **changes)

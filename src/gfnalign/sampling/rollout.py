"""Sampling trajectories from a policy and recomputing their log-probabilities with gradient.

A trajectory runs from pure noise to the image: ``states[:, 0]`` is ``x_init`` at the noisiest timestep
and ``states[:, k + 1]`` is the state after step ``k``. Every step draws

    x_next = mean_theta(x_t) + sigma_t * z,    z ~ N(0, I)

with the Gaussian kernel of the policy's schedule (:meth:`gfnalign.core.NoiseSchedule.forward_kernel`:
DDIM-η, ``eta = 1`` is DDPM; or a flow schedule's Flow-GRPO SDE / CPS kernel with noise level ``eta``),
and records ``log P_F(x_next | x_t)`` under the behaviour policy and the guided output it predicted (ε, or
the velocity for a rectified-flow schedule).
"""

from __future__ import annotations

from typing import Any

import torch

from gfnalign.core.batches import TrajectoryBatch, TransitionBatch
from gfnalign.core.kernels import REDUCTIONS, GaussianKernel
from gfnalign.core.protocols import PolicyModel


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(
            f"reduction={reduction!r} is not supported; use 'sum' (exact balance, default) or 'mean' "
            "(the authors' code, multiplies the effective beta by the latent size D)"
        )


def _randn(shape: torch.Size, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device, then moved next to ``like``."""
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


@torch.no_grad()
def rollout(
    policy: PolicyModel,
    cond: Any,
    x_init: torch.Tensor,
    *,
    eta: float = 1.0,
    reduction: str = "sum",
    generator: torch.Generator | None = None,
    steps: torch.Tensor | None = None,
    show_progress: bool = False,
    prompt_id: torch.Tensor | None = None,
    traj_id: torch.Tensor | None = None,
    prompts: list[str] | None = None,
) -> TrajectoryBatch:
    """Run the policy from ``x_init`` and record the trajectory (no gradient).

    Args:
        policy: anything with ``schedule`` and ``eps(x, t, cond, reference=False)`` (guided eps).
        cond: ``[B, ...]`` conditioning or ``None``.
        x_init: ``[B, ...]`` start states (pure noise for a full rollout).
        eta: noise level of the schedule's kernel (DDIM eta in (0, 1], 1 = DDPM; Flow-GRPO's a for
            ``flow_sde``; CPS's a in (0, 1] for ``cps``).
        reduction: how log P_F is reduced over the state dimensions (``sum`` or ``mean``).
        generator: torch generator for the per-step noise (deterministic given its state).
        steps: ``[K]`` schedule step indices to run, in order (default: all steps of the schedule).
            They must be consecutive (``steps[k+1] == steps[k] + 1``) so that each step starts where the
            previous one landed. Objectives treat the last recorded state as terminal (``is_last``), so a
            rollout meant for training must end at the schedule's last step (e.g. ``arange(k, K)``).
        show_progress: a tqdm bar over steps.
        prompt_id, traj_id: ``[B]`` int64 (default ``arange(B)``).
        prompts: optional prompt strings, stored for logging and rewards.

    Returns:
        A :class:`TrajectoryBatch` with ``states [B, K+1, ...]`` (in ``x_init``'s dtype, at least float32), ``log_pf [B, K]``, ``eps [B, K, ...]`` and
        ``reward`` filled with NaN (the trainer scores ``traj.final`` and fills it).
    """
    _check_reduction(reduction)
    if not eta > 0:
        raise ValueError(f"eta={eta}: sampling needs eta > 0 so that every step has a density")
    schedule = policy.schedule
    schedule.check_noise_level(eta)
    if steps is None:
        steps = torch.arange(schedule.num_steps, dtype=torch.int64)
    steps = torch.as_tensor(steps, dtype=torch.int64).cpu()
    if steps.dim() != 1 or steps.numel() == 0:
        raise ValueError(f"steps must be a non-empty 1-D tensor of step indices, got shape {tuple(steps.shape)}")
    if steps.numel() > 1 and not bool((steps[1:] - steps[:-1] == 1).all()):
        raise ValueError(f"steps must be consecutive schedule indices, got {steps.tolist()}")
    if int(steps.min()) < 0 or int(steps.max()) >= schedule.num_steps:
        raise ValueError(f"steps must lie in [0, {schedule.num_steps - 1}], got {steps.tolist()}")
    B = x_init.shape[0]
    device = x_init.device
    # states and log-probs live in at least float32 (bf16 summed log-probs would be useless)
    x = x_init.to(torch.promote_types(x_init.dtype, torch.float32))
    states = [x]
    log_pfs, epss = [], []
    iterator = steps.tolist()
    if show_progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="sampling", leave=False)
    for k in iterator:
        step = torch.full((B,), k, dtype=torch.int64, device=device)
        t, _, _, _ = schedule.at_steps(step, dtype=x.dtype, device=device)
        eps = policy.eps(x, t, cond, reference=False)
        kernel = schedule.forward_kernel(x, eps, step, eta)
        x_next = kernel.sample(_randn(x.shape, x, generator))
        log_pfs.append(kernel.log_prob(x_next, reduction))
        epss.append(eps)
        states.append(x_next)
        x = x_next
    arange = torch.arange(B, dtype=torch.int64, device=device)
    return TrajectoryBatch(
        states=torch.stack(states, dim=1),
        steps=steps.to(device),
        log_pf=torch.stack(log_pfs, dim=1),
        eps=torch.stack(epss, dim=1),
        cond=cond,
        reward=torch.full((B,), float("nan"), dtype=torch.float32, device=device),
        prompt_id=arange.clone() if prompt_id is None else torch.as_tensor(prompt_id, dtype=torch.int64, device=device),
        traj_id=arange.clone() if traj_id is None else torch.as_tensor(traj_id, dtype=torch.int64, device=device),
        prompts=prompts,
        log_prob_reduction=reduction,
    )


def transition_kernel(
    policy: PolicyModel,
    batch: TransitionBatch,
    *,
    eta: float = 1.0,
    reference: bool = False,
    x_t: torch.Tensor | None = None,
) -> tuple[torch.Tensor, GaussianKernel]:
    """``(eps [N,...], P_F kernel)`` of the current (or reference) policy at ``batch.x_t``.

    ``x_t`` overrides ``batch.x_t`` (e.g. a copy with ``requires_grad`` for reverse scores, or a state
    re-generated with gradient by reward backpropagation).
    """
    x = batch.x_t if x_t is None else x_t
    t, _, _, _ = policy.schedule.at_steps(batch.step, dtype=x.dtype, device=x.device)
    eps = policy.eps(x, t, batch.cond, reference=reference)
    return eps, policy.schedule.forward_kernel(x, eps, batch.step, eta)


def recompute_log_pf(
    policy: PolicyModel,
    batch: TransitionBatch,
    *,
    eta: float = 1.0,
    reduction: str = "sum",
    reference: bool = False,
    x_t: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, GaussianKernel]:
    """``log P_F(x_next | x_t)`` ``[N]`` of the recorded transitions under the current policy, with gradient.

    Returns ``(log_pf [N], eps [N, ...], kernel)``; ``reference=True`` asks the frozen pretrained model.
    """
    _check_reduction(reduction)
    eps, kernel = transition_kernel(policy, batch, eta=eta, reference=reference, x_t=x_t)
    return kernel.log_prob(batch.x_next, reduction), eps, kernel

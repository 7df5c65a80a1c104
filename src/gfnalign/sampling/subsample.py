"""Which transitions of each trajectory to train on.

Two schemes, both deterministic given ``generator`` and both without replacement:

* **uniform** (``stratified=False``): a random subset of the K steps of each trajectory.
* **stratified** (``stratified=True``, the "low-variance trunks" of the ∇-GFlowNet code): the steps are
  cut into contiguous trunks and one step is drawn uniformly from each trunk, so every noise level is
  represented in every trajectory.

With ``include_last`` (default) the last step (the one that lands on the terminal state, where the
reward enters the balance conditions) is always selected, and the other draws come from steps
``0 .. K-2``. The number of transitions per trajectory is

    J = 1 + min(floor(K * fraction), K - 1)     with include_last
    J = max(1, floor(K * fraction))             without

so ``fraction = 0.1`` with K = 50 gives the authors' 6, and ``fraction = 1`` gives every step exactly once
(the authors' code crashes there). Stratified trunks have sizes that differ by at most one when the
number of candidate steps is not divisible by the number of trunks (no duplicate draws, unlike the
authors' draw with replacement over trunks that include the last step).

Rows of the returned batch are ordered trajectory-major with steps ascending.
"""

from __future__ import annotations

import math

import torch

from gfnalign.core.batches import TrajectoryBatch, TransitionBatch


def num_selected(num_steps: int, fraction: float, include_last: bool = True) -> int:
    """J, the number of transitions selected per trajectory (see the module docstring)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction={fraction} must be in (0, 1]; e.g. 0.1 trains on 10% of the steps")
    K = int(num_steps)
    drawn = math.floor(K * fraction + 1e-9)
    if include_last:
        return 1 + min(drawn, K - 1)
    return max(1, min(drawn, K))


def select_slots(
    batch_size: int,
    num_steps: int,
    *,
    fraction: float = 1.0,
    stratified: bool = False,
    include_last: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``[B, J]`` int64 slots (positions 0..K-1 along the rollout), sorted ascending in every row."""
    B, K = int(batch_size), int(num_steps)
    if K < 1:
        raise ValueError(f"a trajectory needs at least one step, got num_steps={K}")
    J = num_selected(K, fraction, include_last)
    pool = K - 1 if include_last else K  # candidate steps 0..pool-1
    draws = J - 1 if include_last else J
    gen_device = generator.device if generator is not None else torch.device("cpu")
    if draws == 0:
        picked = torch.empty(B, 0, dtype=torch.int64)
    elif stratified:
        # `draws` contiguous trunks over 0..pool-1 with sizes differing by at most one
        bounds = torch.tensor([(i * pool) // draws for i in range(draws + 1)], dtype=torch.int64)
        start, size = bounds[:-1], bounds[1:] - bounds[:-1]
        u = torch.rand(B, draws, generator=generator, device=gen_device, dtype=torch.float64).cpu()
        offset = torch.minimum((u * size).floor().long(), size - 1)
        picked = start + offset
    else:
        keys = torch.rand(B, pool, generator=generator, device=gen_device, dtype=torch.float64).cpu()
        picked = keys.argsort(dim=1)[:, :draws]
    if include_last:
        picked = torch.cat([picked, torch.full((B, 1), K - 1, dtype=torch.int64)], dim=1)
    return picked.sort(dim=1).values


def select_transitions(
    traj: TrajectoryBatch,
    *,
    fraction: float = 1.0,
    stratified: bool = False,
    include_last: bool = True,
    generator: torch.Generator | None = None,
) -> TransitionBatch:
    """Gather ``B * J`` transitions from ``traj`` (see the module docstring for the schemes)."""
    slots = select_slots(
        traj.batch_size,
        traj.num_steps,
        fraction=fraction,
        stratified=stratified,
        include_last=include_last,
        generator=generator,
    )
    B, J = slots.shape
    traj_idx = torch.arange(B, dtype=torch.int64).repeat_interleave(J)
    return traj.transitions(traj_idx, slots.reshape(-1))


def last_slots(traj: TrajectoryBatch, k: int) -> TransitionBatch:
    """The last ``k`` steps of every trajectory, in order (DRaFT-K)."""
    K = traj.num_steps
    if not 1 <= k <= K:
        raise ValueError(f"k={k} must be between 1 and the number of steps {K}")
    B = traj.batch_size
    slots = torch.arange(K - k, K, dtype=torch.int64).repeat(B)
    traj_idx = torch.arange(B, dtype=torch.int64).repeat_interleave(k)
    return traj.transitions(traj_idx, slots)

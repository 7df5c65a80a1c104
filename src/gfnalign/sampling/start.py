"""A start that removes the value-function bias: x_start drawn ∝ N(0, I)·G(x_start), by importance resampling.

A chain that starts from a fixed x_start ~ N(0, I) while x_start still carries signal (Stable Diffusion's first
state keeps √ᾱ ≈ 0.07 of the image) has a biased optimum under every prior-relative objective: the fine-tuned
path measure becomes P^#(τ | x_start)·R(x_final)/G(x_start), a per-noise tilt, where
G(x) = E_#[R(x_final) | x_start = x] (Adjoint Matching's "value-function bias", arXiv 2409.08861). Its terminal
law is the pretrained sampler's tilted by R only when the start is drawn ∝ N(0, I)·G(x_start) instead.

The objectives that learn log G at the start state (relative DAG's log-flow, rtb's ``log_z="start"``) expose it as
``objective.log_start_weight(policy, lookahead, x, cond, beta)``; :func:`resample_start` turns ``M`` standard
normal candidates per sample into one draw from N(0, I)·G/Z by sampling-importance-resampling (exact as M → ∞;
its bias is O(Var[G]/M), small when G varies weakly, as it does at SD's first state).
"""

from __future__ import annotations

import torch


def resample_start(candidates: torch.Tensor, log_weight: torch.Tensor, candidates_per_sample: int,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """One state per group of ``candidates_per_sample`` consecutive rows, drawn ∝ exp(log_weight).

    ``candidates``: ``[n·M, ...]`` proposals (rows ``i·M .. i·M+M−1`` belong to output row i);
    ``log_weight``: ``[n·M]`` log importance weights (target / proposal, any constant offset).
    Returns ``[n, ...]``. Non-finite weights are an error (a diverged head must not pick the start).
    """
    M = int(candidates_per_sample)
    if M < 1:
        raise ValueError(f"candidates_per_sample={M} must be >= 1")
    total = candidates.shape[0]
    if total % M or log_weight.shape != (total,):
        raise ValueError(f"resample_start: {total} candidates and log_weight of shape {tuple(log_weight.shape)} "
                         f"do not form groups of {M}")
    if not bool(torch.isfinite(log_weight).all()):
        raise ValueError("resample_start: the start weights log G(x_start) are NaN/inf (the learned start value "
                         "diverged)")
    n = total // M
    probs = torch.softmax(log_weight.detach().double().reshape(n, M), dim=1)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    pick = torch.multinomial(probs.to(gen_device), 1, generator=generator).reshape(n).to(candidates.device)
    rows = torch.arange(n, device=candidates.device) * M + pick
    return candidates[rows]

"""Learnable heads of the GFlowNet objectives (pure torch, no diffusers).

* log-flow head ``f_phi(x, t, cond) -> [N]`` (DAG's "log F~", the learned part of log F);
* flow-score head ``g_phi(x, t, cond) -> like x`` (∇-GFlowNet's residual flow score).

Two bodies, chosen by the state shape:

* flat states ``[N, d]``: an MLP on ``[x, time embedding, cond embedding]``;
* image latents ``[N, C, H, W]``: a small conv net whose time/cond embedding is added per channel
  (like a UNet's ResNet blocks); the log-flow version downsamples and average-pools to a scalar, the
  score version keeps the resolution.

``t`` is the *integer diffusion timestep* ``[N]`` (0 .. num_train_timesteps-1); it is normalised
internally by ``num_train_timesteps``. ``cond`` may be ``None``, ``[N, D]`` (projected) or
``[N, L, D]`` (mean-pooled over L, then projected); heads built with ``cond_dim=None`` ignore it.

Initialisation: the score head's output layer (weight *and* bias) is zero by default, so g_phi = 0 at
start and the objective begins from its forward-looking guess alone (the authors zero only the bias).
The log-flow head's output layer is zero too by default (``zero_init=False`` keeps PyTorch's init).
Heads compute in their own parameter dtype and return ``promote_types(x.dtype, parameter dtype)`` (a float32
head on bf16 latents answers in float32; on float64 toy states in float64).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, num_train_timesteps: int) -> torch.Tensor:
    """Sinusoidal embedding ``[N, dim]`` of integer timesteps rescaled to [0, 1000)."""
    half = dim // 2
    tau = t.to(torch.float32) * (1000.0 / num_train_timesteps)
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = tau[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=1)
    return emb


class _Embedding(nn.Module):
    """Time (and optional cond) embedding -> ``[N, width]``."""

    def __init__(self, width: int, cond_dim: int | None, num_train_timesteps: int, freq_dim: int = 64):
        super().__init__()
        self.num_train_timesteps = int(num_train_timesteps)
        self.freq_dim = freq_dim
        self.time = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.cond_dim = cond_dim
        self.cond = None if cond_dim is None else nn.Sequential(nn.Linear(cond_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor, cond: torch.Tensor | None, n: int, dtype: torch.dtype) -> torch.Tensor:
        t = torch.as_tensor(t, device=self.time[0].weight.device)
        if t.dim() == 0:
            t = t.expand(n)
        if t.shape != (n,):
            raise ValueError(f"timestep t must have shape [{n}], got {tuple(t.shape)}")
        emb = self.time(timestep_embedding(t, self.freq_dim, self.num_train_timesteps).to(dtype))
        if self.cond is not None and cond is not None:
            if not isinstance(cond, torch.Tensor):
                raise TypeError(f"cond must be a tensor [N, D] or [N, L, D] for this head, got {type(cond).__name__}")
            c = cond.to(dtype)
            if c.dim() == 3:
                c = c.mean(dim=1)
            if c.dim() != 2 or c.shape[0] != n or c.shape[1] != self.cond_dim:
                raise ValueError(
                    f"cond has shape {tuple(cond.shape)}; this head expects [{n}, {self.cond_dim}] or "
                    f"[{n}, L, {self.cond_dim}] (set cond_dim to the conditioning width)"
                )
            emb = emb + self.cond(c)
        return emb


def full_precision(layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """``layer(h)`` in float32 outside autocast: a head's output is added to β-scaled rewards of ~10², which
    bf16 would round to ~3 significant digits (545.37 → 544.0)."""
    with torch.autocast(device_type=h.device.type, enabled=False):
        return layer(h.to(layer.weight.dtype))


class MLPHead(nn.Module):
    """Flat states ``[N, d]`` -> ``[N]`` (``scalar=True``) or ``[N, d]`` (score)."""

    def __init__(
        self,
        dim: int,
        *,
        scalar: bool,
        cond_dim: int | None = None,
        hidden: int = 128,
        depth: int = 3,
        num_train_timesteps: int = 1000,
        zero_init: bool = True,
    ):
        super().__init__()
        self.dim, self.scalar = int(dim), bool(scalar)
        self.out_dim = 1 if self.scalar else self.dim
        self.embed = _Embedding(hidden, cond_dim, num_train_timesteps)
        self.inp = nn.Linear(self.dim, hidden)
        self.body = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(max(depth - 1, 0)))
        self.out = nn.Linear(hidden, self.out_dim)
        if zero_init:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"state x has shape {tuple(x.shape)}; this head expects [N, {self.dim}]")
        dtype = self.inp.weight.dtype
        h = self.inp(x.to(dtype)) + self.embed(t, cond, x.shape[0], dtype)
        h = torch.nn.functional.silu(h)
        for layer in self.body:
            h = torch.nn.functional.silu(layer(h))
        y = full_precision(self.out, h)
        y = y.squeeze(1) if self.scalar else y
        return y.to(torch.promote_types(x.dtype, dtype))


def _groups(ch: int) -> int:
    for g in (8, 4, 2, 1):
        if ch % g == 0:
            return g
    return 1


class _ResBlock(nn.Module):
    def __init__(self, ch: int, emb: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(ch), ch)
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.emb = nn.Linear(emb, ch)
        self.norm2 = nn.GroupNorm(_groups(ch), ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        y = self.conv1(torch.nn.functional.silu(self.norm1(h)))
        y = y + self.emb(e)[:, :, None, None]
        y = self.conv2(torch.nn.functional.silu(self.norm2(y)))
        return h + y


class ConvHead(nn.Module):
    """Image latents ``[N, C, H, W]`` -> ``[N]`` (``scalar=True``) or ``[N, C, H, W]`` (score)."""

    def __init__(
        self,
        channels: int,
        *,
        scalar: bool,
        cond_dim: int | None = None,
        hidden: int = 32,
        num_blocks: int = 2,
        num_train_timesteps: int = 1000,
        zero_init: bool = True,
    ):
        super().__init__()
        self.channels, self.scalar = int(channels), bool(scalar)
        emb = 4 * hidden
        self.embed = _Embedding(emb, cond_dim, num_train_timesteps)
        self.conv_in = nn.Conv2d(self.channels, hidden, 3, padding=1)
        self.blocks = nn.ModuleList(_ResBlock(hidden, emb) for _ in range(num_blocks))
        # the scalar head halves the resolution after each block; the score head keeps it
        self.down = nn.ModuleList(
            (nn.Conv2d(hidden, hidden, 3, stride=2, padding=1) if scalar else nn.Identity()) for _ in range(num_blocks)
        )
        self.norm_out = nn.GroupNorm(_groups(hidden), hidden)
        self.out = nn.Linear(hidden, 1) if scalar else nn.Conv2d(hidden, self.channels, 3, padding=1)
        if zero_init:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"state x has shape {tuple(x.shape)}; this head expects [N, {self.channels}, H, W]")
        dtype = self.conv_in.weight.dtype
        e = torch.nn.functional.silu(self.embed(t, cond, x.shape[0], dtype))
        h = self.conv_in(x.to(dtype))
        for block, down in zip(self.blocks, self.down, strict=True):
            h = down(block(h, e))
        h = torch.nn.functional.silu(self.norm_out(h))
        out_dtype = torch.promote_types(x.dtype, dtype)
        if self.scalar:
            return full_precision(self.out, h.mean(dim=(2, 3))).squeeze(1).to(out_dtype)
        return self.out(h).to(out_dtype)


def _check_shape(state_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in state_shape)
    if len(shape) not in (1, 3) or any(s < 1 for s in shape):
        raise ValueError(f"state_shape={shape}; use (d,) for flat states or (C, H, W) for image latents")
    return shape


def _make_head(state_shape: Sequence[int], cond_dim: int | None, *, scalar: bool, hidden: int | None,
               num_train_timesteps: int, zero_init: bool) -> nn.Module:
    """An MLP head for flat states ``(d,)``, a conv head for image latents ``(C, H, W)``."""
    shape = _check_shape(state_shape)
    if len(shape) == 1:
        return MLPHead(shape[0], scalar=scalar, cond_dim=cond_dim, hidden=hidden or 128,
                       num_train_timesteps=num_train_timesteps, zero_init=zero_init)
    return ConvHead(shape[0], scalar=scalar, cond_dim=cond_dim, hidden=hidden or 32,
                    num_train_timesteps=num_train_timesteps, zero_init=zero_init)


def make_log_flow_head(
    state_shape: Sequence[int],
    cond_dim: int | None = None,
    *,
    hidden: int | None = None,
    num_train_timesteps: int = 1000,
    zero_init: bool = True,
) -> nn.Module:
    """Scalar log-flow head ``f_phi(x, t, cond) -> [N]`` for states of shape ``state_shape``."""
    return _make_head(state_shape, cond_dim, scalar=True, hidden=hidden,
                      num_train_timesteps=num_train_timesteps, zero_init=zero_init)


def make_flow_score_head(
    state_shape: Sequence[int],
    cond_dim: int | None = None,
    *,
    hidden: int | None = None,
    num_train_timesteps: int = 1000,
    zero_init: bool = True,
) -> nn.Module:
    """Flow-score head ``g_phi(x, t, cond) -> like x`` for states of shape ``state_shape``."""
    return _make_head(state_shape, cond_dim, scalar=False, hidden=hidden,
                      num_train_timesteps=num_train_timesteps, zero_init=zero_init)

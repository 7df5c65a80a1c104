"""Learnable heads sized for a latent-diffusion backbone (diffusers blocks, cross-attention on the text).

* :class:`LogFlowHead`: scalar conditional log-flow ``f_φ(x, t, c) -> [N]`` (output layer zero-initialised).
* :class:`FlowScoreHead`: vector flow-score ``g_φ(x, t, c) -> like x`` (output conv zero-initialised).

``cond`` is the backbone's conditioning ``[N, L, D]``; ``D`` is the heads' cross-attention width. ``t`` is the
schedule's timestep ``[N]`` (or a scalar): int64 for VP schedules, float ``sigma * T`` for rectified flow (fed to
the embedding as it is, not rounded).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def _check_head_inputs(latent_shape, x, t, cond):
    if x.dim() != 4 or tuple(x.shape[1:]) != tuple(latent_shape):
        raise ValueError(f"x must be [N, {', '.join(map(str, latent_shape))}], got {tuple(x.shape)}")
    t = torch.as_tensor(t, device=x.device)
    # VP timesteps are integers (int64 as before); rectified-flow timesteps are float sigma * T (shifted), which
    # must reach the sinusoidal embedding unrounded, or two noise levels within 1/T share one embedding
    t = (t if t.is_floating_point() else t.long()).reshape(-1)
    if t.numel() == 1:
        t = t.expand(x.shape[0])
    if cond is None or cond.dim() != 3 or cond.shape[0] != x.shape[0]:
        raise ValueError(f"cond must be [N={x.shape[0]}, L, D], got {None if cond is None else tuple(cond.shape)}")
    return t


#: log-flow head layouts (``LogFlowHead(layout=...)``, ``backbone.log_flow_head`` in the config)
LOG_FLOW_HEAD_LAYOUTS = ("compact", "dag")


class LogFlowHead(nn.Module):
    """Scalar conditional log-flow ``f_φ(x, t, c)``: conv → down blocks → pool → linear.

    ``layout``:

    * ``"compact"`` (ours): DownBlock2D → CrossAttnDownBlock2D (``channels``, default 32-64), GroupNorm,
      SiLU, mean pool, linear; the final linear is zero-initialised, so ``log F = 0`` at the start
      (≈0.3 M parameters at SD1.5 size).
    * ``"dag"`` (the DAG authors' flow network, spec/dag.md §4): the down path of an SD-style UNet, three
      CrossAttnDownBlock2D and one DownBlock2D with 64-128-256-256 channels, one layer each, 8 attention
      heads, every block downsampling; mean pool (the authors' 4×4 average pool at 64×64 latents), linear;
      default init (≈6.45 M parameters at SD1.5 size).

    The final linear layer always runs in float32 outside autocast: under bf16 autocast a head output of
    ~10² would be rounded to ~3 significant digits (545.37 → 544.0), more than the θ-dependent part of a
    mean-reduced balance residual.
    """

    def __init__(self, latent_shape: Sequence[int], cross_attention_dim: int, channels: tuple[int, ...] = (32, 64),
                 layout: str = "compact"):
        super().__init__()
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps
        from diffusers.models.unets.unet_2d_blocks import CrossAttnDownBlock2D, DownBlock2D

        if layout not in LOG_FLOW_HEAD_LAYOUTS:
            raise ValueError(f"log-flow head layout={layout!r}; use one of {', '.join(LOG_FLOW_HEAD_LAYOUTS)}")
        self.layout = layout
        self.latent_shape = tuple(latent_shape)
        c_in = int(latent_shape[0])
        if layout == "dag":
            channels = (64, 128, 256, 256)
        c1 = channels[0]
        groups = min(32, c1)
        temb = 4 * c1
        self.time_proj = Timesteps(c1, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(c1, temb)
        self.conv_in = nn.Conv2d(c_in, c1, 3, padding=1)
        if layout == "compact":
            c2 = channels[1]
            self.down1 = DownBlock2D(in_channels=c1, out_channels=c1, temb_channels=temb, num_layers=1,
                                     resnet_groups=groups, add_downsample=True)
            self.down2 = CrossAttnDownBlock2D(in_channels=c1, out_channels=c2, temb_channels=temb, num_layers=1,
                                              resnet_groups=groups, num_attention_heads=max(1, c2 // 8),
                                              cross_attention_dim=cross_attention_dim, add_downsample=False)
            self.norm = nn.GroupNorm(groups, c2)
            self.out = nn.Linear(c2, 1)
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)
        else:
            blocks, c_prev = [], c1
            for i, c in enumerate(channels):
                if i < 3:
                    blocks.append(CrossAttnDownBlock2D(in_channels=c_prev, out_channels=c, temb_channels=temb,
                                                       num_layers=1, resnet_groups=groups, num_attention_heads=8,
                                                       cross_attention_dim=cross_attention_dim, add_downsample=True))
                else:
                    blocks.append(DownBlock2D(in_channels=c_prev, out_channels=c, temb_channels=temb, num_layers=1,
                                              resnet_groups=groups, add_downsample=True))
                c_prev = c
            self.blocks = nn.ModuleList(blocks)
            self.out = nn.Linear(c_prev, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        t = _check_head_inputs(self.latent_shape, x, t, cond)
        dt = self.conv_in.weight.dtype
        emb = self.time_embed(self.time_proj(t).to(dt))
        h = self.conv_in(x.to(dt))
        if self.layout == "compact":
            h, _ = self.down1(h, emb)
            h, _ = self.down2(h, emb, encoder_hidden_states=cond.to(dt))
            h = torch.nn.functional.silu(self.norm(h))
        else:
            for block in self.blocks:
                if getattr(block, "has_cross_attention", False):
                    h, _ = block(h, emb, encoder_hidden_states=cond.to(dt))
                else:
                    h, _ = block(h, emb)
        h = h.mean(dim=(2, 3))
        with torch.autocast(device_type=h.device.type, enabled=False):
            return self.out(h.float()).squeeze(-1)


class FlowScoreHead(nn.Module):
    """Vector flow-score ``g_φ(x, t, c)`` like ``x``: a small ``UNet2DConditionModel`` whose output conv
    (weight and bias) is zero-initialised, so it starts at exactly 0."""

    def __init__(self, latent_shape: Sequence[int], cross_attention_dim: int, channels: tuple[int, ...] = (32, 64)):
        super().__init__()
        from diffusers import UNet2DConditionModel

        c = int(latent_shape[0])
        self.latent_shape = tuple(latent_shape)
        self.unet = UNet2DConditionModel(
            sample_size=int(latent_shape[1]), in_channels=c, out_channels=c, layers_per_block=1,
            block_out_channels=tuple(channels), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=cross_attention_dim,
            attention_head_dim=8, norm_num_groups=min(32, channels[0]),
        )
        nn.init.zeros_(self.unet.conv_out.weight)
        nn.init.zeros_(self.unet.conv_out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        t = _check_head_inputs(self.latent_shape, x, t, cond)
        dt = self.unet.conv_out.weight.dtype
        return self.unet(x.to(dt), t, encoder_hidden_states=cond.to(dt)).sample.to(x.dtype)

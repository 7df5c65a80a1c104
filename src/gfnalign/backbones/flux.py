"""FLUX.1 (rectified flow, guidance-distilled MMDiT) as a :class:`gfnalign.core.protocols.PolicyModel`, with LoRA.

:class:`FluxBackbone` wraps the components of diffusers' ``FluxPipeline``: a ``FluxTransformer2DModel`` (held
as ``self.unet``, the shared base's name for the denoiser), an ``AutoencoderKL``, a CLIP text encoder (only its
pooled output is used) and a T5 encoder (the token sequence), and a ``FlowMatchEulerDiscreteScheduler``
*config* turned into a rectified-flow :class:`~gfnalign.core.schedule.NoiseSchedule`. What FLUX does
differently from SD3, computed as ``FluxPipeline`` does:

* **packed latents.** The policy's states are the VAE latents ``[N, C, h, w]`` like every other family (the
  kernels are element-wise, so the layout does not matter to them); each denoiser call packs them into 2×2
  patches ``[N, (h/2)(w/2), 4C]`` with the pipeline's image position ids and unpacks the velocity.
* **guidance embedding, no CFG.** FLUX.1-dev is guidance-distilled: the guidance scale enters the transformer
  as an embedding of one pass (``embedded_guidance``); there is no unconditional pass. A transformer without
  the embedding (FLUX.1-schnell) ignores the scale. ``true_cfg_scale`` is not supported.
* **resolution-dependent shift.** The grid is the pipeline's: sigmas ``linspace(1, 1/K, K)`` shifted by
  ``mu = calculate_shift(image_seq_len)`` read from the scheduler config (``base_shift``, ``max_shift``,
  ``base_image_seq_len``, ``max_image_seq_len``), ``image_seq_len = (h/2)·(w/2)``.
* timesteps are ``sigma * 1000`` floats in the schedule; the transformer receives ``sigma`` (``t / 1000``).

Conditioning rows pack the T5 sequence ``[N, L, D]`` and, as the last row, the CLIP pooled vector ``[N, P]``
zero-padded to D (FLUX.1: P = 768 <= D = 4096), as for SD3 (:func:`~gfnalign.backbones.sd3.pack_cond`).

LoRA (peft) sits on the transformer's attention projections; ``save_adapter`` writes diffusers' format with
the ``transformer.`` prefix, so ``FluxPipeline.load_lora_weights(dir)`` loads it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from gfnalign.backbones.latent_base import LatentDiffusionBackbone
from gfnalign.backbones.sd3 import pack_cond, unpack_cond

#: FLUX.1's scheduler config (``black-forest-labs/FLUX.1-dev``, ``scheduler/scheduler_config.json``)
FLUX_SCHEDULER_CONFIG = {"shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
                         "base_image_seq_len": 256, "max_image_seq_len": 4096, "num_train_timesteps": 1000}
#: ``FluxPipeline.default_sample_size``: the default latent side before the VAE factor (1024 px for FLUX.1)
DEFAULT_SAMPLE_SIZE = 128


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """``[N, C, h, w]`` -> ``[N, (h/2)(w/2), 4C]``: 2×2 patches, the layout of ``FluxPipeline._pack_latents``."""
    n, c, h, w = x.shape
    return x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents` for latents of side ``h`` × ``w``."""
    n, _, c4 = packed.shape
    return packed.view(n, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, c4 // 4, h, w)


def latent_image_ids(h: int, w: int, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    """``[(h/2)(w/2), 3]`` position ids of the packed patches (row, column in channels 1, 2), as the pipeline."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FluxBackbone(LatentDiffusionBackbone):
    """FLUX.1 as a policy (see the module docstring). Build with :meth:`from_pretrained` or from components."""

    family = "FLUX.1"
    pipeline_class_name = "FluxPipeline"
    _pipeline_parts = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
    _lora_prefix = "transformer"
    sampler_defaults = {"num_inference_steps": 28, "guidance_scale": 3.5, "eta": 0.7}
    embedded_guidance = True

    def __init__(
        self,
        *,
        transformer: nn.Module,
        vae: nn.Module,
        text_encoder: nn.Module,
        text_encoder_2: nn.Module,
        tokenizer: Any,
        tokenizer_2: Any,
        scheduler: Any,
        max_sequence_length: int = 512,
        **common: Any,
    ) -> None:
        joint = int(transformer.config.joint_attention_dim)
        pooled = int(transformer.config.pooled_projection_dim)
        if pooled > joint:
            raise ValueError(
                f"pooled_projection_dim={pooled} > joint_attention_dim={joint}: the pooled row cannot be packed "
                "into the conditioning rows"
            )
        if not isinstance(max_sequence_length, int) or not 0 < max_sequence_length <= 512:
            raise ValueError(f"max_sequence_length={max_sequence_length!r} must be an int in 1..512 (FluxPipeline's "
                             "limit; FLUX.1-dev uses 512, schnell 256)")
        if common.get("image_size") is None:  # the pipeline's default: default_sample_size latents per side
            common["image_size"] = DEFAULT_SAMPLE_SIZE * 2 ** (len(vae.config.block_out_channels) - 1)
        super().__init__(unet=transformer, vae=vae, scheduler=scheduler,
                         text_encoders={"text_encoder": text_encoder, "text_encoder_2": text_encoder_2}, **common)
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.max_sequence_length = max_sequence_length
        self.pooled_dim = pooled
        self.has_guidance_embedding = bool(getattr(transformer.config, "guidance_embeds", False))

    @staticmethod
    def _latent_channels(unet: nn.Module) -> int:
        return int(unet.config.in_channels) // 4  # the transformer sees 2×2 patches of the latents

    @staticmethod
    def _latent_multiple(unet: nn.Module) -> int:
        return 2 * int(getattr(unet.config, "patch_size", 1))

    def _flow_grid(self, num_inference_steps: int) -> dict[str, Any]:
        cfg = dict(getattr(self.scheduler, "config", self.scheduler))
        K = num_inference_steps
        sigmas = None if cfg.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / K, K)
        h, w = self.latent_shape[1:]
        return {"sigmas": sigmas, "image_seq_len": (h // 2) * (w // 2)}

    @property
    def transformer(self) -> nn.Module:
        return self.unet

    # -- construction ----------------------------------------------------------------------------------
    @classmethod
    def _components(cls, pipe: Any) -> dict[str, Any]:
        return {name: getattr(pipe, name) for name in cls._pipeline_parts}

    # -- text ---------------------------------------------------------------------------------------------
    @property
    def cond_dim(self) -> int:
        return int(self.unet.config.joint_attention_dim)

    def _text_pipeline(self) -> Any:
        from diffusers import FluxPipeline

        return FluxPipeline(transformer=self.unet, vae=self.vae, text_encoder=self.text_encoder,
                            text_encoder_2=self.text_encoder_2, tokenizer=self.tokenizer, tokenizer_2=self.tokenizer_2,
                            scheduler=self.scheduler)

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> torch.Tensor:
        embeds, pooled, _ = self._text_pipeline().encode_prompt(
            prompts, None, device=self.device, max_sequence_length=self.max_sequence_length)
        return pack_cond(embeds.float(), pooled.float())

    def _negative_cond(self) -> torch.Tensor:
        # unused by the guided velocity (no unconditional pass); kept for the base class's contract
        return self._encode([""])

    # -- denoiser -------------------------------------------------------------------------------------------
    def _unet_out(self, unet: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, *,
                  guidance: float) -> torch.Tensor:
        dt = next(unet.parameters()).dtype
        n, _, h, w = x.shape
        embeds, pooled = unpack_cond(cond, self.pooled_dim)
        g = torch.full((n,), float(guidance), device=x.device, dtype=torch.float32) if self.has_guidance_embedding \
            else None
        out = unet(
            hidden_states=pack_latents(x).to(dt),
            timestep=(t.to(dt) / self.schedule.num_train_timesteps),
            guidance=g,
            pooled_projections=pooled.to(dt),
            encoder_hidden_states=embeds.to(dt),
            txt_ids=torch.zeros(embeds.shape[1], 3, device=x.device, dtype=dt),
            img_ids=latent_image_ids(h, w, x.device, dt),
            return_dict=False,
        )[0]
        return unpack_latents(out, h, w).to(x.dtype)

    # -- export -----------------------------------------------------------------------------------------------------
    def pipeline(self) -> Any:
        """A plain ``FluxPipeline`` sharing this backbone's modules (current weights, adapter active)."""
        pipe = self._text_pipeline()
        pipe.set_progress_bar_config(disable=True)
        return pipe


def random_flux_components(
    *, seed: int = 0, latent_channels: int = 4, num_layers: int = 1, num_single_layers: int = 1, heads: int = 2,
    head_dim: int = 16, text_hidden: int = 16, t5_hidden: int = 32, guidance_embeds: bool = True,
    words: Sequence[str] = (),
) -> dict[str, Any]:
    """Random-initialised FLUX pipeline components built from configs (no downloads), as diffusers' own tests
    do: for tests and benchmarks. A CLIP encoder of width ``text_hidden`` (its pooled output: the transformer's
    ``pooled_projection_dim``), a T5 encoder of width ``t5_hidden`` (``joint_attention_dim``), offline CLIP-style
    tokenizers that know ``words``, FLUX.1's scheduler config (dynamic shift), a two-level VAE (factor 2). The
    modules are in eval mode, as ``from_pretrained`` returns them."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from gfnalign.backbones.digits_pretrain import DIGIT_VOCABULARY, build_tokenizer

    if head_dim % 4:
        raise ValueError(f"head_dim={head_dim} must be a multiple of 4 (split over the three rope axes)")
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(tuple(words) or DIGIT_VOCABULARY)
    clip_cfg = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=text_hidden, intermediate_size=2 * text_hidden,
                              num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length,
                              projection_dim=text_hidden, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    quarter = head_dim // 4
    parts = {
        "transformer": FluxTransformer2DModel(
            patch_size=1, in_channels=4 * latent_channels, num_layers=num_layers, num_single_layers=num_single_layers,
            attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=t5_hidden,
            pooled_projection_dim=text_hidden, guidance_embeds=guidance_embeds,
            axes_dims_rope=(quarter, quarter, head_dim - 2 * quarter),
        ),
        "vae": AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(8, 16),
                             down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                             norm_num_groups=8, sample_size=32, use_quant_conv=False, use_post_quant_conv=False,
                             shift_factor=0.1159, scaling_factor=0.3611),
        "text_encoder": CLIPTextModel(clip_cfg),
        "text_encoder_2": T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=t5_hidden, d_kv=8,
                                                  d_ff=t5_hidden, num_layers=1, num_heads=2, decoder_start_token_id=0)),
        "tokenizer": tokenizer,
        "tokenizer_2": build_tokenizer(tuple(words) or DIGIT_VOCABULARY),
        "scheduler": FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG),
    }
    for part in parts.values():  # eval mode, as from_pretrained returns them (T5's dropout is on in train mode)
        if isinstance(part, nn.Module):
            part.eval()
    return parts

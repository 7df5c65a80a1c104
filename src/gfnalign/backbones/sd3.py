"""Stable Diffusion 3 / 3.5 (rectified flow, MMDiT) as a :class:`gfnalign.core.protocols.PolicyModel`, with LoRA.

:class:`SD3Backbone` wraps the components of diffusers' ``StableDiffusion3Pipeline``: an
``SD3Transformer2DModel`` (held as ``self.unet``, the shared base's name for the denoiser), an
``AutoencoderKL``, two CLIP text encoders with projection and an optional T5 encoder (``None`` gives zeros in
its place, exactly as the pipeline does), and a ``FlowMatchEulerDiscreteScheduler`` *config* turned into a
rectified-flow :class:`~gfnalign.core.schedule.NoiseSchedule` (static ``shift``). The policy's output is the
guided **velocity** (``eps − x0``; classifier-free guidance inside), which the schedule's kernels read
directly: Flow-GRPO's SDE (``sampler_kernel="flow_sde"``, noise level ``eta``, the default), CPS or DDIM-η.

Conditioning rows pack the pipeline's two text outputs into one tensor ``[N, L + 1, D]``: the joint
sequence ``prompt_embeds`` ``[N, L, D]`` (CLIP-L ⊕ CLIP-G hidden states padded to D, then T5) and, as the
last row, ``pooled_prompt_embeds`` ``[N, P]`` zero-padded to D (``P <= D``; SD3: 2048 <= 4096).

LoRA (peft) sits on the transformer's attention projections; ``save_adapter`` writes diffusers' format with
the ``transformer.`` prefix, so ``StableDiffusion3Pipeline.load_lora_weights(dir)`` loads it. Timesteps are
``sigma * 1000`` floats, as the pipeline passes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gfnalign.backbones.latent_base import LatentDiffusionBackbone


class SD3Backbone(LatentDiffusionBackbone):
    """SD3/SD3.5 as a policy (see the module docstring). Build with :meth:`from_pretrained` or from components."""

    family = "Stable Diffusion 3"
    pipeline_class_name = "StableDiffusion3Pipeline"
    _pipeline_parts = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
    _lora_prefix = "transformer"
    sampler_defaults = {"num_inference_steps": 28, "guidance_scale": 4.5, "eta": 0.7}

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
        text_encoder_3: nn.Module | None = None,
        tokenizer_3: Any = None,
        negative_prompt: str = "",
        max_sequence_length: int = 256,
        **common: Any,
    ) -> None:
        if not isinstance(negative_prompt, str):
            raise TypeError(f"negative_prompt must be a str, got {type(negative_prompt).__name__}")
        if (text_encoder_3 is None) != (tokenizer_3 is None):
            raise ValueError("text_encoder_3 and tokenizer_3 go together: pass both (T5) or neither (zeros in its place)")
        joint = int(transformer.config.joint_attention_dim)
        pooled = int(transformer.config.pooled_projection_dim)
        if pooled > joint:
            raise ValueError(
                f"pooled_projection_dim={pooled} > joint_attention_dim={joint}: the pooled row cannot be packed "
                "into the conditioning rows"
            )
        encoders = {"text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
        if text_encoder_3 is not None:
            encoders["text_encoder_3"] = text_encoder_3
        super().__init__(unet=transformer, vae=vae, scheduler=scheduler, text_encoders=encoders, **common)
        if text_encoder_3 is None:
            self.text_encoder_3 = None
        self.tokenizer, self.tokenizer_2, self.tokenizer_3 = tokenizer, tokenizer_2, tokenizer_3
        self.negative_prompt = negative_prompt
        self.max_sequence_length = int(max_sequence_length)
        self.pooled_dim = pooled

    @staticmethod
    def _latent_multiple(unet: nn.Module) -> int:
        return int(unet.config.patch_size)

    @property
    def transformer(self) -> nn.Module:
        return self.unet

    # -- construction ----------------------------------------------------------------------------------
    @classmethod
    def _components(cls, pipe: Any) -> dict[str, Any]:
        return {name: getattr(pipe, name) for name in (
            "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2",
            "tokenizer_3", "scheduler")}

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, *, revision: str | None = None, variant: str | None = None,
                        load_t5: bool = True, **kwargs: Any) -> SD3Backbone:
        """Load a ``StableDiffusion3Pipeline`` folder or hub id; ``load_t5=False`` drops the T5 encoder (zeros in
        its place, as ``StableDiffusion3Pipeline(text_encoder_3=None)`` does; saves ~9 GB for SD3.5)."""
        local = Path(path_or_id).expanduser()
        no_t5_saved = local.is_dir() and not (local / "text_encoder_3").is_dir()  # a folder saved without T5
        extra = {} if load_t5 and not no_t5_saved else {"text_encoder_3": None, "tokenizer_3": None}
        return super().from_pretrained(path_or_id, revision=revision, variant=variant, pipeline_options=extra,
                                       **kwargs)

    # -- text ---------------------------------------------------------------------------------------------
    @property
    def cond_dim(self) -> int:
        return int(self.unet.config.joint_attention_dim)

    def _text_pipeline(self) -> Any:
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline(
            transformer=self.unet, vae=self.vae, text_encoder=self.text_encoder, text_encoder_2=self.text_encoder_2,
            text_encoder_3=self.text_encoder_3, tokenizer=self.tokenizer, tokenizer_2=self.tokenizer_2,
            tokenizer_3=self.tokenizer_3, scheduler=self.scheduler,
        )

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> torch.Tensor:
        embeds, _, pooled, _ = self._text_pipeline().encode_prompt(
            prompts, None, None, device=self.device, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return pack_cond(embeds.float(), pooled.float())

    def _negative_cond(self) -> torch.Tensor:
        return self._encode([self.negative_prompt])

    # -- denoiser -------------------------------------------------------------------------------------------
    def _unet_out(self, unet: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        dt = next(unet.parameters()).dtype
        embeds, pooled = unpack_cond(cond, self.pooled_dim)
        out = unet(hidden_states=x.to(dt), timestep=t.to(dt), encoder_hidden_states=embeds.to(dt),
                   pooled_projections=pooled.to(dt)).sample
        return out.to(x.dtype)

    # -- export -----------------------------------------------------------------------------------------------------
    def pipeline(self) -> Any:
        """A plain ``StableDiffusion3Pipeline`` sharing this backbone's modules (current weights, adapter active)."""
        pipe = self._text_pipeline()
        pipe.set_progress_bar_config(disable=True)
        return pipe


def pack_cond(embeds: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """``[N, L, D]`` and ``[N, P]`` (P <= D) -> ``[N, L + 1, D]``, the pooled vector zero-padded as the last row."""
    row = torch.nn.functional.pad(pooled, (0, embeds.shape[-1] - pooled.shape[-1]))
    return torch.cat([embeds, row[:, None]], dim=1)


def unpack_cond(cond: torch.Tensor, pooled_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_cond`."""
    return cond[:, :-1], cond[:, -1, :pooled_dim]


def random_sd3_components(
    *, seed: int = 0, sample_size: int = 8, latent_channels: int = 4, num_layers: int = 1, heads: int = 2,
    head_dim: int = 8, text_hidden: int = 16, with_t5: bool = False, words: Sequence[str] = (),
) -> dict[str, Any]:
    """Random-initialised SD3 pipeline components built from configs (no downloads), as diffusers' own tests
    do: for tests, benchmarks and the tiny flow world. Two CLIP encoders of width ``text_hidden`` (projection
    ``text_hidden``: pooled ``2·text_hidden``), joint width ``2·text_hidden``, an offline CLIP-style tokenizer
    that knows ``words``; ``with_t5`` adds a tiny T5 encoder whose tokenizer is the same vocabulary."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from gfnalign.backbones.digits_pretrain import DIGIT_VOCABULARY, build_tokenizer

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(tuple(words) or DIGIT_VOCABULARY)
    joint = 2 * text_hidden
    clip_cfg = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=text_hidden, intermediate_size=2 * text_hidden,
                              num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length,
                              projection_dim=text_hidden, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    parts: dict[str, Any] = {
        "transformer": SD3Transformer2DModel(
            sample_size=sample_size, patch_size=1, in_channels=latent_channels, out_channels=latent_channels,
            num_layers=num_layers, attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=joint,
            caption_projection_dim=heads * head_dim, pooled_projection_dim=joint, pos_embed_max_size=sample_size,
        ),
        "vae": AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(8, 16),
                             down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                             norm_num_groups=8, sample_size=2 * sample_size, use_quant_conv=False,
                             use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035),
        "text_encoder": CLIPTextModelWithProjection(clip_cfg),
        "text_encoder_2": CLIPTextModelWithProjection(clip_cfg),
        "tokenizer": tokenizer,
        "tokenizer_2": build_tokenizer(tuple(words) or DIGIT_VOCABULARY),
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
        "text_encoder_3": None,
        "tokenizer_3": None,
    }
    if with_t5:
        from transformers import T5Config, T5EncoderModel

        parts["text_encoder_3"] = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=joint, d_kv=8, d_ff=joint,
                                                          num_layers=1, num_heads=2, decoder_start_token_id=0))
        parts["tokenizer_3"] = build_tokenizer(tuple(words) or DIGIT_VOCABULARY)
    return parts

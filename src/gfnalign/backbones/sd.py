"""Stable Diffusion (1.x/2.x-style) as a :class:`gfnalign.core.protocols.PolicyModel`, with LoRA.

:class:`StableDiffusionBackbone` wraps diffusers' ``UNet2DConditionModel``, ``AutoencoderKL``, the text
encoder and tokenizer of a pipeline folder (or hub id), and a DDPM/DDIM-family scheduler *config* turned
into a :class:`~gfnalign.core.schedule.NoiseSchedule`. The trainer only talks to this object:

* ``eps(x, t, cond)``: the **guided** ε (classifier-free guidance inside; uncond and cond rows share one
  UNet call), converted to ε from any ``prediction_type``; ``reference=True`` answers with the pretrained
  model (adapters disabled, no grad), bit-identical to the base UNet.
* ``cond_eps`` (unguided conditional ε), ``predict_x0``, ``decode`` (latents → images in [0, 1]),
  ``encode_prompts``, ``initial_noise``.
* LoRA through peft (``unet.add_adapter``) in float32 on top of frozen base weights in fp32/bf16/fp16;
  ``trainable_parameters`` / ``trainable_state_dict`` / ``load_trainable_state_dict`` for checkpoints;
  ``save_adapter`` writes diffusers' LoRA format so ``StableDiffusionPipeline.load_lora_weights(dir)``
  loads it; ``load_adapter`` reads it back. ``full_finetune=True`` trains the whole UNet instead (the
  reference is then a frozen copy of the base UNet).
* ``make_log_flow_head`` / ``make_flow_score_head``: learnable heads sized for this backbone.

Everything except the text side and the UNet call lives in the shared base
:class:`~gfnalign.backbones.latent_base.LatentDiffusionBackbone` (also the base of the SDXL backbone);
see :func:`~gfnalign.backbones.latent_base.schedule_from_scheduler_config` for the final alpha-bar rule.

Shapes: ``x`` ``[N, C, h, w]`` latents (float32 in, float32 out), ``t`` ``[N]`` int64 diffusion timesteps,
``cond`` ``[N, L, D]`` text embeddings from :meth:`encode_prompts`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gfnalign.backbones.latent_base import (
    DEFAULT_LORA_TARGETS,
    LORA_WEIGHT_NAME,
    LatentDiffusionBackbone,
    resolve_dtype,
    schedule_from_scheduler_config,
)
from gfnalign.backbones.latent_heads import FlowScoreHead, LogFlowHead

__all__ = [
    "DEFAULT_LORA_TARGETS", "LORA_WEIGHT_NAME", "FlowScoreHead", "LogFlowHead", "StableDiffusionBackbone",
    "resolve_dtype", "schedule_from_scheduler_config",
]


class StableDiffusionBackbone(LatentDiffusionBackbone):
    """A text-to-image latent diffusion model (SD 1.x/2.x conditioning) as a policy (see the module docstring).

    Build with :meth:`from_pretrained` (a pipeline folder or hub id) or directly from components.
    Attributes: those of :class:`LatentDiffusionBackbone` plus ``text_encoder`` and ``tokenizer``.
    """

    family = "Stable Diffusion"
    pipeline_class_name = "StableDiffusionPipeline"
    _pipeline_parts = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")

    def __init__(
        self,
        *,
        unet: nn.Module,
        vae: nn.Module,
        text_encoder: nn.Module,
        tokenizer: Any,
        scheduler: Any,
        negative_prompt: str = "",
        **common: Any,
    ) -> None:
        if not isinstance(negative_prompt, str):
            raise TypeError(f"negative_prompt must be a str, got {type(negative_prompt).__name__}")
        super().__init__(unet=unet, vae=vae, scheduler=scheduler, text_encoders={"text_encoder": text_encoder},
                         **common)
        self.tokenizer = tokenizer
        self.negative_prompt = negative_prompt

    # -- construction ----------------------------------------------------------------------------------
    @classmethod
    def _components(cls, pipe: Any) -> dict[str, Any]:
        return {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder, "tokenizer": pipe.tokenizer,
                "scheduler": pipe.scheduler}

    #: the safety checker is not a denoiser component; loading without it saves its weights
    _load_options: dict[str, Any] = {"safety_checker": None, "requires_safety_checker": False}

    # -- text ---------------------------------------------------------------------------------------------
    @property
    def cond_dim(self) -> int:
        return int(self.text_encoder.config.hidden_size)

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> torch.Tensor:
        tok = self.tokenizer(
            prompts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        )
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = tok.attention_mask.to(self.device)
        out = self.text_encoder(tok.input_ids.to(self.device), attention_mask=mask)[0]
        return out.float()

    def _negative_cond(self) -> torch.Tensor:
        return self._encode([self.negative_prompt])

    # -- denoiser -------------------------------------------------------------------------------------------
    def _unet_out(self, unet: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        dt = next(unet.parameters()).dtype
        out = unet(x.to(dt), t, encoder_hidden_states=cond.to(dt)).sample
        return out.to(x.dtype)

    # -- export -----------------------------------------------------------------------------------------------------
    def pipeline(self):
        """A plain ``StableDiffusionPipeline`` sharing this backbone's modules (current weights, adapter active)."""
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
            scheduler=self.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

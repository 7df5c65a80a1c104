"""Stable Diffusion XL as a :class:`gfnalign.core.protocols.PolicyModel`, with LoRA on the UNet.

:class:`StableDiffusionXLBackbone` shares everything but the text side and the UNet call with the SD 1.x
adapter (:class:`~gfnalign.backbones.latent_base.LatentDiffusionBackbone`: guided ε, DDPM/DDIM schedule
from the scheduler config, ε/v-prediction, decode, LoRA through peft, checkpoints, heads). What SDXL adds,
computed exactly as ``StableDiffusionXLPipeline`` does:

* **two text encoders**: the penultimate hidden states of ``text_encoder`` (CLIP ViT-L) and
  ``text_encoder_2`` (OpenCLIP bigG, with projection) concatenated along features (``[B, L, D]`` with
  ``D = 768 + 1280 = 2048`` for SDXL base), and ``text_encoder_2``'s **pooled, projected** embedding
  (``[B, P]``, ``P = 1280``);
* the **micro-conditioning** ``add_time_ids = original_size + crops_coords_top_left + target_size``
  (defaults: ``(image_size, image_size)``, ``(0, 0)``, ``(image_size, image_size)``), the same for the
  conditional and unconditional rows (the pipeline's default);
* **CFG** against the cached negative conditioning: with ``negative_prompt=None`` and the pipeline's
  ``force_zeros_for_empty_prompt`` (true for SDXL base) both the negative token embeddings and the
  negative pooled embedding are zeros; otherwise the negative prompt (default ``""``) is encoded.

**The conditioning is one tensor**, so trainer, rollout and objectives index and concatenate it like SD's:
``cond [N, L + 1, W]`` with ``W = max(D, P)``; rows ``0..L-1`` hold the token embeddings in channels
``0..D-1`` and row ``L`` holds the pooled embedding in channels ``0..P-1`` (zeros elsewhere).
:meth:`pack_cond` / :meth:`unpack_cond` convert. The heads cross-attend over all ``L + 1`` rows.

The VAE of SDXL base overflows in float16; with ``dtype=fp16`` and the VAE config's ``force_upcast``
(true for SDXL's VAE) the VAE runs in float32 (as the pipeline upcasts before decoding). A VAE fixed for
float16 (``madebyollin/sdxl-vae-fp16-fix``, ``force_upcast: false``) stays in float16: pass it as
``vae=`` to :meth:`from_pretrained`. ``prediction_type`` (``epsilon`` for SDXL base, ``v_prediction`` for
v-tuned fine-tunes) comes from the scheduler config.

Not covered: the refiner (only ``text_encoder_2`` and aesthetic-score time ids), IP-adapters,
``guidance_rescale`` and separate negative micro-conditioning; they are rejected or absent.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gfnalign.backbones.latent_base import LatentDiffusionBackbone


def _size_pair(name: str, value: Any, default: tuple[int, int]) -> tuple[int, int]:
    if value is None:
        return default
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)):
        raise ValueError(f"{name}={value!r} must be two non-negative ints (height, width), e.g. {list(default)}")
    return int(value[0]), int(value[1])


class StableDiffusionXLBackbone(LatentDiffusionBackbone):
    """SDXL (base) as a policy (see the module docstring).

    Build with :meth:`from_pretrained` (a ``StableDiffusionXLPipeline`` folder or hub id) or from components.
    Attributes: those of :class:`LatentDiffusionBackbone` plus ``text_encoder``, ``text_encoder_2``,
    ``tokenizer``, ``tokenizer_2``, ``add_time_ids`` ``[1, 6]``, ``text_len`` ``L``, ``text_dim`` ``D``,
    ``pooled_dim`` ``P`` and ``cond_dim`` ``W``.
    """

    family = "Stable Diffusion XL"
    pipeline_class_name = "StableDiffusionXLPipeline"
    _pipeline_parts = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
    sampler_defaults = {"num_inference_steps": 50, "guidance_scale": 5.0, "eta": 1.0}

    def __init__(
        self,
        *,
        unet: nn.Module,
        vae: nn.Module,
        text_encoder: nn.Module,
        text_encoder_2: nn.Module,
        tokenizer: Any,
        tokenizer_2: Any,
        scheduler: Any,
        negative_prompt: str | None = None,
        force_zeros_for_empty_prompt: bool = True,
        original_size: Sequence[int] | int | None = None,
        crops_coords_top_left: Sequence[int] = (0, 0),
        target_size: Sequence[int] | int | None = None,
        clip_skip: int | None = None,
        **common: Any,
    ) -> None:
        if text_encoder is None or tokenizer is None:
            raise ValueError(
                "text_encoder/tokenizer is None: this looks like the SDXL refiner (text_encoder_2 only, aesthetic-"
                "score micro-conditioning), which is not supported; load the SDXL base pipeline"
            )
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            raise TypeError(f"negative_prompt must be a str or None, got {type(negative_prompt).__name__}")
        if clip_skip is not None and (not isinstance(clip_skip, int) or clip_skip < 0):
            raise ValueError(f"clip_skip={clip_skip!r} must be None or an int >= 0 (layers skipped from the end)")
        ucfg = unet.config
        if getattr(ucfg, "addition_embed_type", None) != "text_time":
            raise ValueError(
                f"the UNet's addition_embed_type is {getattr(ucfg, 'addition_embed_type', None)!r}, not 'text_time': "
                "it is not an SDXL UNet; load it with backbone.kind: sd"
            )
        if getattr(ucfg, "time_cond_proj_dim", None) is not None:
            raise ValueError(
                f"the UNet has time_cond_proj_dim={ucfg.time_cond_proj_dim} (a guidance-distilled LCM-style UNet); "
                "its guidance embedding is not supported"
            )
        pooled_dim = int(text_encoder_2.config.projection_dim)
        expected = int(ucfg.addition_time_embed_dim) * 6 + pooled_dim
        got = int(unet.add_embedding.linear_1.in_features)
        if got != expected:
            raise ValueError(
                f"the UNet expects {got} added-conditioning features, but 6 time ids × addition_time_embed_dim "
                f"{ucfg.addition_time_embed_dim} + pooled projection_dim {pooled_dim} = {expected}; a refiner UNet "
                "(aesthetic-score time ids) is not supported"
            )
        if tokenizer.model_max_length != tokenizer_2.model_max_length:
            raise ValueError(
                f"tokenizer.model_max_length={tokenizer.model_max_length} differs from tokenizer_2's "
                f"{tokenizer_2.model_max_length}; SDXL concatenates both encoders' tokens, so they must agree"
            )
        text_dim = int(text_encoder.config.hidden_size) + int(text_encoder_2.config.hidden_size)
        cross = ucfg.cross_attention_dim
        if isinstance(cross, int) and cross != text_dim:
            raise ValueError(
                f"the UNet's cross_attention_dim={cross} differs from the two text encoders' hidden sizes "
                f"{text_encoder.config.hidden_size} + {text_encoder_2.config.hidden_size} = {text_dim}"
            )
        super().__init__(unet=unet, vae=vae, scheduler=scheduler,
                         text_encoders={"text_encoder": text_encoder, "text_encoder_2": text_encoder_2}, **common)
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.negative_prompt = negative_prompt
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)
        self.clip_skip = clip_skip
        self.text_len = int(tokenizer.model_max_length)
        self.text_dim = text_dim
        self.pooled_dim = pooled_dim
        full = (self.image_size, self.image_size)
        self.original_size = _size_pair("original_size", original_size, full)
        self.crops_coords_top_left = _size_pair("crops_coords_top_left", crops_coords_top_left, (0, 0))
        self.target_size = _size_pair("target_size", target_size, full)
        ids = [*self.original_size, *self.crops_coords_top_left, *self.target_size]
        self.add_time_ids = torch.tensor([ids], dtype=torch.float32, device=self.device)

    # -- construction ----------------------------------------------------------------------------------
    @classmethod
    def _components(cls, pipe: Any) -> dict[str, Any]:
        return {
            "unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder,
            "text_encoder_2": pipe.text_encoder_2, "tokenizer": pipe.tokenizer, "tokenizer_2": pipe.tokenizer_2,
            "scheduler": pipe.scheduler,
            "force_zeros_for_empty_prompt": bool(pipe.config.get("force_zeros_for_empty_prompt", True)),
        }

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, *, vae: str | Path | nn.Module | None = None,
                        **kwargs: Any) -> StableDiffusionXLBackbone:
        """Load a ``StableDiffusionXLPipeline`` folder (``save_pretrained`` layout) or hub id (see
        :meth:`LatentDiffusionBackbone.from_pretrained`).

        ``vae``: another ``AutoencoderKL`` (a module, or a folder / hub id holding one), e.g. the
        float16-fixed SDXL VAE.
        """
        extra: dict[str, Any] = {"add_watermarker": False}
        if vae is not None:
            if not isinstance(vae, nn.Module):
                from diffusers import AutoencoderKL

                from gfnalign.backbones.latent_base import resolve_dtype

                src = Path(vae).expanduser()
                if not src.exists() and str(vae).startswith(("/", ".", "~")):
                    raise FileNotFoundError(f"vae folder not found: {src} (given {str(vae)!r})")
                vae = AutoencoderKL.from_pretrained(str(src) if src.exists() else str(vae),
                                                    dtype=resolve_dtype(kwargs.get("dtype", torch.float32)))
            extra["vae"] = vae
        return super().from_pretrained(path_or_id, pipeline_options=extra, **kwargs)

    # -- conditioning ------------------------------------------------------------------------------------
    @property
    def cond_dim(self) -> int:
        return max(self.text_dim, self.pooled_dim)

    def pack_cond(self, embeds: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """Token embeddings ``[B, L, D]`` and pooled embeddings ``[B, P]`` → one ``[B, L + 1, W]`` tensor."""
        b = embeds.shape[0]
        if embeds.shape[1:] != (self.text_len, self.text_dim) or pooled.shape != (b, self.pooled_dim):
            raise ValueError(
                f"embeds must be [B, {self.text_len}, {self.text_dim}] and pooled [B, {self.pooled_dim}], got "
                f"{tuple(embeds.shape)} and {tuple(pooled.shape)}"
            )
        out = embeds.new_zeros((b, self.text_len + 1, self.cond_dim))
        out[:, : self.text_len, : self.text_dim] = embeds
        out[:, self.text_len, : self.pooled_dim] = pooled.to(embeds.dtype)
        return out

    def unpack_cond(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inverse of :meth:`pack_cond`: ``(embeds [N, L, D], pooled [N, P])`` (views)."""
        return cond[:, : self.text_len, : self.text_dim], cond[:, self.text_len, : self.pooled_dim]

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> torch.Tensor:
        embeds, pooled = [], None
        for tok, enc in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids
            out = enc(ids.to(self.device), output_hidden_states=True)
            if out[0].ndim == 2:  # the projected pooled output; the pipeline keeps the last encoder's
                pooled = out[0]
            skip = 0 if self.clip_skip is None else self.clip_skip
            embeds.append(out.hidden_states[-(skip + 2)])
        if pooled is None:
            raise ValueError(
                "text_encoder_2 returned no pooled projection (its first output is not [B, P]); SDXL needs a "
                "CLIPTextModelWithProjection as text_encoder_2"
            )
        return self.pack_cond(torch.cat(embeds, dim=-1).float(), pooled.float())

    def _negative_cond(self) -> torch.Tensor:
        if self.negative_prompt is None and self.force_zeros_for_empty_prompt:
            return torch.zeros((1, self.text_len + 1, self.cond_dim), device=self.device)
        return self._encode([self.negative_prompt or ""])

    def _check(self, x: torch.Tensor, t: Any, cond: Any) -> tuple[torch.Tensor, torch.Tensor]:
        t, cond = super()._check(x, t, cond)
        want = (self.text_len + 1, self.cond_dim)
        if tuple(cond.shape[1:]) != want:
            raise ValueError(
                f"cond must be SDXL conditioning [N, {want[0]}, {want[1]}] from encode_prompts (tokens + pooled row), "
                f"got {tuple(cond.shape)}"
            )
        return t, cond

    # -- denoiser -------------------------------------------------------------------------------------------
    def _unet_out(self, unet: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        dt = next(unet.parameters()).dtype
        embeds, pooled = self.unpack_cond(cond)
        time_ids = self.add_time_ids.to(device=x.device, dtype=dt).expand(x.shape[0], -1)
        out = unet(
            x.to(dt), t, encoder_hidden_states=embeds.to(dt),
            added_cond_kwargs={"text_embeds": pooled.to(dt), "time_ids": time_ids},
        ).sample
        return out.to(x.dtype)

    # -- export -----------------------------------------------------------------------------------------------------
    def pipeline(self):
        """A plain ``StableDiffusionXLPipeline`` sharing this backbone's modules (current weights, adapter active)."""
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline(
            vae=self.vae, text_encoder=self.text_encoder, text_encoder_2=self.text_encoder_2,
            tokenizer=self.tokenizer, tokenizer_2=self.tokenizer_2, unet=self.unet, scheduler=self.scheduler,
            force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt, add_watermarker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

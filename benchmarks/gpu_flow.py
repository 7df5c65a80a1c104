"""Step time and peak GPU memory per method and batch size for the flow-matching models: SD3.5 Medium or
FLUX.1-dev sized, at Flow-GRPO's 512 px.

    python benchmarks/gpu_flow.py --model sd35m [--methods grpo,dag-db,...] [--batches 1,2,4] [--steps 10]
                                  [--gradient-checkpointing] [--no-t5] [--budget-gb 80] [--json ...]
    python benchmarks/gpu_flow.py --model flux1 --steps 6 --gradient-checkpointing
    python benchmarks/gpu_flow.py --model flux1 --device cpu --tiny     # smoke mode: tiny components, anywhere

The loop, the reward (the LAION aesthetic predictor's compute with random weights) and the table are those
of ``gpu_sd15.py``; only the model differs. Nothing is downloaded: the components are built from the real
configs with random weights, so every forward/backward costs what the real model costs:

* ``sd35m`` (Stable Diffusion 3.5 Medium): the MMDiT-X ``SD3Transformer2DModel`` (2.5 B parameters: 24 layers,
  24 heads × 64, patch 2, dual attention in layers 0-12, RMS q/k norm, joint width 4096, pooled 2048), the
  16-channel f8 VAE, CLIP-L (12 × 768) and OpenCLIP bigG (32 × 1280) text towers and T5-XXL (24 × 4096,
  4.7 B; ``--no-t5`` leaves it out as the pipeline allows); CFG 4.5 (two transformer rows per pass), the
  Flow-GRPO SDE at a = 0.7, 10 steps.
* ``flux1`` (FLUX.1-dev): ``FluxTransformer2DModel`` (11.9 B: 19 double + 38 single blocks, 24 heads × 128,
  guidance embedding), the 16-channel VAE, CLIP-L (pooled) and T5-XXL; guidance embedding 3.5 (one
  transformer row per pass), a = 0.9, 6 steps, latents packed 2×2.

Full-size components are created directly on the device in the frozen dtype (random init of 12 B
parameters in float32 on the CPU would need 48 GB and minutes). LoRA rank 32 (alpha 64) on the attention
projections, as Flow-GRPO. T5 prompts are 128 tokens (Flow-GRPO's ``max_sequence_length``). Without CUDA the
script exits with a message unless ``--device cpu`` is given explicitly.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_sd15  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              hidden_act="quick_gelu", projection_dim=768)
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              hidden_act="gelu", projection_dim=1280)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", decoder_start_token_id=0)
VAE_16 = dict(in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2,
              block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, sample_size=1024, use_quant_conv=False,
              use_post_quant_conv=False)
SD35M_TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                         attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                         caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                         dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
FLUX1_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                         num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                         guidance_embeds=True, axes_dims_rope=(16, 56, 56))
#: per model: sampling defaults (Flow-GRPO) and the benchmark's defaults
MODELS: dict[str, dict[str, Any]] = {
    "sd35m": {"label": "SD3.5-Medium-size", "eta": 0.7, "steps": 10, "guidance": 4.5},
    "flux1": {"label": "FLUX.1-dev-size", "eta": 0.9, "steps": 6, "guidance": 3.5},
}
IMAGE_SIZE = 512
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


@contextlib.contextmanager
def created_on(device: torch.device, dtype: torch.dtype):
    """Modules constructed inside are allocated (and randomly initialised) on ``device`` in ``dtype``."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            yield
    finally:
        torch.set_default_dtype(old)


def full_components(model: str, with_t5: bool, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    from gfnalign.backbones.flux import FLUX_SCHEDULER_CONFIG

    tok = gpu_sd15._tokenizer(77)
    common = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    with created_on(device, dtype):
        if model == "sd35m":
            parts: dict[str, Any] = {
                "transformer": SD3Transformer2DModel(**SD35M_TRANSFORMER),
                "vae": AutoencoderKL(**VAE_16, scaling_factor=1.5305, shift_factor=0.0609),
                "text_encoder": CLIPTextModelWithProjection(CLIPTextConfig(**common, **CLIP_L)),
                "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**common, **CLIP_G)),
                "tokenizer": tok, "tokenizer_2": tok,
                "text_encoder_3": T5EncoderModel(T5Config(**T5_XXL)) if with_t5 else None,
                "tokenizer_3": gpu_sd15._tokenizer(128) if with_t5 else None,
            }
        else:
            parts = {
                "transformer": FluxTransformer2DModel(**FLUX1_TRANSFORMER),
                "vae": AutoencoderKL(**VAE_16, scaling_factor=0.3611, shift_factor=0.1159),
                "text_encoder": CLIPTextModel(CLIPTextConfig(**common, **CLIP_L)),
                "text_encoder_2": T5EncoderModel(T5Config(**T5_XXL)),
                "tokenizer": tok, "tokenizer_2": gpu_sd15._tokenizer(128),
            }
    for part in parts.values():
        if isinstance(part, torch.nn.Module):
            part.eval()
    parts["scheduler"] = (FlowMatchEulerDiscreteScheduler(shift=3.0) if model == "sd35m"
                          else FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG))
    return parts


def build_backbone(model: str, with_t5: bool, tiny: bool, device: torch.device, dtype: str, steps: int,
                   guidance: float, gradient_checkpointing: bool):
    from gfnalign.backbones.flux import FluxBackbone, random_flux_components
    from gfnalign.backbones.latent_base import resolve_dtype
    from gfnalign.backbones.sd3 import SD3Backbone, random_sd3_components

    if tiny:
        parts = random_sd3_components(seed=0, with_t5=with_t5) if model == "sd35m" else random_flux_components(seed=0)
        image, rank, targets = 16, 4, LORA_TARGETS[:4]
    else:
        parts = full_components(model, with_t5, device, resolve_dtype(dtype))
        image, rank, targets = IMAGE_SIZE, 32, LORA_TARGETS
    cls = SD3Backbone if model == "sd35m" else FluxBackbone
    return cls(**parts, num_inference_steps=steps, guidance_scale=guidance, eta=MODELS[model]["eta"], dtype=dtype,
               device=device, lora_rank=rank, lora_alpha=2.0 * rank, lora_targets=list(targets),
               gradient_checkpointing=gradient_checkpointing, image_size=image, max_sequence_length=128 if not tiny else 8)


def main(argv: list[str] | None = None) -> int:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model", choices=tuple(MODELS), default="sd35m")
    pre.add_argument("--no-t5", action="store_true", help="sd35m: leave T5 out (zeros in its place)")
    known, rest = pre.parse_known_args(argv)
    m = MODELS[known.model]
    if not any(a == "--steps" or a.startswith("--steps=") for a in rest):
        rest = [*rest, "--steps", str(m["steps"])]
    builder = functools.partial(build_backbone, known.model, not known.no_t5)
    return gpu_sd15.main(rest, name=f"gpu_{known.model}", label=m["label"], builder=builder, doc=__doc__,
                         sampling={"eta": m["eta"]}, default_methods="grpo,dag-db,residual-nabla-db,ddpo,reward-backprop",
                         default_guidance=m["guidance"])


if __name__ == "__main__":
    sys.exit(main())

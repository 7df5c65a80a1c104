"""Step time and peak GPU memory per method and batch size, at SDXL size and 1024 px.

    python benchmarks/gpu_sdxl.py [--methods dag-db,...] [--batches 1,2,4] [--steps 20] [--dtype bfloat16]
                                  [--gradient-checkpointing] [--budget-gb 80] [--json benchmarks/out/gpu_sdxl.json]
    python benchmarks/gpu_sdxl.py --device cpu --tiny      # smoke mode: tiny SDXL components, runs anywhere

The loop, the reward (the LAION aesthetic predictor's compute with random weights) and the table are those
of ``gpu_sd15.py``; only the model differs. Nothing is downloaded: the components are built from the real
SDXL base 1.0 config values with random weights, so every forward/backward costs what the real model costs:

* UNet (2.57 B parameters): block_out_channels (320, 640, 1280), transformer_layers_per_block (1, 2, 10),
  attention_head_dim (5, 10, 20), cross_attention_dim 2048, ``addition_embed_type="text_time"`` with
  addition_time_embed_dim 256 (projection input 6·256 + 1280 = 2816), 128×128 latents;
* the f8 KL-VAE with (128, 256, 512, 512) at 1024 px (scaling factor 0.13025, ``force_upcast``);
* CLIP ViT-L/14 text transformer (12 × 768) and OpenCLIP bigG (32 × 1280, projection 1280), 77 tokens.

LoRA rank 4 on the UNet attention projections; frozen weights in ``--dtype``; classifier-free guidance
(``--guidance``, default 7.5: CFG doubles every UNet pass). Run it with and without
``--gradient-checkpointing`` to see what checkpointing buys (the ``sdxl-*`` presets turn it on).
Without CUDA the script exits with a message unless ``--device cpu`` is given explicitly.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_sd15  # noqa: E402

SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True, freq_shift=0,
)
SDXL_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    act_fn="silu", sample_size=1024, scaling_factor=0.13025, force_upcast=True,
)
TEXT_ENCODER = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    hidden_act="quick_gelu", projection_dim=768)
TEXT_ENCODER_2 = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                      hidden_act="gelu", projection_dim=1280)


def build_components(tiny: bool) -> dict[str, Any]:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    length = 16 if tiny else 77
    tok = gpu_sd15._tokenizer(length)
    common = dict(vocab_size=max(len(tok), 100) if tiny else 49408, max_position_embeddings=length,
                  bos_token_id=0, eos_token_id=1, pad_token_id=1)
    if tiny:
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), cross_attention_dim=64,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32, norm_num_groups=32)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            norm_num_groups=32, sample_size=32, force_upcast=True)
        te = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, projection_dim=32)
        te1, te2 = CLIPTextConfig(**common, **te), CLIPTextConfig(**common, **te)
    else:
        unet = UNet2DConditionModel(**SDXL_UNET)
        vae = AutoencoderKL(**SDXL_VAE)
        te1, te2 = CLIPTextConfig(**common, **TEXT_ENCODER), CLIPTextConfig(**common, **TEXT_ENCODER_2)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000)
    return {"unet": unet, "vae": vae, "text_encoder": CLIPTextModel(te1),
            "text_encoder_2": CLIPTextModelWithProjection(te2), "tokenizer": tok, "tokenizer_2": tok,
            "scheduler": sched}


def build_backbone(tiny: bool, device: torch.device, dtype: str, steps: int, guidance: float,
                   gradient_checkpointing: bool):
    from gfnalign.backbones.sdxl import StableDiffusionXLBackbone

    return StableDiffusionXLBackbone(
        **build_components(tiny), num_inference_steps=steps, guidance_scale=guidance, eta=1.0, dtype=dtype,
        device=device, lora_rank=4, lora_alpha=4.0, gradient_checkpointing=gradient_checkpointing,
    )


if __name__ == "__main__":
    sys.exit(gpu_sd15.main(name="gpu_sdxl", label="SDXL-size", builder=build_backbone, doc=__doc__))

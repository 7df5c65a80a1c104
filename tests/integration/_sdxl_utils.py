"""A tiny random-initialised SDXL pipeline built from configs (no downloads), for the SDXL tests.

Two CLIP text encoders of different widths (32 and 24, projection 16), so the concatenated token width
(56), the pooled width (16) and the packed conditioning width (56) are all distinct; a UNet with
``addition_embed_type="text_time"`` (SDXL's micro-conditioning); the digits world's VAE config (factor 2)
and offline BPE tokenizer (16 tokens).
"""

from __future__ import annotations

from typing import Any

import torch

WORDS = ("a", "photo", "of", "cat", "dog", "red", "blue", "car", "painting", "the", "sea", "tree")
TEXT_LEN = 16


def build_tiny_sdxl(seed: int = 0, image_size: int = 16, prediction_type: str = "epsilon") -> dict[str, Any]:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from gfnalign.backbones.digits_pretrain import build_tokenizer

    tok = build_tokenizer(WORDS, max_length=TEXT_LEN)
    tok2 = build_tokenizer(WORDS, max_length=TEXT_LEN)

    def text_config(hidden: int, layers: int) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=len(tok), hidden_size=hidden, intermediate_size=37, num_hidden_layers=layers,
            num_attention_heads=4, max_position_embeddings=TEXT_LEN, projection_dim=16, hidden_act="gelu",
            bos_token_id=0, eos_token_id=1, pad_token_id=1,
        )

    torch.manual_seed(seed)
    te = CLIPTextModel(text_config(32, 3))
    te2 = CLIPTextModelWithProjection(text_config(24, 3))
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=32, sample_size=image_size, force_upcast=True,
    )
    torch.manual_seed(seed + 2)
    unet = UNet2DConditionModel(
        sample_size=image_size // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 16, cross_attention_dim=32 + 24, norm_num_groups=32,
    )
    # the time embedding of a random UNet barely reacts to the added conditioning; scale it up so the tests
    # can see the pooled embedding and the micro-conditioning change the output
    with torch.no_grad():
        unet.add_embedding.linear_1.weight.mul_(20.0)
    sched = DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type,
    )
    return {"tokenizer": tok, "tokenizer_2": tok2, "text_encoder": te, "text_encoder_2": te2, "vae": vae,
            "unet": unet, "scheduler": sched}


def make_sdxl_pipeline(c: dict[str, Any], force_zeros_for_empty_prompt: bool = True):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(
        vae=c["vae"], text_encoder=c["text_encoder"], text_encoder_2=c["text_encoder_2"], tokenizer=c["tokenizer"],
        tokenizer_2=c["tokenizer_2"], unet=c["unet"], scheduler=c["scheduler"],
        force_zeros_for_empty_prompt=force_zeros_for_empty_prompt, add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe

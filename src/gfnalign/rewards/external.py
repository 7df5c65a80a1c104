"""Rewards that live in their own packages, as optional extras: ImageReward and HPSv2.

Neither package is part of the default install (both pull torchvision, which must not sit next to a CPU torch
in this project's environment); requesting one of these rewards without its package raises
:class:`~gfnalign.rewards.base.MissingDependencyError` with the pip command. Both score through the packages'
own networks but with our torch preprocessing, so gradients reach the images (the "differentiable path").

These wrappers follow the packages' published code (ImageReward v1.0's BLIP + MLP with its standardisation;
HPSv2's OpenCLIP ViT-H-14 cosine score). They are not exercised by this repository's tests, which never
install the packages or download their weights.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from gfnalign.rewards.base import Reward, missing_dependency
from gfnalign.rewards.clip import CLIP_MEAN, CLIP_STD, clip_preprocess


class ImageRewardReward(Reward):
    """ImageReward v1.0: ``(mlp(BLIP(image, prompt)[CLS]) - 0.16717) / 1.03334`` (the package's standardisation).

    ``max_length`` is the BLIP tokenizer length (35 in ImageReward's own scoring; the DAG code pads to ≈512).
    """

    name = "imagereward"
    differentiable = True
    inputs = "image+prompt"

    def __init__(
        self, *, model: str = "ImageReward-v1.0", download_root: str | None = None, max_length: int = 35, device=None
    ):
        super().__init__(device)
        try:
            import ImageReward as RM  # noqa: N813 - the package's own name
        except ImportError as err:
            raise missing_dependency(self.name, "ImageReward", "image-reward", err) from err
        self.model = RM.load(model, device="cpu", download_root=download_root)
        self.max_length = int(max_length)
        self.freeze()

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        blip = self.model.blip
        pixels = clip_preprocess(images, 224, CLIP_MEAN, CLIP_STD)
        tokens = blip.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        image_embeds = blip.visual_encoder(pixels)
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=images.device)
        out = blip.text_encoder(
            tokens["input_ids"].to(images.device),
            attention_mask=tokens["attention_mask"].to(images.device),
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts,
            return_dict=True,
        )
        raw = self.model.mlp(out.last_hidden_state[:, 0, :].float()).squeeze(-1)
        return ((raw - self.model.mean) / self.model.std).float()


_HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}


def hps_preprocess(images: torch.Tensor, size: int = 224) -> torch.Tensor:
    """HPSv2's evaluation transform in torch: longest side -> ``size`` (bicubic), zero-pad to a square, normalise."""
    n, c, h, w = images.shape
    scale = size / max(h, w)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    if (new_h, new_w) != (h, w):
        shrink = new_h < h or new_w < w
        images = F.interpolate(images, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=shrink)
        images = images.clamp(0.0, 1.0)
    pad_h, pad_w = size - new_h, size - new_w
    if pad_h or pad_w:
        images = F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)
    mean = torch.tensor(CLIP_MEAN, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean) / std


class HPSv2Reward(Reward):
    """HPSv2 / HPSv2.1: cosine of OpenCLIP ViT-H-14 image and text features (no logit scale), ≈ 0.2-0.35."""

    name = "hpsv2"
    differentiable = True
    inputs = "image+prompt"

    def __init__(self, *, version: str = "v2.1", checkpoint: str | None = None, device=None):
        super().__init__(device)
        if version not in _HPS_FILES:
            raise ValueError(f"hpsv2 reward: version must be one of {sorted(_HPS_FILES)}, got {version!r}")
        try:
            from hpsv2.src.open_clip import create_model_and_transforms, get_tokenizer
        except ImportError as err:
            raise missing_dependency(self.name, "hpsv2", "hpsv2", err) from err
        if checkpoint is None:
            from huggingface_hub import hf_hub_download

            checkpoint = hf_hub_download("xswu/HPSv2", _HPS_FILES[version])
        if not os.path.isfile(checkpoint):
            raise FileNotFoundError(
                f"hpsv2 reward: checkpoint not found at {checkpoint!r}; pass checkpoint= a local "
                f"{_HPS_FILES[version]} (from the xswu/HPSv2 hub repository)"
            )
        model, _, _ = create_model_and_transforms(
            "ViT-H-14", None, precision="fp32", device="cpu", jit=False, force_quick_gelu=False,
            force_custom_text=False, force_patch_dropout=False, force_image_size=None, pretrained_image=False,
            image_mean=None, image_std=None, light_augmentation=True, aug_cfg={}, output_dict=True,
            with_score_predictor=False, with_region_predictor=False,
        )
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("state_dict", state))
        self.model = model
        self.tokenizer = get_tokenizer("ViT-H-14")
        self.freeze()

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        pixels = hps_preprocess(images, 224)
        image_features = self.model.encode_image(pixels, normalize=True)
        text = self.tokenizer(prompts).to(images.device)
        with torch.no_grad():
            text_features = self.model.encode_text(text, normalize=True)
        return (image_features * text_features).sum(-1).float()

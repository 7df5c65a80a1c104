"""CLIP-based rewards: the LAION aesthetic predictor, PickScore and CLIP score (transformers, differentiable).

Preprocessing is done in torch so gradients reach the images: bicubic resize of the shortest side to the
model's input size (anti-aliased when shrinking), centre crop, CLIP mean/std normalisation — the same steps
as ``CLIPImageProcessor`` without its uint8 round trip.

Models load with transformers from a local folder or a hub id (hub ids need network; with HF_HUB_OFFLINE=1
only the local cache is used). A model object can be passed instead of a path (tests use tiny random CLIPs).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from gfnalign.rewards.base import Reward

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# --------------------------------------------------------------------------------------------------------------
# preprocessing and loading


def clip_preprocess(
    images: torch.Tensor,
    size: int = 224,
    mean: tuple[float, ...] = CLIP_MEAN,
    std: tuple[float, ...] = CLIP_STD,
) -> torch.Tensor:
    """[N,3,H,W] in [0,1] -> [N,3,size,size] CLIP input; differentiable.

    Shortest side -> ``size`` (bicubic, anti-aliased when shrinking, clamped to [0,1] like the uint8 path),
    centre crop to ``size``×``size``, then ``(x - mean) / std`` per channel.
    """
    n, c, h, w = images.shape
    # like transformers: the short side becomes `size`, the long side int(size * long / short) (floored)
    if h <= w:
        new_h, new_w = size, max(size, int(size * w / h))
    else:
        new_h, new_w = max(size, int(size * h / w)), size
    if (new_h, new_w) != (h, w):
        shrink = new_h < h or new_w < w
        images = F.interpolate(images, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=shrink)
        images = images.clamp(0.0, 1.0)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    images = images[:, :, top : top + size, left : left + size]
    mean_t = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean_t) / std_t


def _looks_local(source: str) -> bool:
    """A hub id is "owner/name"; anything else (./x, /x, ~/x, a/b/c) is meant as a local path."""
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' load report (a CLIPModel checkpoint read as vision-only lists every text key)."""
    from transformers.utils import logging as hf_logging

    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


def load_pretrained(cls: Any, source: Any, what: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained(source)`` with an error that names the path or hub id and the fix."""
    if not isinstance(source, (str, os.PathLike)):
        return source  # already a model / tokenizer object
    source = str(source)
    path = Path(source).expanduser()
    if _looks_local(source) and not path.exists():
        raise FileNotFoundError(f"{what}: no such local path {str(path)!r}; pass an existing folder or a hub id")
    try:
        with _quiet_transformers():
            return cls.from_pretrained(str(path) if path.exists() else source, **kwargs)
    except (OSError, ValueError) as err:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise OSError(
            f"{what}: could not load {source!r} with {cls.__name__}.from_pretrained ({err}). "
            "Pass a local folder (config.json + weights) or a hub id"
            + (" that is already in the local cache (HF_HUB_OFFLINE=1 is set)" if offline else "")
        ) from err


def load_clip_vision(source: Any, what: str) -> torch.nn.Module:
    """CLIPVisionModelWithProjection from a vision-only or a full CLIPModel checkpoint (text tower skipped).

    A full checkpoint keeps ``projection_dim`` at the top level of its config; it is carried over to the
    vision config so the projection loads with the right shape.
    """
    if not isinstance(source, (str, os.PathLike)):
        return source
    from transformers import AutoConfig, CLIPConfig, CLIPVisionModelWithProjection

    config = load_pretrained(AutoConfig, source, what)
    kwargs: dict[str, Any] = {}
    if isinstance(config, CLIPConfig):
        vision_config = config.vision_config
        vision_config.projection_dim = config.projection_dim
        kwargs["config"] = vision_config
    return load_pretrained(CLIPVisionModelWithProjection, source, what, **kwargs)


def image_stats_from_folder(source: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """CLIP mean/std from a local ``preprocessor_config.json`` when there is one, else the OpenAI CLIP values."""
    if isinstance(source, (str, os.PathLike)):
        cfg = Path(source).expanduser() / "preprocessor_config.json"
        if cfg.is_file():
            data = json.loads(cfg.read_text())
            return tuple(data.get("image_mean", CLIP_MEAN)), tuple(data.get("image_std", CLIP_STD))
    return CLIP_MEAN, CLIP_STD


def _vision_image_size(model: torch.nn.Module) -> int:
    config = model.config
    config = getattr(config, "vision_config", config)
    return int(config.image_size)


def clip_image_embeds(model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Projected, L2-normalised image embeddings of a CLIPModel or CLIPVisionModelWithProjection."""
    pooled = model.vision_model(pixel_values=pixel_values).pooler_output
    embeds = model.visual_projection(pooled)
    return embeds / embeds.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def clip_text_embeds(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Projected, L2-normalised text embeddings of a CLIPModel."""
    pooled = model.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
    embeds = model.text_projection(pooled)
    return embeds / embeds.norm(dim=-1, keepdim=True).clamp_min(1e-12)


# --------------------------------------------------------------------------------------------------------------
# LAION aesthetic predictor v2


class AestheticHead(torch.nn.Module):
    """768→1024→128→64→16→1, linear layers only (dropouts at 1, 3, 5 are inactive in eval).

    Parameter names match the released ``sac+logos+ava1-l14-linearMSE.pth``: ``layers.{0,2,4,6,7}.{weight,bias}``.
    """

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.input_size = input_size
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(input_size, 1024),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64),
            torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1),
        )

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.layers(embeds)


def load_aesthetic_head(path: str | os.PathLike) -> AestheticHead:
    """Load the head from a ``.pth`` (loaded with ``weights_only=True``, never unpickling code) or ``.safetensors``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"aesthetic head weights not found at {str(path)!r}; download sac+logos+ava1-l14-linearMSE.pth from "
            "the LAION improved-aesthetic-predictor repository and pass head_path=... (or set GFNALIGN_AESTHETIC_HEAD)"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"aesthetic head {str(path)!r}: expected a state dict, got {type(state).__name__}")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if not any(k.startswith("layers.") for k in state):
        state = {f"layers.{k}": v for k, v in state.items()}
    expected = {f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")}
    if set(state) != expected:
        raise ValueError(
            f"aesthetic head {str(path)!r}: keys {sorted(state)} do not match the LAION head "
            f"{sorted(expected)} (missing {sorted(expected - set(state))}, unexpected {sorted(set(state) - expected)})"
        )
    head = AestheticHead(int(state["layers.0.weight"].shape[1]))
    head.load_state_dict({k: v.float() for k, v in state.items()})
    return head


class AestheticReward(Reward):
    """LAION aesthetic score (≈ 1..10) of each image; the prompt is ignored. Differentiable in the image."""

    name = "aesthetic"
    differentiable = True
    inputs = "image"

    def __init__(
        self,
        *,
        clip_model: Any = "openai/clip-vit-large-patch14",
        head_path: str | os.PathLike | None = None,
        head: AestheticHead | None = None,
        image_mean: tuple[float, ...] | None = None,
        image_std: tuple[float, ...] | None = None,
        device=None,
    ):
        super().__init__(device)
        if head is None:
            head_path = head_path or os.environ.get("GFNALIGN_AESTHETIC_HEAD")
            if not head_path:
                raise ValueError(
                    "aesthetic reward: head_path is required (the LAION sac+logos+ava1-l14-linearMSE.pth file); "
                    "pass head_path=... or set GFNALIGN_AESTHETIC_HEAD"
                )
            head = load_aesthetic_head(head_path)
        self.clip = load_clip_vision(clip_model, "aesthetic reward clip_model")
        self.head = head
        embed_dim = int(self.clip.visual_projection.out_features)
        if embed_dim != head.input_size:
            raise ValueError(
                f"aesthetic reward: the CLIP model's image embeddings have {embed_dim} dims but the head expects "
                f"{head.input_size}; the LAION head needs CLIP ViT-L/14 (openai/clip-vit-large-patch14)"
            )
        mean, std = image_stats_from_folder(clip_model)
        self.image_mean = tuple(image_mean or mean)
        self.image_std = tuple(image_std or std)
        self.image_size = _vision_image_size(self.clip)
        self.freeze()

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        pixels = clip_preprocess(images, self.image_size, self.image_mean, self.image_std)
        return clip_image_embeds(self.clip, pixels)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.head(self.embed(images)).squeeze(-1).float()


# --------------------------------------------------------------------------------------------------------------
# image-text similarity: PickScore and CLIP score


class _ClipSimilarity(Reward):
    """``scale * cos(image_embed, text_embed)`` with a CLIPModel; text embeddings are cached per prompt."""

    differentiable = True
    inputs = "image+prompt"
    cache_size = 4096

    def __init__(self, *, model: Any, processor: Any, tokenizer: Any, image_mean, image_std, device):
        super().__init__(device)
        from transformers import AutoTokenizer, CLIPModel

        self.model = load_pretrained(CLIPModel, model, f"{self.name} reward model")
        tok_source = tokenizer if tokenizer is not None else (processor if processor is not None else model)
        self.tokenizer = load_pretrained(AutoTokenizer, tok_source, f"{self.name} reward tokenizer/processor")
        mean, std = image_stats_from_folder(processor if processor is not None else model)
        self.image_mean = tuple(image_mean or mean)
        self.image_std = tuple(image_std or std)
        self.image_size = _vision_image_size(self.model)
        text_cfg = getattr(self.model.config, "text_config", None)
        limit = int(getattr(text_cfg, "max_position_embeddings", 77))
        tok_limit = getattr(self.tokenizer, "model_max_length", limit) or limit
        self.max_length = int(min(limit, tok_limit))
        self._text_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.freeze()

    def text_embeds(self, prompts: list[str], device: torch.device) -> torch.Tensor:
        missing = list(dict.fromkeys(p for p in prompts if p not in self._text_cache))
        if missing:
            tokens = self.tokenizer(
                missing, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
            with torch.no_grad():
                embeds = clip_text_embeds(
                    self.model, tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
                )
            for p, e in zip(missing, embeds):
                self._text_cache[p] = e
            while len(self._text_cache) > self.cache_size:
                self._text_cache.popitem(last=False)
        return torch.stack([self._text_cache[p].to(device) for p in prompts])

    def to(self, device):
        self._text_cache.clear()
        return super().to(device)

    def _target_device(self, images):
        before = self._placed_on
        device = super()._target_device(images)
        if before != device:
            self._text_cache.clear()
        return device

    def logit_scale(self) -> torch.Tensor:
        raise NotImplementedError

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        pixels = clip_preprocess(images, self.image_size, self.image_mean, self.image_std)
        image_embeds = clip_image_embeds(self.model, pixels)
        text_embeds = self.text_embeds(prompts, images.device)
        return (self.logit_scale() * (image_embeds * text_embeds).sum(-1)).float()


class PickScoreReward(_ClipSimilarity):
    """PickScore (Kirstain et al. 2023): ``exp(logit_scale) * cos``, ≈ 18-23 for real images."""

    name = "pickscore"

    def __init__(
        self,
        *,
        model: Any = "yuvalkirstain/PickScore_v1",
        processor: Any = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        tokenizer: Any = None,
        image_mean=None,
        image_std=None,
        device=None,
    ):
        super().__init__(
            model=model, processor=processor, tokenizer=tokenizer, image_mean=image_mean, image_std=image_std,
            device=device,
        )

    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp()


class ClipScoreReward(_ClipSimilarity):
    """``scale * cos(image, text)`` (scale 100 as in the usual CLIPScore metric, without its clamp at 0)."""

    name = "clip-score"

    def __init__(
        self,
        *,
        model: Any = "openai/clip-vit-large-patch14",
        processor: Any = None,
        tokenizer: Any = None,
        scale: float = 100.0,
        image_mean=None,
        image_std=None,
        device=None,
    ):
        self.scale = float(scale)
        super().__init__(
            model=model, processor=processor, tokenizer=tokenizer, image_mean=image_mean, image_std=image_std,
            device=device,
        )

    def logit_scale(self) -> float:
        return self.scale

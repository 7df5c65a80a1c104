"""Feature extractors for the diversity and prior-drift metrics (and the CLIP score).

Every extractor maps images ``[N, 3, H, W]`` float in [0, 1] to features ``[N, d]`` (float32, no grad)
and names the distance its features are meant for (``metric``):

| spec                   | features                                                           | metric  |
|------------------------|--------------------------------------------------------------------|---------|
| ``digits``             | the shipped digit classifier's penultimate layer (128-d)           | l2      |
| ``clip:PATH``          | CLIP image embeddings from a local transformers folder (L2-normed) | cosine  |
| ``dreamsim[:CACHE]``   | DreamSim embeddings (needs the optional ``dreamsim`` package and its weights in CACHE) | cosine |
| ``pixels[:S]``         | grey image average-pooled to S×S (default 8), flattened            | l2      |

``pixels`` is a weak fallback (and what tests use with random-init models); results in different feature
spaces are not comparable. Heavy imports (transformers, dreamsim) happen only when an extractor is built.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

FEATURE_KINDS = ("digits", "clip", "dreamsim", "pixels")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _check_images(images: torch.Tensor, who: str) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{who}: images must be a float tensor [N, 3, H, W] in [0, 1], got {shape}")


class FeatureExtractor:
    """Base class: ``__call__(images) -> [N, d]`` in batches of ``batch_size``, under ``no_grad``."""

    name = "features"
    metric = "l2"
    batch_size = 256

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images, f"features '{self.name}'")
        out = [self.embed(images[i : i + self.batch_size]).float().cpu() for i in range(0, images.shape[0], self.batch_size)]
        return torch.cat(out).flatten(1)

    def describe(self) -> str:
        return self.name


class PixelFeatures(FeatureExtractor):
    """Grey image average-pooled to ``size × size``: a model-free fallback."""

    metric = "l2"

    def __init__(self, size: int = 8):
        if size < 1:
            raise ValueError(f"pixels feature size={size} must be >= 1")
        self.size = int(size)
        self.name = f"pixels:{self.size}"

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(images.float().mean(1, keepdim=True), self.size)


class DigitFeatures(FeatureExtractor):
    """Penultimate features of the digits world's classifier (``DigitClassifier.features``)."""

    name = "digits"
    metric = "l2"

    def __init__(self, classifier: Any = None, path: str | Path | None = None, device: str | torch.device = "cpu"):
        if classifier is None:
            from gfnalign.backbones.digits import load_digit_classifier

            classifier = load_digit_classifier(path, device=device)
        self.classifier = classifier.eval()

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images)


class ClipFeatures(FeatureExtractor):
    """CLIP image (and text, for the CLIP score) embeddings from a local transformers folder.

    ``path`` holds a ``CLIPModel`` (``config.json`` + weights, and a tokenizer for :meth:`text_features`).
    Images are resized bicubically to the model's image size and normalised with CLIP's mean/std.
    """

    metric = "cosine"
    batch_size = 64

    def __init__(self, path: str | Path, device: str | torch.device = "cpu"):
        p = Path(path)
        if not (p / "config.json").is_file():
            raise FileNotFoundError(
                f"CLIP features: no config.json in {p}; pass features=clip:PATH with a local folder written by "
                "transformers' CLIPModel.save_pretrained (no weights are downloaded)"
            )
        from transformers import CLIPModel

        self.model = CLIPModel.from_pretrained(str(p)).to(device).eval().requires_grad_(False)
        self.device = torch.device(device)
        self.path = p
        self.name = f"clip:{p}"
        self.image_size = int(self.model.config.vision_config.image_size)
        self._tokenizer = None

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, torch.float32).clamp(0, 1)
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False)
        mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
        out = self.model.get_image_features(pixel_values=(x - mean) / std)
        out = getattr(out, "pooler_output", out)  # transformers 5 may return a model output
        return F.normalize(out, dim=-1)

    @torch.no_grad()
    def text_features(self, prompts: list[str]) -> torch.Tensor:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            try:
                self._tokenizer = AutoTokenizer.from_pretrained(str(self.path))
            except Exception as err:  # noqa: BLE001 - any failure means: no tokenizer here
                raise FileNotFoundError(f"CLIP score: no tokenizer in {self.path} ({err})") from err
        tok = self._tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt").to(self.device)
        out = self.model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
        out = getattr(out, "pooler_output", out)
        return F.normalize(out, dim=-1).float().cpu()


class DreamSimFeatures(FeatureExtractor):
    """DreamSim embeddings (optional ``dreamsim`` package; weights must already be in ``cache_dir``)."""

    metric = "cosine"
    batch_size = 32

    def __init__(self, cache_dir: str | Path | None = None, device: str | torch.device = "cpu"):
        try:
            from dreamsim import dreamsim
        except ImportError as err:
            raise ImportError(
                "features=dreamsim needs the optional 'dreamsim' package (pip install dreamsim) and its weights "
                "in a local cache; use features=digits, clip:PATH or pixels instead"
            ) from err
        kwargs = {"pretrained": True, "device": str(device)}
        if cache_dir is not None:
            kwargs["cache_dir"] = str(cache_dir)
        self.model, _ = dreamsim(**kwargs)
        self.device = torch.device(device)
        self.name = "dreamsim"

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images.to(self.device, torch.float32).clamp(0, 1), size=(224, 224), mode="bicubic")
        return self.model.embed(x)


def dreamsim_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("dreamsim") is not None


def build_features(spec: str | Mapping[str, Any] | FeatureExtractor, *, device: str | torch.device = "cpu") -> FeatureExtractor:
    """Build an extractor from ``"digits"``, ``"clip:PATH"``, ``"dreamsim[:CACHE]"``, ``"pixels[:S]"``
    or a mapping ``{"type": ..., "path": ..., "size": ...}``."""
    if isinstance(spec, FeatureExtractor):
        return spec
    if isinstance(spec, Mapping):
        kind, arg = str(spec.get("type", "")), spec.get("path", spec.get("size"))
    elif isinstance(spec, str):
        kind, _, arg = spec.partition(":")
        arg = arg or None
    else:
        raise TypeError(f"features={spec!r} must be a string like 'digits' or 'clip:/path', or a mapping")
    if kind == "digits":
        return DigitFeatures(path=arg, device=device)
    if kind == "clip":
        if not arg:
            raise ValueError("features='clip' needs a local folder: features=clip:/path/to/clip-vit-large-patch14")
        return ClipFeatures(arg, device=device)
    if kind == "dreamsim":
        return DreamSimFeatures(arg, device=device)
    if kind == "pixels":
        try:
            return PixelFeatures(int(arg) if arg else 8)
        except ValueError as err:
            raise ValueError(f"features={spec!r}: pixels:S needs an integer size S, e.g. pixels:8") from err
    raise ValueError(f"features={spec!r} is not known; use one of {', '.join(FEATURE_KINDS)} (e.g. 'clip:PATH')")

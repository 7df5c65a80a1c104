"""gfnalign.backbones: the only layer that imports diffusers/peft.

* :mod:`gfnalign.backbones.latent_base`: :class:`LatentDiffusionBackbone`, the base every diffusers
  latent-diffusion family shares (guided ε, decode, LoRA via peft, checkpoints, heads).
* :mod:`gfnalign.backbones.sd`: :class:`StableDiffusionBackbone` (SD 1.x/2.x conditioning).
* :mod:`gfnalign.backbones.sdxl`: :class:`StableDiffusionXLBackbone` (two text encoders, pooled embedding,
  micro-conditioning); :mod:`gfnalign.backbones.families` picks the class for a pipeline folder.
* :mod:`gfnalign.backbones.sd3`: :class:`SD3Backbone` (SD3/SD3.5, rectified flow, velocity policy).
* :mod:`gfnalign.backbones.flux`: :class:`FluxBackbone` (FLUX.1: packed latents, guidance embedding, shift mu).
* :mod:`gfnalign.backbones.digits`: the shipped tiny digits world (prompts, classifier, loaders).

Names are imported lazily so ``import gfnalign.backbones`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "StableDiffusionBackbone": "gfnalign.backbones.sd",
    "StableDiffusionXLBackbone": "gfnalign.backbones.sdxl",
    "SD3Backbone": "gfnalign.backbones.sd3",
    "FluxBackbone": "gfnalign.backbones.flux",
    "LatentDiffusionBackbone": "gfnalign.backbones.latent_base",
    "LogFlowHead": "gfnalign.backbones.latent_heads",
    "FlowScoreHead": "gfnalign.backbones.latent_heads",
    "DigitClassifier": "gfnalign.backbones.digits",
    "load_digits_backbone": "gfnalign.backbones.digits",
    "load_digit_classifier": "gfnalign.backbones.digits",
    "DIGIT_PROMPTS": "gfnalign.backbones.digits",
    "digit_prompt": "gfnalign.backbones.digits",
    "prompt_to_digit": "gfnalign.backbones.digits",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'gfnalign.backbones' has no attribute {name!r}")

"""gfnalign.backbones: the only layer that imports diffusers/peft.

* :mod:`gfnalign.backbones.sd`: :class:`StableDiffusionBackbone` (PolicyModel over diffusers, LoRA via peft).
* :mod:`gfnalign.backbones.digits`: the shipped tiny digits world (prompts, classifier, loaders).

Names are imported lazily so ``import gfnalign.backbones`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "StableDiffusionBackbone": "gfnalign.backbones.sd",
    "LogFlowHead": "gfnalign.backbones.sd",
    "FlowScoreHead": "gfnalign.backbones.sd",
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

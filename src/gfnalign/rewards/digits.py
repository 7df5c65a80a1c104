"""Rewards of the tiny digits world (offline, no downloads, differentiable).

* ``digit-alignment``: ``log p(d | image)`` where ``d`` is the digit the prompt names, under the digits
  world's shipped CNN classifier (:func:`gfnalign.backbones.digits.load_digit_classifier`). At most 0.
* ``digit-preference``: ``sum_c v_c p(c | image)``, the classifier's expected preference value (bounded in
  ``[min v, max v]``, so the pretrained model's samples weighted by ``exp(beta * r)`` estimate the tilted target
  with a bounded importance weight). The default ``values`` prefer even digits (1 for 0, 2, 4, 6, 8; 0 else).
  It tilts *across* classes, for prompts that leave the digit open (the ``digits-open`` prompt set).
* ``ink``: the stroke mass. Digits are bright ink on a dark background, so ink = mean grey level in [0,1].
  With no ``target`` the reward is the plain mean ink (more ink = more reward); with ``target=t`` it is
  ``-((ink - t) / scale)**2`` (peak 0 at ink = t).
"""

from __future__ import annotations

from typing import Any

import torch

from gfnalign.rewards.base import Reward


class DigitAlignmentReward(Reward):
    name = "digit-alignment"
    differentiable = True
    inputs = "image+prompt"

    def __init__(self, *, classifier_path: str | None = None, classifier: Any = None, device=None):
        super().__init__(device)
        from gfnalign.backbones.digits import load_digit_classifier, prompt_to_digit

        self._prompt_to_digit = prompt_to_digit
        self.classifier = classifier if classifier is not None else load_digit_classifier(classifier_path)
        self.freeze()

    def digits(self, prompts: list[str]) -> torch.Tensor:
        out = []
        for i, p in enumerate(prompts):
            try:
                out.append(int(self._prompt_to_digit(p)))
            except ValueError as err:
                raise ValueError(f"reward 'digit-alignment': prompts[{i}]: {err}") from None
        return torch.tensor(out, dtype=torch.int64)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        target = self.digits(prompts).to(images.device)
        log_probs = torch.log_softmax(self.classifier(images).float(), dim=-1)
        return log_probs.gather(1, target[:, None]).squeeze(1)


class DigitPreferenceReward(Reward):
    name = "digit-preference"
    differentiable = True
    inputs = "image"

    #: The default preference: even digits 1, odd digits 0.
    EVEN_DIGITS = (1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0)

    def __init__(self, *, values: Any = None, classifier_path: str | None = None, classifier: Any = None, device=None):
        super().__init__(device)
        import math

        from gfnalign.backbones.digits import load_digit_classifier

        values = self.EVEN_DIGITS if values is None else values
        if (
            isinstance(values, (str, bytes))
            or not hasattr(values, "__len__")
            or len(values) != 10
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
        ):
            raise ValueError(
                f"digit-preference reward: values must be 10 finite numbers (one per digit 0-9), got {values!r}; "
                "e.g. values: [1, 0, 1, 0, 1, 0, 1, 0, 1, 0] prefers even digits"
            )
        self.values = torch.tensor([float(v) for v in values], dtype=torch.float32)
        self.classifier = classifier if classifier is not None else load_digit_classifier(classifier_path)
        self.freeze()

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        probs = torch.softmax(self.classifier(images).float(), dim=-1)
        return probs @ self.values.to(probs.device)


class InkReward(Reward):
    name = "ink"
    differentiable = True
    inputs = "image"

    def __init__(self, *, target: float | None = None, scale: float = 1.0, polarity: str = "bright", device=None):
        super().__init__(device)
        if target is not None and not (isinstance(target, (int, float)) and 0.0 <= target <= 1.0):
            raise ValueError(f"ink reward: target must be a mean ink level in [0, 1] or None, got {target!r}")
        if not (isinstance(scale, (int, float)) and scale > 0):
            raise ValueError(f"ink reward: scale must be a positive number, got {scale!r}")
        if polarity not in ("bright", "dark"):
            raise ValueError(
                f"ink reward: polarity must be 'bright' (light strokes on dark, the digits world) or 'dark', "
                f"got {polarity!r}"
            )
        self.target = None if target is None else float(target)
        self.scale = float(scale)
        self.polarity = polarity

    def ink(self, images: torch.Tensor) -> torch.Tensor:
        grey = images.mean(dim=1)
        if self.polarity == "dark":
            grey = 1.0 - grey
        return grey.flatten(1).mean(1)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        ink = self.ink(images)
        if self.target is None:
            return ink
        return -(((ink - self.target) / self.scale) ** 2)

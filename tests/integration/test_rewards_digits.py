"""digit-alignment with the shipped digits classifier (skips until the digits assets exist)."""

from __future__ import annotations

import math

import pytest
import torch

from gfnalign.rewards import build_reward


def test_shipped_classifier_rewards_the_right_digit():
    digits = pytest.importorskip("gfnalign.backbones.digits")
    weights = getattr(digits, "CLASSIFIER_DIR", None)
    if weights is None or not (weights / "model.safetensors").is_file():
        pytest.skip("the shipped digit classifier is not built yet")
    images, labels = digits.load_digits_images()
    idx = torch.arange(0, len(labels), 9)[:200]
    images, labels = images[idx], labels[idx]
    reward = build_reward("digit-alignment")
    right = reward(images, [digits.DIGIT_PROMPTS[int(k)] for k in labels])
    wrong = reward(images, [digits.DIGIT_PROMPTS[(int(k) + 1) % 10] for k in labels])
    assert right.shape == (len(idx),) and right.dtype == torch.float32
    # a classifier that is right on real digits gives the prompted digit most of the probability mass
    assert right.mean() > math.log(0.5) and (right > wrong).float().mean() > 0.9
    x = images[:8].clone().requires_grad_(True)
    reward(x, [digits.DIGIT_PROMPTS[int(k)] for k in labels[:8]]).sum().backward()
    assert x.grad.abs().sum() > 0

"""The shipped tiny digits world: prompts, the pipeline (plain diffusers, offline) and the classifier."""

from __future__ import annotations

import json
import time

import pytest
import torch

from gfnalign.backbones.digits import (
    ASSET_DIR,
    CLASSIFIER_DIR,
    DIGIT_PROMPTS,
    DIGIT_TEMPLATES,
    PIPELINE_DIR,
    DigitClassifier,
    all_digit_prompts,
    digit_prompt,
    load_digit_classifier,
    load_digits_images,
    prompt_to_digit,
)


def test_prompt_helpers_round_trip():
    assert DIGIT_PROMPTS[7] == "a handwritten digit seven" and len(DIGIT_PROMPTS) == 10
    assert digit_prompt(7, 1) == "a handwritten digit 7"
    pairs = all_digit_prompts()
    assert len(pairs) == 10 * len(DIGIT_TEMPLATES) and len({p for p, _ in pairs}) == len(pairs)
    assert all(prompt_to_digit(p) == k for p, k in pairs)
    assert prompt_to_digit("The Number SEVEN, written by hand") == 7
    with pytest.raises(ValueError, match="names no digit"):
        prompt_to_digit("a cat")
    with pytest.raises(ValueError, match=r"several digits \[3, 7\]"):
        prompt_to_digit("seven or 3")
    with pytest.raises(TypeError):
        prompt_to_digit(7)
    with pytest.raises(ValueError, match="0..9"):
        digit_prompt(10)


def test_shipped_pipeline_loads_offline_fast_with_plain_diffusers_and_samples():
    from diffusers import StableDiffusionPipeline

    files = [p for p in PIPELINE_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 20e6  # a few MB
    t0 = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(PIPELINE_DIR, safety_checker=None, requires_safety_checker=False)
    load_s = time.perf_counter() - t0
    assert load_s < 5.0, f"loading the shipped pipeline took {load_s:.1f}s"
    pipe.set_progress_bar_config(disable=True)
    out = pipe(list(DIGIT_PROMPTS[:2]), num_inference_steps=3, guidance_scale=3.0,
               generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all()


def test_shipped_classifier_is_accurate_and_has_features():
    clf = load_digit_classifier()
    cfg = json.loads((CLASSIFIER_DIR / "config.json").read_text())
    assert cfg["heldout_accuracy"] >= 0.95
    images, labels = load_digits_images()
    with torch.no_grad():
        lp = clf.log_probs(images)
        feats = clf.features(images[:5])
        lp32 = clf.log_probs(torch.nn.functional.interpolate(images[:50], size=32, mode="bilinear"))
    assert (lp.argmax(-1) == labels).float().mean() >= 0.97  # mostly training data; held-out is in config
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(len(lp)))
    assert feats.shape == (5, cfg["hidden"])
    assert (lp32.argmax(-1) == labels[:50]).float().mean() >= 0.9  # other sizes are resized
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        clf.log_probs(images[0])
    with pytest.raises(ValueError, match="float"):
        clf.log_probs((images[:2] * 255).to(torch.uint8))


def test_missing_assets_name_the_path(tmp_path):
    from gfnalign.backbones.digits import load_digits_backbone

    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_digit_classifier(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_digits_backbone(tmp_path / "nowhere")


@pytest.mark.slow
def test_digits_backbone_samples_prompted_digits_when_guided():
    from gfnalign.backbones.digits import load_digits_backbone
    from gfnalign.core.kernels import forward_kernel

    b = load_digits_backbone(num_inference_steps=10, guidance_scale=3.0, eta=1.0)
    assert b.latent_shape == (4, 8, 8) and b.image_size == 16 and b.guidance_scale == 3.0
    digits = torch.arange(10).repeat(2)
    cond = b.encode_prompts([DIGIT_PROMPTS[int(k)] for k in digits])
    g = torch.Generator().manual_seed(0)
    x = b.initial_noise(len(digits), g)
    with torch.no_grad():
        for k in range(b.schedule.num_steps):
            t, _, a, an = b.schedule.at_steps(torch.full((len(x),), k))
            x = forward_kernel(x, b.eps(x, t, cond), a, an, eta=1.0).sample(torch.randn(x.shape, generator=g))
        images = b.decode(x)
        pred = load_digit_classifier().log_probs(images).argmax(-1)
    assert images.shape == (20, 3, 16, 16)
    acc = (pred == digits).float().mean().item()
    assert acc >= 0.7, f"guided samples of the shipped model are classified correctly only {acc:.0%} of the time"


def test_asset_folder_has_card_and_report():
    assert (ASSET_DIR / "README.md").is_file()
    report = json.loads((ASSET_DIR / "train_report.json").read_text())
    assert report["final"]["acc_guidance3"] >= 0.9 and report["final"]["acc_guidance1"] <= 0.85
    assert isinstance(DigitClassifier(), torch.nn.Module)

"""The image-world benchmark on the shipped digits pipeline (untrained adapters, a few hundred draws)."""

import pytest
import torch

pytest.importorskip("diffusers")


@pytest.mark.slow
def test_measure_tilt_on_the_digits_world():
    from gfnalign.backbones.digits import load_digit_classifier, load_digits_backbone
    from gfnalign.evaluation.tilt import measure_tilt
    from gfnalign.rewards import build_reward

    torch.manual_seed(0)
    backbone = load_digits_backbone(num_inference_steps=8)
    reward, classifier = build_reward("digit-preference"), load_digit_classifier()
    flat = measure_tilt(backbone, ["a handwritten digit"], reward, 0.0, classifier, target_samples=64, samples=32,
                        n_boot=50)
    t = flat["per_prompt"]["a handwritten digit"]["target"]
    # beta = 0: the target is the pretrained sampler itself, every draw weighs the same
    assert t["ess"] == pytest.approx(64.0)
    assert t["masses"] == pytest.approx(t["pretrained_masses"])
    tilted = measure_tilt(backbone, ["a handwritten digit"], reward, 3.0, classifier, target_samples=64, samples=32,
                          n_boot=50)
    t3 = tilted["per_prompt"]["a handwritten digit"]["target"]
    assert t3["ess"] < 64.0
    # the tilt moves mass to the preferred (even) digits and raises the expected reward
    even = sum(t3["masses"][c] for c in (0, 2, 4, 6, 8))
    assert even > sum(t3["pretrained_masses"][c] for c in (0, 2, 4, 6, 8))
    assert t3["reward_mean"] > t3["pretrained_reward_mean"]
    assert 0.0 <= tilted["mean"]["finetuned_tv"] <= 1.0

"""evaluate_backbone on a fake analytic backbone: same-noise pairing, keys, per-prompt details, report."""

import pytest
import torch

from gfnalign.core.schedule import NoiseSchedule
from gfnalign.evaluation.evaluate import evaluate_backbone, markdown_report, sample_images
from gfnalign.evaluation.features import PixelFeatures, build_features


class FakeBackbone:
    """eps = 0.5 x (+ shift when the 'adapter' is on); cond = prompt length; decode = sigmoid upsample."""

    latent_shape = (2, 4, 4)

    def __init__(self, shift: float = 0.0):
        cfg = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "set_alpha_to_one": False,
               "steps_offset": 1}
        self.schedule = NoiseSchedule.from_config(cfg, 4)
        self.shift = shift

    def encode_prompts(self, prompts):
        return torch.tensor([[float(len(p))] for p in prompts])

    def eps(self, x, t, cond, *, reference=False):
        out = 0.5 * x + 0.01 * cond.view(-1, 1, 1, 1)
        return out if reference else out + self.shift

    def decode(self, latents):
        img = torch.sigmoid(latents.mean(1, keepdim=True))
        return torch.nn.functional.interpolate(img, scale_factor=2).expand(-1, 3, -1, -1)


class Brightness:
    name = "brightness"

    def __call__(self, images, prompts):
        assert len(prompts) == images.shape[0]
        return images.mean(dim=(1, 2, 3)).float()


PROMPTS = ["a cat", "a tall dog"]


def test_same_noise_for_finetuned_and_pretrained_when_adapter_is_identity():
    bb = FakeBackbone(shift=0.0)
    a = sample_images(bb, PROMPTS, 3, reference=False, seed=1, batch_size=4)
    b = sample_images(bb, PROMPTS, 3, reference=True, seed=1, batch_size=4)
    assert a.images.shape == (6, 3, 8, 8)
    assert torch.equal(a.images, b.images)
    assert a.prompt_ids.tolist() == [0, 0, 0, 1, 1, 1] and a.prompts[3] == "a tall dog"
    c = sample_images(bb, PROMPTS, 3, reference=True, seed=2, batch_size=4)
    assert not torch.equal(a.images, c.images)


def test_evaluate_identity_adapter_has_zero_drift_and_equal_rewards():
    res = evaluate_backbone(FakeBackbone(0.0), PROMPTS, [Brightness()], PixelFeatures(4), samples_per_prompt=4,
                            batch_size=3)
    for key in ("reward_mean", "reward_std", "diversity", "prior_drift", "pretrained", "per_prompt"):
        assert key in res
    assert res["prior_drift"] == pytest.approx(0.0, abs=1e-9)
    assert res["reward_mean"] == pytest.approx(res["pretrained"]["reward_mean"])
    assert res["diversity"] == pytest.approx(res["pretrained"]["diversity"])
    assert res["prior_drift_floor"] > 0  # independent noise: the small-sample floor is not zero
    assert [r["prompt"] for r in res["per_prompt"]] == PROMPTS


def test_evaluate_shifted_adapter_moves_reward_and_drift():
    res = evaluate_backbone(FakeBackbone(-2.0), PROMPTS, [Brightness()], PixelFeatures(4), samples_per_prompt=4,
                            floor=False)
    assert res["reward_mean"] != pytest.approx(res["pretrained"]["reward_mean"], abs=1e-3)
    assert res["prior_drift"] > 1e-3
    assert res["prior_drift_floor"] is None
    md = markdown_report(res)
    assert "| reward `brightness`" in md and "a tall dog" in md


def test_evaluate_rejects_bad_inputs():
    with pytest.raises(ValueError, match="at least 2"):
        evaluate_backbone(FakeBackbone(), PROMPTS, [Brightness()], PixelFeatures(), samples_per_prompt=1)
    with pytest.raises(ValueError, match="features="):
        build_features("inception")
    with pytest.raises(FileNotFoundError, match="config.json"):
        build_features("clip:/nonexistent/clip")

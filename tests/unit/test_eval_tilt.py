"""The image-world target: self-normalised importance weighting of pretrained draws (evaluation/tilt.py)."""

from __future__ import annotations

import math

import pytest
import torch

from gfnalign.evaluation import tilt as T


def _categorical(probs: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    return torch.multinomial(probs, n, replacement=True, generator=torch.Generator().manual_seed(seed))


def test_weights_and_ess():
    w = T.self_normalised_weights(torch.tensor([1000.0, 1000.0, 1000.0, 1000.0]))  # overflow-safe
    assert torch.allclose(w, torch.full((4,), 0.25, dtype=torch.float64))
    assert T.effective_sample_size(w) == pytest.approx(4.0)
    assert T.effective_sample_size(torch.tensor([1.0, 0.0, 0.0])) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="finite"):
        T.self_normalised_weights(torch.tensor([0.0, float("nan")]))


def test_tilt_target_recovers_the_exact_tilt_within_its_standard_error():
    # pretrained class law p, reward r(c); the exact target is p·exp(beta r) / Z
    p = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    r = torch.tensor([0.0, 0.5, 1.0, 2.0], dtype=torch.float64)
    beta = 1.3
    exact = p * torch.exp(beta * r)
    exact /= exact.sum()
    m = 20_000
    c = _categorical(p, m, seed=0)
    target = T.tilt_target(c, r[c], beta, n_classes=4)
    z = (target.masses - exact).abs() / target.standard_error
    assert float(z.max()) < 4.0, (target.masses, exact, target.standard_error)
    # the standard error is the right size: the delta-method variance of a ratio estimator
    q = exact
    w_ratio = torch.exp(beta * r) / (p * torch.exp(beta * r)).sum()  # dπ/dp
    var = torch.stack([(p * w_ratio**2 * ((torch.arange(4) == k).double() - q[k]) ** 2).sum() for k in range(4)])
    assert torch.allclose(target.standard_error, (var / m).sqrt(), rtol=0.1)
    assert 0.3 * m < target.ess < m
    assert target.reward_mean == pytest.approx(float((exact * r).sum()), abs=4 * 0.02)
    assert T.total_variation(target.pretrained_masses, p) < 0.02


def test_class_mass_tv_is_small_for_an_exact_sampler_and_large_for_the_pretrained_one():
    p = torch.tensor([0.4, 0.4, 0.2], dtype=torch.float64)
    r = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    beta = 2.0
    exact = p * torch.exp(beta * r)
    exact /= exact.sum()
    c_pre = _categorical(p, 8000, seed=1)
    exact_sampler = T.class_mass_tv(c_pre, r[c_pre], beta, _categorical(exact, 4000, seed=2), 3, n_boot=200)
    pretrained = T.class_mass_tv(c_pre, r[c_pre], beta, _categorical(p, 4000, seed=3), 3, n_boot=200)
    true_gap = T.total_variation(p, exact)  # 0.2*(e^2-1)/(0.8+0.2e^2) = 0.448...
    assert exact_sampler["tv"] < 0.03  # the noise of 8000 + 4000 draws is ~0.01
    assert exact_sampler["tv_low"] <= exact_sampler["tv"] <= exact_sampler["tv_high"]
    assert abs(pretrained["tv"] - true_gap) < 0.03
    assert pretrained["tv_low"] < true_gap < pretrained["tv_high"]


def _mean_abs_normal(mu: float, s: float) -> float:
    return s * math.sqrt(2 / math.pi) * math.exp(-(mu**2) / (2 * s**2)) + mu * math.erf(mu / (s * math.sqrt(2)))


def test_weighted_energy_distance_matches_the_closed_form():
    # p = N(0, 1), r(x) = x: the tilt exp(beta x) p is N(beta, 1) exactly
    beta, m, n = 1.0, 4000, 2000
    g = torch.Generator().manual_seed(0)
    y = torch.randn(m, 1, generator=g, dtype=torch.float64)
    log_w = beta * y[:, 0]
    on_target = T.weighted_energy_distance(beta + torch.randn(n, 1, generator=g, dtype=torch.float64), y, log_w)
    off_target = T.weighted_energy_distance(torch.randn(n, 1, generator=g, dtype=torch.float64), y, log_w)
    s2 = math.sqrt(2.0)
    exact_off = 2 * _mean_abs_normal(beta, s2) - 2 * _mean_abs_normal(0.0, s2)  # ED(N(0,1), N(beta,1))
    assert abs(on_target) < 0.02
    assert off_target == pytest.approx(exact_off, abs=0.03)
    # equal weights: the plain energy distance of two samples of one law is ~0
    assert abs(T.weighted_energy_distance(y[:2000], y[2000:])) < 0.02


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="class labels must lie"):
        T.class_masses(torch.tensor([0, 5]), 3)
    with pytest.raises(ValueError, match="one of each per draw"):
        T.tilt_target(torch.tensor([0, 1]), torch.tensor([0.0]), 1.0, 2)
    with pytest.raises(ValueError, match="beta"):
        T.tilt_target(torch.tensor([0, 1]), torch.tensor([0.0, 1.0]), float("inf"), 2)
    with pytest.raises(ValueError, match=">= 2 samples"):
        T.weighted_energy_distance(torch.zeros(1, 2), torch.zeros(5, 2))


def test_digit_preference_reward_is_the_expected_preference():
    from gfnalign.rewards.digits import DigitPreferenceReward

    class Stub(torch.nn.Module):
        def forward(self, images):
            return torch.log(torch.tensor([[0.7, 0.1, 0.1, 0.1] + [1e-12] * 6])).expand(images.shape[0], -1)

    reward = DigitPreferenceReward(values=[1, 0, 2, 0, 0, 0, 0, 0, 0, 0], classifier=Stub())
    out = reward(torch.rand(3, 3, 16, 16), ["a handwritten digit"] * 3)
    assert torch.allclose(out, torch.full((3,), 0.7 * 1 + 0.1 * 2), atol=1e-5)
    for bad in ([1, 2, 3], [float("nan")] * 10, "ten", [True] * 10):
        with pytest.raises(ValueError, match="values must be 10 finite numbers"):
            DigitPreferenceReward(values=bad, classifier=Stub())

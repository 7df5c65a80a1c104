"""The log-ratio reward (any mixture is a target at β = 1) and the seeded random-case generator."""

import math

import pytest
import torch

from gfnalign.toy.cases import random_case
from gfnalign.toy.mixture import GaussianMixture
from gfnalign.toy.rewards import LogRatioReward, bind_final_alpha_bar, reward_from_spec

P = GaussianMixture.isotropic([0.5, 0.5], [[2.0, 0.0], [-2.0, 0.0]], [0.5, 0.5])
Q = {"weights": [0.2, 0.8], "means": [[2.0, 0.5], [-1.5, 0.0]], "stds": [0.4, 0.6]}


def test_log_ratio_reward_tilts_the_pretrained_mixture_onto_the_target():
    r = reward_from_spec({"type": "log_ratio", "target": Q}, 2, base=P, beta=1.0)
    ab = 0.97
    r = bind_final_alpha_bar(r, ab)
    p_f, q_f = P.noised(ab), GaussianMixture.from_spec(Q).noised(ab)
    x = torch.randn(50, 2, dtype=torch.float64) * 2
    assert torch.allclose(r(x), q_f.log_prob(x) - p_f.log_prob(x))
    # p_f·exp(r) = q_f pointwise, and tilt returns q_f
    assert torch.allclose(p_f.log_prob(x) + r(x), q_f.log_prob(x))
    tilted = r.tilt(p_f, 1.0)
    assert torch.allclose(tilted.log_prob(x), q_f.log_prob(x))
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(r(xg).sum(), xg)
    assert torch.allclose(r.grad(x), g)
    assert r.to_spec()["type"] == "log_ratio"
    with pytest.raises(ValueError, match="beta = 1"):
        r.tilt(p_f, 0.5)
    with pytest.raises(ValueError, match="beta = 1"):
        reward_from_spec({"type": "log_ratio", "target": Q}, 2, base=P, beta=2.0)
    with pytest.raises(ValueError, match="pretrained mixture"):
        reward_from_spec({"type": "log_ratio", "target": Q}, 2)
    assert isinstance(r, LogRatioReward) and r.final_alpha_bar == ab


@pytest.mark.parametrize("dim", [2, 8])
def test_random_cases_are_seeded_valid_and_move_a_quarter_of_the_mass(dim):
    kinds = set()
    for seed in range(6):
        mix_spec, reward_spec, beta, info = random_case(seed, dim)
        again = random_case(seed, dim)
        assert again[0] == mix_spec and again[1] == reward_spec and again[2] == beta
        mix = GaussianMixture.from_spec(mix_spec)
        assert mix.dim == dim and 2 <= mix.num_components <= 9
        reward = reward_from_spec(reward_spec, dim, base=mix, beta=beta)
        p_f = mix.noised(1 - 1e-4)
        tilted = reward.tilt(p_f, beta)
        moved = 0.5 * float((tilted.weights - p_f.weights).abs().sum())
        assert moved >= 0.25 - 1e-3 and math.isclose(moved, info["moved"], rel_tol=1e-9)
        assert (beta == 1.0) if info["reward"] == "log_ratio" else 0.5 <= beta <= 2.0
        kinds.add(info["reward"])
    assert random_case(0, dim) != random_case(1, dim)
    if dim == 2:
        assert kinds == {"linear", "quadratic", "log_ratio"}

"""The analytic toy world: exact ε, closed-form tilts, the exact sampler, metrics and input checks."""

import math

import pytest
import torch

from gfnalign.toy.metrics import energy_distance, mode_mass, total_variation
from gfnalign.toy.mixture import GaussianMixture
from gfnalign.toy.rewards import LinearReward, QuadraticReward, reward_from_spec
from gfnalign.toy.world import (
    ToyLookahead,
    ToyPolicy,
    final_alpha_bar,
    oracle_mixture,
    sample_chain,
    toy_schedule,
)

D = torch.float64


def four_modes() -> GaussianMixture:
    return GaussianMixture.isotropic([0.25] * 4, [[2, 2], [2, -2], [-2, 2], [-2, -2]], [0.5] * 4)


def full_cov_mixture() -> GaussianMixture:
    covs = [[[0.5, 0.2, 0.0], [0.2, 0.3, 0.1], [0.0, 0.1, 0.4]], [[0.2, 0.0, 0.0], [0.0, 0.6, -0.1], [0.0, -0.1, 0.3]]]
    return GaussianMixture.from_covs([0.3, 0.7], [[1.0, 0.0, -1.0], [-1.0, 0.5, 0.5]], covs)


@pytest.mark.parametrize("mix", [four_modes(), full_cov_mixture()])
def test_eps_is_minus_sqrt_one_minus_ab_times_autograd_score(mix):
    g = torch.Generator().manual_seed(0)
    x = 2 * torch.randn(64, mix.dim, dtype=D, generator=g)
    ab = torch.rand(64, dtype=D, generator=g) * 0.98 + 0.01
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(mix.log_prob(xg, ab).sum(), xg)
    torch.testing.assert_close(mix.score(x, ab), grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(mix.eps(x, ab), -(1 - ab).sqrt()[:, None] * grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mix", [four_modes(), full_cov_mixture()])
def test_one_noise_level_for_all_rows_equals_the_per_row_computation(mix):
    """Rows sharing one level take the broadcast path; mixed with a row at another level they take the
    per-row path: log p, the score and ε agree, and the score still equals autograd's."""
    g = torch.Generator().manual_seed(3)
    x = 2 * torch.randn(33, mix.dim, dtype=D, generator=g)
    same = torch.full((33,), 0.42, dtype=D)
    mixed_x = torch.cat([x, x[:1]])
    mixed_ab = torch.cat([same, torch.tensor([0.9], dtype=D)])
    torch.testing.assert_close(mix.log_prob(x, same), mix.log_prob(mixed_x, mixed_ab)[:33], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mix.score(x, same), mix.score(mixed_x, mixed_ab)[:33], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mix.eps(x, 0.42), mix.eps(mixed_x, mixed_ab)[:33], rtol=1e-12, atol=1e-12)
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(mix.log_prob(xg, same).sum(), xg)
    torch.testing.assert_close(mix.score(x, same), grad, rtol=1e-10, atol=1e-10)


def test_log_prob_matches_torch_distributions():
    mix = full_cov_mixture()
    ab = 0.37
    x = torch.randn(32, 3, dtype=D, generator=torch.Generator().manual_seed(1))
    comps = torch.distributions.MultivariateNormal(
        math.sqrt(ab) * mix.means, covariance_matrix=ab * mix.covs + (1 - ab) * torch.eye(3, dtype=D)
    )
    ref = torch.distributions.MixtureSameFamily(torch.distributions.Categorical(mix.weights), comps)
    torch.testing.assert_close(mix.log_prob(x, ab), ref.log_prob(x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(mix.responsibilities(x, ab).sum(1), torch.ones(32, dtype=D))


def test_noised_mixture_matches_noised_samples():
    mix = four_modes()
    g = torch.Generator().manual_seed(2)
    ab = 0.3
    x0 = mix.sample(4000, g)
    xt = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * torch.randn(4000, 2, dtype=D, generator=g)
    exact = mix.noised(ab).sample(4000, g)
    # unbiased energy distance of two samples of one law: |ED| ~ few 1e-4 at n = 4000
    assert abs(energy_distance(xt, exact)) < 3e-3


@pytest.mark.parametrize(
    "reward,beta",
    [
        (LinearReward(torch.tensor([1.0, 0.5], dtype=D)), 0.5),
        (QuadraticReward(torch.tensor([1.0, -1.5], dtype=D), 2.0), 1.5),
    ],
)
def test_closed_form_tilt_matches_importance_weighted_samples(reward, beta):
    mix = four_modes().noised(0.9999)
    tilted = reward.tilt(mix, beta)
    g = torch.Generator().manual_seed(3)
    n = 200_000
    x, labels = mix.sample(n, g, return_labels=True)
    w = torch.exp(beta * reward(x) - (beta * reward(x)).max())
    w = w / w.sum()
    ess = 1.0 / float((w**2).sum())
    # component weights: the importance-weighted label frequencies
    iw_weights = torch.zeros(4, dtype=D).index_add_(0, labels, w)
    tol = 5 / math.sqrt(ess)
    torch.testing.assert_close(iw_weights, tilted.weights, atol=tol, rtol=0)
    # component means of the tilted mixture
    for k in range(4):
        mask = labels == k
        if float(tilted.weights[k]) < 0.05:
            continue
        mk = (w[mask, None] * x[mask]).sum(0) / w[mask].sum()
        torch.testing.assert_close(mk, tilted.means[k], atol=10 * tol, rtol=0)
    # tilted log-density = log p + β r + const
    y = torch.randn(16, 2, dtype=D, generator=g)
    diff = tilted.log_prob(y) - mix.log_prob(y) - beta * reward(y)
    torch.testing.assert_close(diff, diff[0].expand(16), rtol=0, atol=1e-9)


def test_tilt_log_density_is_exact_for_full_covariances():
    mix = full_cov_mixture()
    y = torch.randn(16, 3, dtype=D, generator=torch.Generator().manual_seed(4))
    for reward, beta in [
        (LinearReward(torch.tensor([0.3, -1.0, 2.0], dtype=D)), 0.7),
        (QuadraticReward(torch.tensor([0.5, 0.5, 0.0], dtype=D), 0.8), 1.3),
    ]:
        diff = reward.tilt(mix, beta).log_prob(y) - mix.log_prob(y) - beta * reward(y)
        torch.testing.assert_close(diff, diff[0].expand(16), rtol=0, atol=1e-9)


def test_reward_gradients_match_autograd():
    x = torch.randn(8, 2, dtype=D, requires_grad=True)
    for reward in (LinearReward(torch.tensor([1.0, 0.5], dtype=D)), QuadraticReward(torch.tensor([1.0, 0.0], dtype=D), 0.7)):
        (g,) = torch.autograd.grad(reward(x).sum(), x)
        torch.testing.assert_close(reward.grad(x.detach()), g)


def test_policy_starts_exact_and_lookahead_gradient_matches_autograd():
    mix = four_modes()
    sched = toy_schedule()
    pol = ToyPolicy(mix, sched)
    x = torch.randn(10, 2, dtype=D)
    t = sched.timesteps[torch.arange(10) * 5]
    torch.testing.assert_close(pol.eps(x, t, None), pol.eps(x, t, None, reference=True))
    assert sched.next_timesteps[-1] == 0 and float(sched.alpha_bars_next[-1]) == float(sched.alphas_cumprod[0])
    reward = LinearReward(torch.tensor([1.0, 0.5], dtype=D))
    la = ToyLookahead(pol, reward, model="reference", prior_scale=2.0)
    xg = x.clone().requires_grad_(True)
    val = la._value(xg, t, torch.zeros(10, dtype=torch.bool))
    (g,) = torch.autograd.grad(val.sum(), xg)
    torch.testing.assert_close(la.grad_log_reward(x, t, None, terminal=torch.zeros(10, dtype=torch.bool)), g)
    # terminal rows: x0_hat = x, value = r(x) + c log p_f(x)
    term = la.log_reward(x, torch.zeros(10, dtype=torch.long), None, terminal=torch.ones(10, dtype=torch.bool))
    torch.testing.assert_close(term, la.terminal_reward(x))
    pf = mix.noised(final_alpha_bar(sched))
    torch.testing.assert_close(term, reward(x) + 2.0 * pf.log_prob(x))


def test_exact_sampler_reproduces_mixture_within_floor():
    """The exact-ε DDPM sampler matches the noised mixture up to its (small) discretisation floor."""
    mix = four_modes()
    sched = toy_schedule()
    pol = ToyPolicy(mix, sched)
    g = torch.Generator().manual_seed(5)
    n = 4000
    xs = sample_chain(pol, n, g, reference=True)
    pf = mix.noised(final_alpha_bar(sched))
    ed = energy_distance(xs, pf.sample(n, g))
    assert ed < 5e-3, ed  # measured floor ~8e-4 at n = 1e4, sampling noise ~5e-4 at n = 4000
    mass = mode_mass(xs, pf)
    assert total_variation(mass, pf.weights.tolist()) < 4 * math.sqrt(0.25 * 0.75 / n) * 2


@pytest.mark.parametrize("reward", [LinearReward(torch.tensor([1.0, 0.5], dtype=D)),
                                    QuadraticReward(torch.tensor([2.0, 1.5], dtype=D), 2.0)])
def test_oracle_mixture_noises_to_the_tilted_target_and_samples_it(reward):
    """The oracle's exact ε belongs to the tilted target: noised to the final level it *is* the target,
    and its chain lands on the target's mode masses (a tilted sampler, unlike the pretrained one)."""
    sched = toy_schedule()
    target = reward.tilt(four_modes().noised(final_alpha_bar(sched)), 0.5)
    oracle = oracle_mixture(target, sched)
    back = oracle.noised(final_alpha_bar(sched))
    torch.testing.assert_close(back.means, target.means)
    torch.testing.assert_close(back.eigvals, target.eigvals)
    torch.testing.assert_close(back.weights, target.weights)
    n = 4000
    xs = sample_chain(ToyPolicy(oracle, sched), n, torch.Generator().manual_seed(3), reference=True)
    # TV sampling noise: ~Σ_k sqrt(p_k(1-p_k)/n)/2 ≈ 0.013 at n = 4000; the measured floor is ≈ 0.015
    assert total_variation(mode_mass(xs, target), target.weights.tolist()) < 0.05
    # a component narrower than the final noise has no clean-data preimage
    narrow = GaussianMixture.isotropic([1.0], [[0.0, 0.0]], [1e-3])
    assert oracle_mixture(narrow, sched) is None


@pytest.mark.parametrize("gamma", ["alpha_bar", "sqrt_alpha_bar"])
def test_lookahead_gamma_leaves_the_prior_flow_undamped(gamma):
    """With the objective's γ_t applied to the whole lookahead, the flow gets γ_t·r(x̂0) + c·log p_t."""
    mix, sched = four_modes(), toy_schedule()
    pol = ToyPolicy(mix, sched)
    reward = LinearReward(torch.tensor([1.0, 0.5], dtype=D))
    plain = ToyLookahead(pol, reward, prior_scale=2.0)
    damped = ToyLookahead(pol, reward, prior_scale=2.0, gamma=gamma)
    x = torch.randn(12, 2, dtype=D, generator=torch.Generator().manual_seed(4))
    t = sched.timesteps[torch.arange(12) % sched.num_steps]
    terminal = torch.zeros(12, dtype=torch.bool)
    terminal[:3] = True
    ab = sched.alphas_cumprod[t].to(D)
    g = torch.where(terminal, torch.ones_like(ab), ab if gamma == "alpha_bar" else ab.sqrt())
    logp = torch.where(terminal, mix.noised(final_alpha_bar(sched)).log_prob(x), mix.log_prob(x, ab))
    r_hat = plain.log_reward(x, t, terminal=terminal) - 2.0 * logp
    torch.testing.assert_close(g * damped.log_reward(x, t, terminal=terminal), g * r_hat + 2.0 * logp)
    with pytest.raises(ValueError, match="gamma"):
        ToyLookahead(pol, reward, gamma="half")


def test_toy_loop_moves_the_target_flow_network_after_every_update(monkeypatch):
    from gfnalign.objectives.dag_db import DAGDB
    from gfnalign.toy.train import train

    calls = []
    original = DAGDB.after_optimizer_step
    monkeypatch.setattr(DAGDB, "after_optimizer_step", lambda self: (calls.append(1), original(self)))
    reward = LinearReward(torch.tensor([1.0, 0.5], dtype=D))
    train("dag-db", four_modes(), reward, 0.5, steps=3, config={"batch_size": 8})
    assert len(calls) == 3


def test_energy_distance_properties():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2000, 2, dtype=D, generator=g)
    y = torch.randn(2000, 2, dtype=D, generator=g) + torch.tensor([0.5, 0.0], dtype=D)
    assert abs(energy_distance(x, torch.randn(2000, 2, dtype=D, generator=g))) < 5e-3
    assert energy_distance(x, y) > 0.05


def test_mixture_spec_errors_name_the_field():
    ok = {"weights": [0.5, 0.5], "means": [[0, 0], [1, 1]], "stds": [1, 1]}
    GaussianMixture.from_spec(ok)
    cases = [
        ({**ok, "weights": [0.5, 0.6]}, "weights"),
        ({**ok, "stds": [1]}, "stds"),
        ({**ok, "weights": [1.0]}, "weights"),
        ({"weights": [1.0], "means": [[0, 0]]}, "stds"),
        ({**ok, "stds": [1, -1]}, "stds"),
        ({"weights": [1.0], "means": [[0, 0]], "covs": [[[1, 0], [0, 1]], [[1, 0], [0, 1]]]}, "covs"),
        ({"weights": [1.0], "means": [[0, 0]], "covs": [[[1, 2], [2, 1]]]}, "covs"),
        ({**ok, "mean": [[0, 0]]}, "mean"),
        ({**ok, "means": [[0, 0], [1]]}, "means"),
    ]
    for spec, field in cases:
        with pytest.raises(ValueError, match=field):
            GaussianMixture.from_spec(spec)


def test_reward_spec_errors_name_the_field():
    assert isinstance(reward_from_spec({"type": "linear", "a": [1, 2]}, 2), LinearReward)
    assert isinstance(reward_from_spec({"type": "quadratic", "center": [1, 2], "scale": 0.5}, 2), QuadraticReward)
    cases = [
        ({"type": "cubic"}, "type"),
        ({"type": "linear", "a": [1, 2, 3]}, "a"),
        ({"type": "linear"}, "'a'"),
        ({"type": "quadratic", "center": [0, 0], "scale": 0}, "scale"),
        ({"type": "quadratic", "center": [0], "scale": 1}, "center"),
        ({"type": "linear", "a": [1, 2], "b": 1}, "b"),
    ]
    for spec, field in cases:
        with pytest.raises(ValueError, match=field):
            reward_from_spec(spec, 2)


@pytest.mark.parametrize("parametrization,power", [("score", 2), ("std", 1)])
def test_preconditioned_correction_moves_the_mean_by_sigma_power_times_h(parametrization, power):
    from gfnalign.core.kernels import forward_kernel

    sched = toy_schedule()
    pol = ToyPolicy(four_modes(), sched, parametrization=parametrization)
    torch.nn.init.normal_(pol.correction.net[-1].weight)
    x = torch.randn(50, 2, dtype=D)
    t = sched.timesteps
    h = pol.correction(x, t, pol.alpha_bar(t, 50))
    a, an = sched.alpha_bars, sched.alpha_bars_next
    k_pol = forward_kernel(x, pol.eps(x, t), a, an)
    k_ref = forward_kernel(x, pol.eps(x, t, reference=True), a, an)
    torch.testing.assert_close(k_pol.mean - k_ref.mean, k_ref.std**power * h, rtol=1e-8, atol=1e-12)


def test_sorted_pair_and_cross_sums_equal_brute_force():
    from gfnalign.toy.metrics import _sorted_cross_sums, _sorted_pair_sums, _sorted_rows

    g = torch.Generator().manual_seed(11)
    x = _sorted_rows(torch.randn(3, 57, dtype=D, generator=g))  # 3 directions, 57 samples
    y = _sorted_rows(torch.randn(3, 40, dtype=D, generator=g) + 0.3)
    y[0, 5] = x[0, 7]  # a tie
    within = (x[:, :, None] - x[:, None, :]).abs().sum(dim=(1, 2)) / 2
    cross = (x[:, :, None] - y[:, None, :]).abs().sum(dim=(1, 2))
    torch.testing.assert_close(_sorted_pair_sums(x), within, rtol=1e-12, atol=0)
    torch.testing.assert_close(_sorted_cross_sums(x, y), cross, rtol=1e-12, atol=0)


@pytest.mark.parametrize("dim", [1, 2])
def test_sorted_energy_distance_equals_the_pairwise_u_statistic(dim):
    from gfnalign.toy.metrics import energy_distance_pairwise

    g = torch.Generator().manual_seed(12 + dim)
    mix = four_modes() if dim == 2 else None
    x = mix.sample(3000, g) if mix else torch.randn(3000, 1, dtype=D, generator=g)
    y = x[:2500] * 1.1 + torch.tensor([0.3, 0.0], dtype=D) if mix else torch.randn(2500, 1, dtype=D, generator=g) * 1.1 + 0.2
    exact = energy_distance_pairwise(x, y)
    assert exact > 1e-3
    # 1-D: the same statistic up to the float32 sort; 2-D: the 64-angle midpoint rule, kernel error ~1/(πM²)
    assert abs(energy_distance(x, y) - exact) < (1e-6 if dim == 1 else 1e-4) * exact
    # the null case, where the three terms cancel almost completely
    x2 = mix.sample(2500, g) if mix else torch.randn(2500, 1, dtype=D, generator=g)
    assert abs(energy_distance(x, x2) - energy_distance_pairwise(x, x2)) < 1e-6


def test_energy_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"\[n, d\]"):
        energy_distance(torch.zeros(5, 2, dtype=D), torch.zeros(5, 3, dtype=D))
    with pytest.raises(ValueError, match="directions"):
        energy_distance(torch.zeros(5, 2, dtype=D), torch.ones(5, 2, dtype=D), directions=0)

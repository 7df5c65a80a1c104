"""Kernels equal diffusers' DDIM/DDPM steps; log-probs and scores equal torch / autograd."""

import math

import pytest
import torch

from gfnalign.core import (
    NoiseSchedule,
    backward_kernel,
    forward_kernel,
    gaussian_log_prob,
    score_pb_next,
    score_pb_t,
    score_wrt_mean_input,
)

SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False)


@pytest.mark.parametrize("eta", [1.0, 0.5])
@pytest.mark.parametrize("k", [0, 5, 9])
def test_forward_kernel_matches_ddim_step(eta, k):
    diffusers = pytest.importorskip("diffusers")
    sch = diffusers.DDIMScheduler(**SD, steps_offset=1, set_alpha_to_one=False)
    sch.set_timesteps(10)
    ns = NoiseSchedule.from_config(sch.config, 10)
    g = torch.Generator().manual_seed(k)
    x = torch.randn(3, 4, 8, 8, generator=g)
    eps = torch.randn(3, 4, 8, 8, generator=g)
    z = torch.randn(3, 4, 8, 8, generator=g)
    t = sch.timesteps[k]
    ref = sch.step(eps, t, x, eta=eta, variance_noise=z).prev_sample
    _, _, a, an = ns.at_steps(torch.full((3,), k), dtype=torch.float32)
    kern = forward_kernel(x, eps, a, an, eta)
    assert torch.allclose(kern.sample(z), ref, atol=2e-5, rtol=1e-5)
    # mean alone (noise 0) and the std
    ref0 = sch.step(eps, t, x, eta=eta, variance_noise=torch.zeros_like(z)).prev_sample
    assert torch.allclose(kern.mean, ref0, atol=2e-5, rtol=1e-5)
    prev = t - 100
    ab = sch.alphas_cumprod
    a_prev = ab[prev] if prev >= 0 else sch.final_alpha_cumprod
    var = (1 - a_prev) / (1 - ab[t]) * (1 - ab[t] / a_prev)
    assert torch.allclose(kern.std.flatten(), (eta * var.sqrt()).expand(3), rtol=1e-5)


@pytest.mark.parametrize("k", [0, 7, 19])
def test_forward_kernel_matches_ddpm_step(k):
    diffusers = pytest.importorskip("diffusers")
    sch = diffusers.DDPMScheduler(**SD, steps_offset=1)
    sch.set_timesteps(20)
    ns = NoiseSchedule.from_config(sch, 20)
    g = torch.Generator().manual_seed(100 + k)
    x = torch.randn(2, 4, 6, 6, generator=g)
    eps = torch.randn(2, 4, 6, 6, generator=g)
    t = sch.timesteps[k]
    ref = sch.step(eps, t, x, generator=torch.Generator().manual_seed(7)).prev_sample
    z = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(7))
    _, _, a, an = ns.at_steps(torch.full((2,), k), dtype=torch.float32)
    std = torch.sqrt((1 - an) / (1 - a) * (1 - a / an))
    mean = forward_kernel(x, eps, a, an, 1.0).mean if k < 19 else None
    if k < 19:
        assert torch.allclose(mean + std[:, None, None, None] * z, ref, atol=2e-5, rtol=1e-5)
    else:  # last DDPM step lands on alpha-bar 1: deterministic, and the kernel rightly refuses it
        assert float(an[0]) == 1.0
        with pytest.raises(ValueError, match="zero variance"):
            forward_kernel(x, eps, a, an, 1.0).log_prob(ref)


def test_log_prob_equals_torch_normal_and_reductions():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64)
    mean = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64)
    std = torch.rand(5, 1, 1, 1, generator=g, dtype=torch.float64) + 0.1
    ref = torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(x).flatten(1).sum(1)
    lp = gaussian_log_prob(x, mean, std)
    assert torch.allclose(lp, ref, rtol=1e-12, atol=1e-12)
    D = 3 * 4 * 4
    assert torch.allclose(gaussian_log_prob(x, mean, std, "mean") * D, lp, rtol=1e-13)
    with pytest.raises(ValueError, match="reduction"):
        gaussian_log_prob(x, mean, std, "max")


def _ab(k=3):
    a = torch.tensor([0.3, 0.6, 0.95], dtype=torch.float64)[:k]
    an = torch.tensor([0.5, 0.7, 0.999], dtype=torch.float64)[:k]
    return a, an


def test_forward_score_equals_autograd():
    g = torch.Generator().manual_seed(1)
    a, an = _ab()
    x_t = torch.randn(3, 5, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 5, generator=g, dtype=torch.float64)
    x_next = torch.randn(3, 5, generator=g, dtype=torch.float64).requires_grad_(True)
    kern = forward_kernel(x_t, eps, a, an, 1.0)
    (auto,) = torch.autograd.grad(kern.log_prob(x_next).sum(), x_next)
    assert torch.allclose(kern.score(x_next.detach()), auto, rtol=1e-12, atol=1e-10)


def test_backward_scores_equal_autograd():
    g = torch.Generator().manual_seed(2)
    a, an = _ab()
    x_t = torch.randn(3, 5, generator=g, dtype=torch.float64).requires_grad_(True)
    x_next = torch.randn(3, 5, generator=g, dtype=torch.float64).requires_grad_(True)
    lp = backward_kernel(x_next, a, an).log_prob(x_t).sum()
    gt, gn = torch.autograd.grad(lp, (x_t, x_next))
    assert torch.allclose(score_pb_t(x_t.detach(), x_next.detach(), a, an), gt, rtol=1e-12, atol=1e-10)
    assert torch.allclose(score_pb_next(x_t.detach(), x_next.detach(), a, an), gn, rtol=1e-12, atol=1e-10)
    # P_B log-prob is the textbook noising density
    ratio = a / an
    ref = torch.distributions.Normal(ratio.sqrt()[:, None] * x_next, (1 - ratio).sqrt()[:, None]).log_prob(x_t)
    assert torch.allclose(lp, ref.sum(), rtol=1e-12)


def test_reverse_score_equals_finite_differences():
    g = torch.Generator().manual_seed(3)
    a, an = _ab()
    W = torch.randn(5, 5, generator=g, dtype=torch.float64) * 0.3

    def eps_fn(x):
        return torch.tanh(x @ W)

    x_t = torch.randn(3, 5, generator=g, dtype=torch.float64).requires_grad_(True)
    x_next = torch.randn(3, 5, generator=g, dtype=torch.float64)
    lp = forward_kernel(x_t, eps_fn(x_t), a, an).log_prob(x_next)
    score = score_wrt_mean_input(lp, x_t)
    h = 1e-6
    fd = torch.zeros_like(score)
    with torch.no_grad():
        for j in range(5):
            e = torch.zeros(5, dtype=torch.float64)
            e[j] = h
            up = forward_kernel(x_t + e, eps_fn(x_t + e), a, an).log_prob(x_next)
            dn = forward_kernel(x_t - e, eps_fn(x_t - e), a, an).log_prob(x_next)
            fd[:, j] = (up - dn) / (2 * h)
    assert torch.allclose(score, fd, rtol=1e-6, atol=1e-6)


def test_eta_one_mean_is_ddpm_posterior_mean():
    a, an = _ab()
    g = torch.Generator().manual_seed(4)
    x_t = torch.randn(3, 4, generator=g, dtype=torch.float64)
    x0 = torch.randn(3, 4, generator=g, dtype=torch.float64)
    eps = (x_t - a.sqrt()[:, None] * x0) / (1 - a).sqrt()[:, None]
    kern = forward_kernel(x_t, eps, a, an, 1.0)
    beta = 1 - a / an
    post = (an.sqrt() * beta / (1 - a))[:, None] * x0 + ((a / an).sqrt() * (1 - an) / (1 - a))[:, None] * x_t
    assert torch.allclose(kern.mean, post, rtol=1e-12, atol=1e-12)
    assert torch.allclose(kern.std.flatten() ** 2, (1 - an) / (1 - a) * beta, rtol=1e-12)
    assert math.isclose(float(kern.noise_of(kern.sample(torch.ones_like(x_t)))[0, 0]), 1.0, rel_tol=1e-12)

"""Gaussian-interpolant kernels: rectified flow (SD3/FLUX grids, Flow-GRPO SDE, CPS, DDIM-η) and the
VP kernels kept bit for bit."""

import math

import pytest
import torch

from gfnalign.core import (
    NoiseLevels,
    NoiseSchedule,
    forward_kernel,
    noising_kernel,
    noising_score_next,
    noising_score_t,
    step_kernel,
)

diffusers = pytest.importorskip("diffusers")

F64 = torch.float64


def _flow_levels(sigma, sigma_next):
    return NoiseLevels.rectified_flow(torch.tensor(sigma, dtype=F64), torch.tensor(sigma_next, dtype=F64))


# -- grids ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("K", [1, 10, 28])
def test_sd3_grid_equals_flow_match_scheduler(shift, K):
    sch = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    sch.set_timesteps(K)
    ns = NoiseSchedule.from_flow_match_config(sch.config, K)
    assert torch.equal(ns.sigmas.float(), sch.sigmas[:-1]) and float(ns.sigmas_next[-1]) == 0.0
    assert torch.equal(ns.timesteps.float(), sch.timesteps)
    assert ns.interpolant == "rectified_flow" and ns.policy_output == "flow" and ns.kernel == "flow_sde"
    # the VP-equivalent alpha-bar of x = (1 - s) x0 + s eps
    s = ns.sigmas
    assert torch.allclose(ns.alpha_bars, (1 - s) ** 2 / ((1 - s) ** 2 + s**2), rtol=0, atol=1e-15)


@pytest.mark.parametrize("image_seq_len", [256, 1024, 4096])
def test_flux_grid_equals_flow_match_scheduler(image_seq_len):
    np = pytest.importorskip("numpy")
    cfg = dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
               max_image_seq_len=4096, shift=3.0)
    sch = diffusers.FlowMatchEulerDiscreteScheduler(**cfg)
    K = 20
    sig = np.linspace(1.0, 1 / K, K)
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    mu = calculate_shift(image_seq_len, 256, 4096, 0.5, 1.15)
    sch.set_timesteps(K, sigmas=sig, mu=mu)
    ns = NoiseSchedule.from_flow_match_config(sch.config, K, sigmas=sig, image_seq_len=image_seq_len)
    assert torch.equal(ns.sigmas.float(), sch.sigmas[:-1])
    with pytest.raises(ValueError, match="mu or image_seq_len"):
        NoiseSchedule.from_flow_match_config(sch.config, K, sigmas=sig)


def test_flow_schedule_rejects_bad_input():
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        NoiseSchedule.from_flow_match_config({"use_karras_sigmas": True}, 10)
    with pytest.raises(ValueError, match="final_sigma"):
        NoiseSchedule.rectified_flow(torch.tensor([1.0, 0.5]), final_sigma=0.6)
    vp = NoiseSchedule.from_config({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                                    "steps_offset": 1}, 10)
    with pytest.raises(ValueError, match="flow_sde"):
        vp.with_kernel("flow_sde")
    flow = NoiseSchedule.rectified_flow(torch.linspace(1, 0.1, 10))
    with pytest.raises(ValueError, match="flow_sde kernel"):
        flow.check_noise_level(0.0)
    with pytest.raises(ValueError, match="cps kernel"):
        flow.with_kernel("cps").check_noise_level(1.5)


# -- Flow-GRPO SDE step ----------------------------------------------------------------------------------
def _flow_grpo_step(x, u, sigma, sigma_next, a, sigma_after_first):
    """Flow-GRPO's published step, re-derived: s_t = a sqrt(σ/(1-σ)) (σ = 1 uses the grid's next σ in the
    ratio), mean = x (1 + s²Δ/(2σ)) + u (1 + s²(1-σ)/(2σ)) Δ, std = s sqrt(-Δ), Δ = σ_next - σ."""
    dt = sigma_next - sigma
    denom = 1 - (sigma_after_first if sigma == 1.0 else sigma)
    s = a * math.sqrt(sigma / denom)
    mean = x * (1 + s**2 / (2 * sigma) * dt) + u * (1 + s**2 * (1 - sigma) / (2 * sigma)) * dt
    return mean, s * math.sqrt(-dt)


@pytest.mark.parametrize("k", [0, 3, 9])
def test_flow_sde_at_zero_noise_is_the_euler_step(k):
    sch = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    sch.set_timesteps(10)
    ns = NoiseSchedule.from_flow_match_config(sch.config, 10)
    g = torch.Generator().manual_seed(k)
    x, u = torch.randn(2, 2, 4, 6, 6, generator=g)
    sch._step_index = k  # the scheduler's own step counter
    ref = sch.step(u, sch.timesteps[k], x).prev_sample
    kern = ns.forward_kernel(x, u, torch.full((2,), k), 0.0)
    assert torch.allclose(kern.mean, ref, rtol=0, atol=1e-6)
    assert float(kern.std.abs().max()) == 0.0


@pytest.mark.parametrize("a", [0.7, 1.0, math.sqrt(2)])
@pytest.mark.parametrize("k", [0, 1, 5, 9])
def test_flow_sde_step_equals_published_formula(a, k):
    ns = NoiseSchedule.from_flow_match_config({"shift": 3.0}, 10)
    sig = ns.sigmas.tolist() + [0.0]
    g = torch.Generator().manual_seed(10 + k)
    x, u, z = torch.randn(3, 3, 5, dtype=F64, generator=g)
    kern = ns.forward_kernel(x, u, torch.full((3,), k), a)
    mean, std = _flow_grpo_step(x, u, sig[k], sig[k + 1], a, sig[1])
    assert torch.allclose(kern.mean, mean, rtol=1e-12, atol=1e-12)
    assert torch.allclose(kern.std.flatten(), torch.full((3,), std, dtype=F64), rtol=1e-12)
    assert torch.allclose(kern.sample(z), mean + std * z, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind,eta", [("flow_sde", 0.7), ("cps", 0.7), ("ddim", 1.0), ("ddim", 0.4)])
def test_flow_log_probs_equal_torch_normal(kind, eta):
    ns = NoiseSchedule.rectified_flow(torch.linspace(1.0, 0.1, 8, dtype=F64), final_sigma=0.02, kernel=kind)
    g = torch.Generator().manual_seed(3)
    step = torch.arange(8)
    x, u, y = torch.randn(3, 8, 2, 3, dtype=F64, generator=g)
    kern = ns.forward_kernel(x, u, step, eta)
    std = kern.std.expand_as(kern.mean)
    ref = torch.distributions.Normal(kern.mean, std).log_prob(y).flatten(1).sum(1)
    assert torch.allclose(kern.log_prob(y), ref, rtol=1e-12, atol=1e-10)
    assert torch.allclose(kern.log_prob(y, "mean"), ref / 6, rtol=1e-12, atol=1e-10)
    pb = ns.backward_kernel(y, step)
    ref_b = torch.distributions.Normal(pb.mean, pb.std.expand_as(pb.mean)).log_prob(x).flatten(1).sum(1)
    assert torch.allclose(pb.log_prob(x), ref_b, rtol=1e-12, atol=1e-10)


# -- CPS and DDIM-η on the interpolant preserve the marginal coefficients -----------------------------------
@pytest.mark.parametrize("kind,eta", [("cps", 0.3), ("cps", 1.0), ("ddim", 1.0), ("ddim", 0.5)])
def test_kernels_preserve_interpolant_coefficients(kind, eta):
    """With the oracle prediction (x̂0 = x0, ε̂ = ε), x_next = α' x0 + (noise of total variance σ'²)."""
    sig = torch.tensor([1.0, 0.8, 0.5, 0.2], dtype=F64)
    ns = NoiseSchedule.rectified_flow(sig, final_sigma=0.05, kernel=kind)
    g = torch.Generator().manual_seed(4)
    x0, eps = torch.randn(2, 4, 3, dtype=F64, generator=g)
    step = torch.arange(4)
    s, sn = sig[:, None], ns.sigmas_next[:, None]
    x = (1 - s) * x0 + s * eps
    kern = ns.forward_kernel(x, eps - x0, step, eta)
    # mean = α' x0 + c ε with c² + std² = σ'²
    c = (kern.mean - (1 - sn) * x0) / eps
    assert torch.allclose(c, c[:, :1].expand_as(c), rtol=1e-10)
    assert torch.allclose(c[:, 0] ** 2 + kern.std.flatten() ** 2, sn.flatten() ** 2, rtol=1e-10)
    if kind == "cps":
        assert torch.allclose(kern.std.flatten(), sn.flatten() * math.sin(eta * math.pi / 2), rtol=1e-12)


def test_ddim_one_on_flow_is_the_noising_posterior():
    """DDIM η = 1 on any interpolant is q(x_next | x_t, x0): the Gaussian conditional of the noising chain."""
    sig, sig_n = 0.7, 0.4
    lv = _flow_levels(sig, sig_n)
    g = torch.Generator().manual_seed(5)
    x0, x = torch.randn(2, 6, 3, dtype=F64, generator=g)
    eps = (x - (1 - sig) * x0) / sig
    kern = step_kernel(x, eps - x0, lv, 1.0, kind="ddim", output_type="flow")
    # q(x_next | x0) = N(α' x0, σ'²); q(x_t | x_next) = N(r x_next, v) with r = α/α', v = σ² - r²σ'²
    a_t, a_n = 1 - sig, 1 - sig_n
    r = a_t / a_n
    v = sig**2 - r**2 * sig_n**2
    post_var = 1 / (1 / sig_n**2 + r**2 / v)
    post_mean = post_var * (a_n * x0 / sig_n**2 + r * x / v)
    assert torch.allclose(kern.mean, post_mean, rtol=1e-12, atol=1e-12)
    assert torch.allclose(kern.std.flatten() ** 2, torch.full((6,), post_var, dtype=F64), rtol=1e-12)


# -- the noising kernel P_B of the interpolant -------------------------------------------------------------
def test_flow_noising_kernel_is_the_interpolant_conditional():
    sig = torch.tensor([1.0, 0.9, 0.5, 0.1], dtype=F64)
    sig_n = torch.tensor([0.9, 0.5, 0.1, 0.0], dtype=F64)
    lv = NoiseLevels.rectified_flow(sig, sig_n)
    x_next = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(6))
    pb = noising_kernel(x_next, lv)
    r = (1 - sig) / (1 - sig_n)
    assert torch.allclose(pb.mean, r[:, None] * x_next, rtol=1e-12, atol=1e-15)
    assert torch.allclose(pb.std.flatten() ** 2, sig**2 - r**2 * sig_n**2, rtol=1e-12, atol=1e-15)


def test_flow_noising_scores_equal_autograd():
    lv = NoiseLevels.rectified_flow(torch.tensor([0.95, 0.6, 0.3], dtype=F64), torch.tensor([0.6, 0.3, 0.05], dtype=F64))
    g = torch.Generator().manual_seed(7)
    x_t = torch.randn(3, 5, dtype=F64, generator=g).requires_grad_(True)
    x_next = torch.randn(3, 5, dtype=F64, generator=g).requires_grad_(True)
    gt, gn = torch.autograd.grad(noising_kernel(x_next, lv).log_prob(x_t).sum(), (x_t, x_next))
    assert torch.allclose(noising_score_t(x_t.detach(), x_next.detach(), lv), gt, rtol=1e-12, atol=1e-10)
    assert torch.allclose(noising_score_next(x_t.detach(), x_next.detach(), lv), gn, rtol=1e-12, atol=1e-10)


# -- the VP instance is the old ᾱ arithmetic, bit for bit -----------------------------------------------------
@pytest.mark.parametrize("eta", [1.0, 0.3])
def test_vp_kernels_bit_identical_to_the_alpha_bar_form(eta):
    ns = NoiseSchedule.from_config({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                                    "steps_offset": 1}, 20)
    g = torch.Generator().manual_seed(8)
    step = torch.arange(20)
    x, eps, y = torch.randn(3, 20, 4, 4, 4, generator=g)
    _, _, a, an = ns.at_steps(step)
    a4, an4 = a[:, None, None, None], an[:, None, None, None]
    # the pre-interpolant formulas, inline
    std = eta * ((1 - an4) / (1 - a4) * (1 - a4 / an4)).clamp(min=0).sqrt()
    x0 = (x - (1 - a4).sqrt() * eps) / a4.sqrt()
    mean = an4.sqrt() * x0 + (1 - an4 - std**2).clamp(min=0).sqrt() * eps
    kern = ns.forward_kernel(x, eps, step, eta)
    assert torch.equal(kern.mean, mean) and torch.equal(kern.std, std)
    assert torch.equal(forward_kernel(x, eps, a, an, eta).mean, mean)
    ratio = a4 / an4
    pb = ns.backward_kernel(y, step)
    assert torch.equal(pb.mean, ratio.sqrt() * y) and torch.equal(pb.std, (1 - ratio).sqrt())
    assert torch.equal(ns.score_pb_next(x, y, step), ratio.sqrt() * (x - ratio.sqrt() * y) / (1 - ratio))
    assert torch.equal(ns.predict_x0(x, eps, step), x0)


# -- memorylessness ----------------------------------------------------------------------------------------
def test_sqrt2_flow_sde_is_adjoint_matchings_memoryless_sde_in_continuous_time():
    """With a = √2 the Flow-GRPO SDE's drift and diffusion (τ = 1 − σ time, velocity u_τ = x0 − ε = −u) are
    Adjoint Matching's memoryless ones, 2u_τ − x/τ and 2(1 − τ)/τ; with a = 0.7 the diffusion is 0.245×."""
    g = torch.Generator().manual_seed(9)
    x, u = torch.randn(2, 4, dtype=F64, generator=g)
    h = 1e-7
    for sigma in (0.9, 0.5, 0.2):
        tau = 1 - sigma
        for a, ratio in ((math.sqrt(2), 1.0), (0.7, 0.245)):
            kern = step_kernel(x, u, _flow_levels(sigma, sigma - h), a, kind="flow_sde", output_type="flow")
            drift_tau = (kern.mean - x) / h
            diffusion = float(kern.std.flatten()[0]) ** 2 / h
            assert math.isclose(diffusion, ratio * 2 * (1 - tau) / tau, rel_tol=1e-9)
            if a == math.sqrt(2):
                assert torch.allclose(drift_tau, 2 * (-u) - x / tau, rtol=1e-6, atol=1e-6)


def _gaussian_velocity(x, sigma, m, s0):
    """Exact rectified-flow velocity E[ε − x0 | x] for 1-D data x0 ~ N(m, s0²)."""
    alpha = 1 - sigma
    var = alpha**2 * s0**2 + sigma**2
    resid = x - alpha * m
    return sigma * resid / var - (m + alpha * s0**2 * resid / var)


def _memory(schedule, a, m=0.5, s0=0.3):
    """∂E[x_final | x_start]/∂x_start of the Flow-GRPO chain with the exact velocity (the chain of means is
    affine in x_start: the noise never depends on the state)."""
    x_start = torch.zeros(1, 1, dtype=F64, requires_grad=True)
    x = x_start
    for k in range(schedule.num_steps):
        sigma = float(schedule.sigmas[k])
        u = _gaussian_velocity(x, sigma, m, s0)
        x = schedule.forward_kernel(x, u, torch.tensor([k]), a).mean
    (grad,) = torch.autograd.grad(x.sum(), x_start)
    return float(grad)


def test_memorylessness_of_the_discrete_flow_grpo_chain():
    """The claim "a = √2 makes the chain memoryless" holds only in the limit of many steps; exactly, in
    discrete time, Flow-GRPO's first step (σ = 1, the next grid value σ_1 in the ratio) maps
    x_start ↦ (σ_1 − a²/2)·x_start + (1 − σ_1)·E[x0] + a·z for *any* data (at σ = 1 the exact velocity is
    x − E[x0]), so the chain forgets its start iff a = √(2σ_1). Measured on unit-variance Gaussian data
    (correlation of x_start and x_final): a = 0.7 keeps 0.13-0.18 at 10-160 steps (not memoryless, as
    claimed); a = √2 keeps < 1e-4 and shrinks with the steps; a = √(2σ_1) keeps exactly 0."""
    for K in (10, 40, 160):
        ns = NoiseSchedule.from_flow_match_config({"shift": 3.0}, K)
        s1 = float(ns.sigmas[1])
        for a in (0.7, math.sqrt(2)):
            for m, s0 in ((0.5, 0.3), (-1.0, 2.0)):
                x = torch.tensor([[0.0], [1.0]], dtype=F64)
                kern = ns.forward_kernel(x, _gaussian_velocity(x, 1.0, m, s0), torch.zeros(2, dtype=torch.int64), a)
                assert math.isclose(float(kern.mean[1] - kern.mean[0]), s1 - a**2 / 2, rel_tol=1e-12)
                assert math.isclose(float(kern.std[0]), a, rel_tol=1e-12)
        assert abs(_memory(ns, math.sqrt(2 * s1), 0.0, 1.0)) < 1e-15
        assert abs(_memory(ns, 0.7, 0.0, 1.0)) > 0.1
        assert abs(_memory(ns, math.sqrt(2), 0.0, 1.0)) < 1e-4
    m10 = abs(_memory(NoiseSchedule.from_flow_match_config({"shift": 3.0}, 10), math.sqrt(2), 0.0, 1.0))
    m160 = abs(_memory(NoiseSchedule.from_flow_match_config({"shift": 3.0}, 160), math.sqrt(2), 0.0, 1.0))
    assert m160 < m10 / 100

"""Every timestep spacing × zero-terminal-SNR × prediction type × final alpha-bar rule either samples end
to end with the chain intact, or is refused up front with an error that says why and what to use.

The policy is a fixed smooth function answering in the config's ``prediction_type`` and converted to ε
exactly as the Stable Diffusion backbone does (:func:`model_output_to_eps`); the schedule comes from the
backbone's own :func:`schedule_from_scheduler_config`.

Rectified-flow schedules (FlowMatchEulerDiscreteScheduler configs: SD3's static shift, FLUX's dynamic mu)
are walked too, over every kernel and both final sigmas: their grids start at sigma = 1 (zero SNR), which
the velocity output handles; a ddim or cps kernel landing on sigma = 0 has no density and is refused with
the reason and the fix when its log-probability is asked for.
"""

import itertools

import pytest
import torch

from gfnalign.backbones.sd import schedule_from_scheduler_config
from gfnalign.core.kernels import forward_kernel
from gfnalign.core.parametrization import model_output_to_eps
from gfnalign.core.schedule import NoiseSchedule, alphas_cumprod_from_config, make_timesteps
from gfnalign.sampling.rollout import recompute_log_pf, rollout

T = 1000
SD = dict(num_train_timesteps=T, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False)


class FixedNet:
    """A deterministic "network" whose output is in the schedule's prediction type."""

    def __init__(self, schedule):
        self.schedule = schedule

    def eps(self, x, t, cond, *, reference=False):
        ab = self.schedule.alpha_bar_of_timestep(t, x.dtype)
        out = 0.3 * torch.tanh(x) + 0.1 * (t.to(x.dtype) / T).reshape(-1, 1, 1, 1)
        return model_output_to_eps(out, x, ab, self.schedule.prediction_type)


# diffusers adds steps_offset to the leading grid only, so the other spacings are walked with offset 0
SPACINGS = [("leading", 0), ("leading", 1), ("trailing", 0), ("linspace", 0)]
CASES = [(sp, off, *rest) for (sp, off), *rest in itertools.product(
    SPACINGS,
    [False, True],  # rescale_betas_zero_snr
    ["epsilon", "v_prediction", "sample"],  # prediction_type
    [10, 30],  # inference steps: K | T and K ∤ T
    [False, True],  # set_alpha_to_one (True: diffusers' last step is deterministic)
)]


@pytest.mark.parametrize("spacing,offset,zero_snr,prediction,K,to_one", CASES)
def test_every_schedule_combination_works_or_is_refused(spacing, offset, zero_snr, prediction, K, to_one):
    cfg = {**SD, "_class_name": "DDIMScheduler", "timestep_spacing": spacing, "steps_offset": offset,
           "rescale_betas_zero_snr": zero_snr, "prediction_type": prediction, "set_alpha_to_one": to_one}
    ts = make_timesteps(T, K, spacing, offset)
    ac = alphas_cumprod_from_config(cfg).double()
    if bool((ac[ts] == 0).any()):  # zero-SNR grid point: x̂0 is undefined in ε form
        with pytest.raises(ValueError, match="alpha-bar is 0.*use timestep_spacing='leading'"):
            schedule_from_scheduler_config(cfg, K)
        return
    if int(ts[-1]) == 0:  # the last step would go from alpha_bar[0] to alpha_bar[0]
        with pytest.raises(ValueError, match=f"{spacing}.*ends the grid at timestep 0.*use timestep_spacing='trailing'"):
            schedule_from_scheduler_config(cfg, K)
        return
    sched = schedule_from_scheduler_config(cfg, K)
    assert sched.prediction_type == prediction
    # the chain: each step lands on the next grid point; the last on alpha_bar[0] (a density, even if to_one)
    assert sched.timesteps.tolist() == ts.tolist()
    assert torch.equal(sched.next_timesteps[:-1], sched.timesteps[1:])
    assert torch.equal(sched.alpha_bars_next[:-1], sched.alpha_bars[1:])
    assert float(sched.alpha_bars_next[-1]) == float(ac[0])
    # end to end: sample, then recompute every log P_F from the recorded transitions
    policy = FixedNet(sched)
    g = torch.Generator().manual_seed(0)
    x_init = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    traj = rollout(policy, None, x_init, generator=g)
    assert bool(torch.isfinite(traj.states).all()) and bool(torch.isfinite(traj.log_pf).all())
    B, K_ = traj.batch_size, traj.num_steps
    slot = torch.arange(K_).repeat(B)
    batch = traj.transitions(torch.arange(B).repeat_interleave(K_), slot)
    log_pf, _, _ = recompute_log_pf(policy, batch)
    assert torch.allclose(log_pf, traj.log_pf.reshape(-1), rtol=1e-10, atol=1e-8)
    # the state each step starts from is the state the previous step landed on, at the grid's noise level
    t, t_next, a, a_next = sched.at_steps(batch.step, dtype=torch.float64)
    assert torch.equal(t_next.reshape(B, K_)[:, :-1], t.reshape(B, K_)[:, 1:])
    assert torch.equal(a_next.reshape(B, K_)[:, :-1], a.reshape(B, K_)[:, 1:])


def test_zero_snr_leading_v_prediction_matches_diffusers_ddim():
    """The recipe zero-SNR models use with a grid whose points keep alpha-bar > 0: the kernel equals
    diffusers' DDIM step on the same v-prediction and noise."""
    diffusers = pytest.importorskip("diffusers")
    kw = dict(SD, rescale_betas_zero_snr=True, prediction_type="v_prediction", steps_offset=1, set_alpha_to_one=False)
    sch = diffusers.DDIMScheduler(**kw)
    sch.set_timesteps(10)
    sched = schedule_from_scheduler_config(sch, 10)
    g = torch.Generator().manual_seed(3)
    for k in (0, 5, 9):
        x, v, z = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
        ref = sch.step(v, sch.timesteps[k], x, eta=1.0, variance_noise=z).prev_sample
        _, _, a, an = sched.at_steps(torch.full((2,), k), dtype=torch.float64)
        eps = model_output_to_eps(v.double(), x.double(), a, "v_prediction")
        ours = forward_kernel(x.double(), eps, a, an).sample(z.double())
        assert torch.allclose(ours.float(), ref, atol=5e-4, rtol=1e-4), (k, (ours.float() - ref).abs().max())


class FixedVelocityNet:
    """A deterministic rectified-flow "network": a smooth velocity of the state and the timestep."""

    def __init__(self, schedule):
        self.schedule = schedule

    def eps(self, x, t, cond, *, reference=False):
        return 0.3 * torch.tanh(x) + 0.1 * (t.to(x.dtype) / T).reshape(-1, 1, 1, 1)


FLOW_CONFIGS = {
    "sd3_shift1": {"shift": 1.0},
    "sd3_shift3": {"shift": 3.0},
    "flux_dynamic": {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15},
}
# final sigma: 0 (diffusers: the clean image) or half the last grid sigma (a stochastic last step)
FLOW_CASES = list(itertools.product(sorted(FLOW_CONFIGS), [10, 30], ["flow_sde", "ddim", "cps"], ["zero", "half"]))


@pytest.mark.parametrize("config_name,K,kernel,final", FLOW_CASES)
def test_every_flow_schedule_combination_works_or_is_refused(config_name, K, kernel, final):
    cfg = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": T, **FLOW_CONFIGS[config_name]}
    # FLUX's pipeline passes sigmas = linspace(1, 1/K, K) and mu from the packed latent length
    kw = {"sigmas": torch.linspace(1, 1 / K, K).tolist(), "image_seq_len": 4096} if cfg.get("use_dynamic_shifting") else {}
    grid = NoiseSchedule.from_flow_match_config(cfg, K, **kw)
    final_sigma = 0.0 if final == "zero" else float(grid.sigmas[-1]) / 2
    # through the backbones' own entry point (the SD3 and FLUX backbones build their schedule with it)
    sched = schedule_from_scheduler_config(cfg, K, kernel=kernel, final_sigma=final_sigma, **kw)
    assert sched.interpolant == "rectified_flow" and sched.kernel == kernel
    assert torch.equal(sched.sigmas, grid.sigmas)
    # the chain: sigmas, timesteps and alpha-bars of each step's landing point are the next step's start
    assert float(sched.sigmas[0]) == 1.0 and float(sched.alpha_bars[0]) == 0.0  # zero SNR at the start
    assert torch.equal(sched.sigmas_next[:-1], sched.sigmas[1:])
    assert torch.equal(sched.next_timesteps[:-1], sched.timesteps[1:])
    assert torch.equal(sched.alpha_bars_next[:-1], sched.alpha_bars[1:])
    assert float(sched.sigmas_next[-1]) == final_sigma
    policy = FixedVelocityNet(sched)
    g = torch.Generator().manual_seed(1)
    x_init = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    if kernel != "flow_sde" and final_sigma == 0.0:  # the last step lands exactly on x̂0: no density
        with pytest.raises(ValueError, match="zero variance.*final_sigma > 0.*flow_sde kernel"):
            rollout(policy, None, x_init, eta=0.7, generator=g)
        return
    traj = rollout(policy, None, x_init, eta=0.7, generator=g)
    assert bool(torch.isfinite(traj.states).all()) and bool(torch.isfinite(traj.log_pf).all())
    B, K_ = traj.batch_size, traj.num_steps
    batch = traj.transitions(torch.arange(B).repeat_interleave(K_), torch.arange(K_).repeat(B))
    log_pf, _, _ = recompute_log_pf(policy, batch, eta=0.7)
    assert torch.allclose(log_pf, traj.log_pf.reshape(-1), rtol=1e-10, atol=1e-8)


def test_a_broken_chain_is_refused():
    good = NoiseSchedule.from_config({**SD, "steps_offset": 1}, 10)
    nxt = good.next_timesteps.clone()
    nxt[:-1] += 1  # diffusers-style successors that miss the next grid point by one timestep
    with pytest.raises(ValueError, match="land on the next grid point"):
        NoiseSchedule(alphas_cumprod=good.alphas_cumprod, timesteps=good.timesteps, next_timesteps=nxt,
                      alpha_bars=good.alpha_bars,
                      alpha_bars_next=torch.cat([good.alphas_cumprod[nxt[:-1]], good.alpha_bars_next[-1:]]))
    flow = NoiseSchedule.rectified_flow(torch.linspace(1.0, 0.1, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="land on the next grid sigma"):
        NoiseSchedule(alphas_cumprod=flow.alphas_cumprod, timesteps=flow.timesteps, next_timesteps=flow.next_timesteps,
                      alpha_bars=flow.alpha_bars, alpha_bars_next=flow.alpha_bars_next, prediction_type="flow",
                      interpolant="rectified_flow", sigmas=flow.sigmas, sigmas_next=flow.sigmas_next * 0.99)

"""NoiseSchedule grids and alpha-bars equal diffusers' DDIM/DDPM schedulers."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from gfnalign.core import NoiseSchedule  # noqa: E402
from gfnalign.core.schedule import make_timesteps  # noqa: E402

SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("K", [10, 50, 7])
def test_ddim_grid_matches_diffusers(spacing, offset, K):
    sch = diffusers.DDIMScheduler(**SD, timestep_spacing=spacing, steps_offset=offset, set_alpha_to_one=False)
    sch.set_timesteps(K)
    assert make_timesteps(1000, K, spacing, offset).tolist() == sch.timesteps.tolist()
    if int(sch.timesteps[-1]) == 0:
        # diffusers' grid ends with a step from t = 0 to the final alpha-bar = alpha_bar[0]: a no-op step
        # without density, which NoiseSchedule refuses, saying why and what to use
        with pytest.raises(ValueError, match="ends the grid at timestep 0.*trailing"):
            NoiseSchedule.from_config(sch.config, K)
        return
    ns = NoiseSchedule.from_config(sch.config, K)
    assert ns.timesteps.tolist() == sch.timesteps.tolist()
    ac = sch.alphas_cumprod.double()
    assert torch.allclose(ns.alpha_bars, ac[sch.timesteps], rtol=0, atol=1e-12)
    # each step lands on the next grid point, and the last one on diffusers' final alpha-bar
    assert ns.next_timesteps[:-1].tolist() == sch.timesteps[1:].tolist()
    assert float(ns.alpha_bars_next[-1]) == pytest.approx(float(sch.final_alpha_cumprod), abs=1e-12)
    # where diffusers' own successor rule t - T // K hits the next grid point, the two agree exactly
    prev = sch.timesteps - sch.config.num_train_timesteps // K
    expect_next = torch.where(prev >= 0, ac[prev.clamp(min=0)], torch.tensor(float(sch.final_alpha_cumprod)).double())
    if spacing == "leading" or 1000 % K == 0:
        assert torch.allclose(ns.alpha_bars_next, expect_next, rtol=0, atol=1e-12)
        assert ns.next_timesteps.tolist() == prev.clamp(min=0).tolist()


def test_trailing_with_k_not_dividing_t_keeps_the_chain():
    """Trailing spacing with K ∤ T: diffusers' successor t - T // K misses the next grid point at some steps
    (10 of 29 at K = 30); here every step lands on the next grid point."""
    sch = diffusers.DDIMScheduler(**SD, timestep_spacing="trailing", set_alpha_to_one=False)
    sch.set_timesteps(30)
    diffusers_next = sch.timesteps[:-1] - 1000 // 30
    assert int((diffusers_next != sch.timesteps[1:]).sum()) == 10
    ns = NoiseSchedule.from_config(sch.config, 30)
    assert torch.equal(ns.next_timesteps[:-1], ns.timesteps[1:])
    assert torch.equal(ns.alpha_bars_next[:-1], ns.alpha_bars[1:])


def test_schedule_rejects_a_broken_chain():
    ns = NoiseSchedule.from_config({**SD, "steps_offset": 1}, 10)
    with pytest.raises(ValueError, match="next grid point"):
        NoiseSchedule(
            alphas_cumprod=ns.alphas_cumprod, timesteps=ns.timesteps, next_timesteps=ns.next_timesteps - 1,
            alpha_bars=ns.alpha_bars, alpha_bars_next=ns.alphas_cumprod[ns.next_timesteps - 1].clone()
            .index_put_((torch.tensor([9]),), ns.alpha_bars_next[9:]),
        )


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_ddpm_grid_matches_diffusers(spacing):
    sch = diffusers.DDPMScheduler(**SD, timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    sch.set_timesteps(20)
    if int(sch.timesteps[-1]) == 0:  # ends with a step from t = 0 to alpha-bar 1
        assert make_timesteps(1000, 20, spacing, 0).tolist() == sch.timesteps.tolist()
        return
    ns = NoiseSchedule.from_config(sch, 20)  # a live scheduler object: DDPM is recognised by its type
    assert ns.timesteps.tolist() == sch.timesteps.tolist()
    # DDPM steps to alpha-bar 1 at the end
    assert float(ns.alpha_bars_next[-1]) == 1.0
    assert float(NoiseSchedule.from_config(sch.config, 20).alpha_bars_next[-1]) == 1.0  # bare config dict too
    nxt = [int(sch.previous_timestep(t)) for t in sch.timesteps]
    assert ns.next_timesteps.tolist() == [max(n, 0) for n in nxt]


def test_sd15_grid_constants():
    sch = diffusers.DDIMScheduler(**SD, steps_offset=1, set_alpha_to_one=False)
    ns = NoiseSchedule.from_config(sch.config, 50)
    assert ns.timesteps[0] == 981 and ns.timesteps[-1] == 1 and ns.next_timesteps[-1] == 0
    assert abs(float(ns.alpha_bars[0]) - 0.00578) < 1e-5
    assert abs(float(ns.alpha_bars_next[-1]) - 0.99915) < 1e-5


def test_from_config_rejects_clip_sample():
    with pytest.raises(ValueError, match="clip_sample"):
        NoiseSchedule.from_config({**SD, "clip_sample": True}, 10)


def test_at_steps_bounds():
    ns = NoiseSchedule.from_config({**SD, "steps_offset": 1}, 10)
    with pytest.raises(IndexError):
        ns.at_steps(torch.tensor([10]))
    t, tn, a, an = ns.at_steps(torch.tensor([0, 9]), dtype=torch.float64)
    assert t.tolist() == [901, 1] and tn.tolist() == [801, 0] and a.dtype == torch.float64

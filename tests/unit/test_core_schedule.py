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
        # without density, which NoiseSchedule refuses with a clear error
        with pytest.raises(ValueError, match="increase"):
            NoiseSchedule.from_config(sch.config, K)
        return
    ns = NoiseSchedule.from_config(sch.config, K)
    assert ns.timesteps.tolist() == sch.timesteps.tolist()
    ac = sch.alphas_cumprod.double()
    assert torch.allclose(ns.alpha_bars, ac[sch.timesteps], rtol=0, atol=1e-12)
    # diffusers' successor rule: t - T // K, landing on final_alpha_cumprod when negative
    prev = sch.timesteps - sch.config.num_train_timesteps // K
    expect_next = torch.where(prev >= 0, ac[prev.clamp(min=0)], torch.tensor(float(sch.final_alpha_cumprod)).double())
    assert torch.allclose(ns.alpha_bars_next, expect_next, rtol=0, atol=1e-12)
    assert ns.next_timesteps.tolist() == prev.clamp(min=0).tolist()


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

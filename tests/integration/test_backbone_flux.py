"""FLUX backbone on tiny random components built from configs (no downloads): the guided velocity equals
FluxPipeline's at every step (packed latents, ids, guidance embedding, resolution shift mu), a kernel step at
a = 0 is FlowMatchEulerDiscreteScheduler.step, LoRA round-trips through FluxPipeline.load_lora_weights."""

import copy

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from gfnalign.backbones.flux import (  # noqa: E402
    FluxBackbone,
    latent_image_ids,
    pack_latents,
    random_flux_components,
    unpack_latents,
)
from gfnalign.core.schedule import flux_shift_mu  # noqa: E402
from gfnalign.sampling import rollout  # noqa: E402

PROMPTS = ["a handwritten digit seven", "a handwritten digit one"]
IMAGE = 16  # 8×8 latents: 16 packed patches


def _backbone(parts=None, **kw):
    parts = parts or random_flux_components(seed=0)
    opts = dict(num_inference_steps=4, guidance_scale=3.5, eta=0.7, max_sequence_length=8, lora_rank=2,
                image_size=IMAGE)
    opts.update(kw)
    return FluxBackbone(**parts, **opts)


def _pipeline(parts):
    pipe = diffusers.FluxPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_pack_and_ids_are_the_pipelines():
    x = torch.randn(2, 4, 8, 6)
    packed = pack_latents(x)
    assert torch.equal(packed, diffusers.FluxPipeline._pack_latents(x, 2, 4, 8, 6))
    assert torch.equal(unpack_latents(packed, 8, 6), x)
    assert torch.equal(latent_image_ids(8, 6, "cpu", torch.float32),
                       diffusers.FluxPipeline._prepare_latent_image_ids(2, 4, 3, "cpu", torch.float32))


@pytest.mark.parametrize("guidance_embeds", [True, False])
def test_flux_velocity_equals_the_pipeline_at_every_step(guidance_embeds):
    """The pipeline's transformer outputs are recorded per step and compared with the backbone's guided
    velocity on the same states; the a = 0 chain lands on the pipeline's latents."""
    parts = random_flux_components(seed=1, guidance_embeds=guidance_embeds)
    bb = _backbone(copy.deepcopy(parts), lora_rank=0)
    pipe = _pipeline(parts)
    seen = []
    forward = pipe.transformer.forward

    def recording(*args, **kwargs):
        out = forward(*args, **kwargs)
        seen.append(out[0].detach().clone())
        return out

    pipe.transformer.forward = recording
    x = torch.randn(2, *bb.latent_shape, generator=torch.Generator().manual_seed(0))
    ref = pipe(PROMPTS, height=IMAGE, width=IMAGE, num_inference_steps=4, guidance_scale=3.5,
               latents=pack_latents(x), output_type="latent", max_sequence_length=8).images
    sched = bb.schedule
    # the resolution shift: mu from the scheduler config at (8/2)·(8/2) = 16 patches
    assert torch.allclose(sched.sigmas.float(), pipe.scheduler.sigmas[:-1]), (sched.sigmas, pipe.scheduler.sigmas)
    assert sched.interpolant == "rectified_flow" and sched.kernel == "flow_sde"
    cond = bb.encode_prompts(PROMPTS)
    z = x.clone()
    for k in range(sched.num_steps):
        step = torch.full((2,), k)
        t = sched.at_steps(step)[0]
        v = bb.eps(z, t, cond)
        assert torch.allclose(pack_latents(v), seen[k], atol=1e-6), k
        z = sched.forward_kernel(z, v, step, 0.0).mean  # a = 0: the Euler step
    assert len(seen) == 4 and torch.allclose(pack_latents(z), ref, atol=1e-5)
    if guidance_embeds:  # the guidance scale moves the velocity through the embedding (one pass, no CFG)
        t0 = sched.at_steps(torch.zeros(2, dtype=torch.int64))[0]
        assert not torch.allclose(bb.eps(x, t0, cond), bb.eps(x, t0, cond, guidance_scale=1.0), atol=1e-5)
        assert torch.equal(bb.cond_eps(x, t0, cond), bb.eps(x, t0, cond))


def test_flux_kernel_at_zero_noise_is_the_scheduler_step():
    bb = _backbone(lora_rank=0, num_inference_steps=6)
    sched = diffusers.FlowMatchEulerDiscreteScheduler(**dict(bb.scheduler.config))
    mu = flux_shift_mu(16, dict(bb.scheduler.config))
    sched.set_timesteps(sigmas=[1 - k / 6 for k in range(6)], mu=mu)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, *bb.latent_shape, generator=gen)
    for k in range(6):
        v = torch.randn(x.shape, generator=gen)
        ours = bb.schedule.forward_kernel(x, v, torch.full((3,), k), 0.0).mean
        theirs = sched.step(v, sched.timesteps[k], x, return_dict=False)[0]
        assert torch.allclose(ours, theirs, atol=1e-6), k
        assert float(bb.schedule.timesteps[k]) == pytest.approx(float(sched.timesteps[k]))
        x = theirs


def test_flux_policy_rollout_reference_and_x0():
    bb = _backbone()
    cond = bb.encode_prompts(PROMPTS)
    assert cond.shape == (2, 8 + 1, bb.cond_dim)
    x = bb.initial_noise(2, torch.Generator().manual_seed(0))
    traj = rollout(bb, cond, x, eta=0.7, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(traj.log_pf).all() and traj.states.shape == (2, 5, *bb.latent_shape)
    t = bb.schedule.at_steps(torch.full((2,), 1))[0]
    v_ref = bb.eps(x, t, cond, reference=True)
    assert torch.equal(v_ref, bb.eps(x, t, cond))  # the LoRA starts at zero
    with torch.no_grad():
        for p in bb.trainable_parameters():
            p.add_(0.05)
    assert not torch.allclose(v_ref, bb.eps(x, t, cond), atol=1e-4)
    assert torch.equal(v_ref, bb.eps(x, t, cond, reference=True))
    sigma = bb.schedule.sigma_of_timestep(t)[:, None, None, None].float()
    assert torch.allclose(bb.predict_x0(x, t, cond), x - sigma * bb.eps(x, t, cond), atol=1e-6)
    images = bb.decode(traj.final)
    assert images.shape == (2, 3, IMAGE, IMAGE) and 0 <= float(images.min())


def test_flux_lora_round_trips_through_load_lora_weights(tmp_path):
    parts = random_flux_components(seed=2)
    bb = _backbone(copy.deepcopy(parts))
    fresh = _backbone(copy.deepcopy(parts))
    with torch.no_grad():
        for p in bb.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    bb.save_adapter(tmp_path / "lora")
    cond = bb.encode_prompts(PROMPTS)
    x = bb.initial_noise(2, torch.Generator().manual_seed(3))
    step = torch.zeros(2, dtype=torch.int64)
    t = bb.schedule.at_steps(step)[0]
    pipe = _pipeline(parts)
    z = torch.randn(2, *bb.latent_shape, generator=torch.Generator().manual_seed(4))
    base = pipe(PROMPTS, height=IMAGE, width=IMAGE, num_inference_steps=4, latents=pack_latents(z),
                output_type="latent", max_sequence_length=8).images
    pipe.load_lora_weights(tmp_path / "lora")
    tuned = pipe(PROMPTS, height=IMAGE, width=IMAGE, num_inference_steps=4, latents=pack_latents(z),
                 output_type="latent", max_sequence_length=8).images
    assert not torch.allclose(base, tuned, atol=1e-4)
    # the loaded pipeline's a = 0 chain is the trained backbone's
    w = z.clone()
    for k in range(4):
        s = torch.full((2,), k)
        w = bb.schedule.forward_kernel(w, bb.eps(w, bb.schedule.at_steps(s)[0], cond), s, 0.0).mean
    assert torch.allclose(pack_latents(w), tuned, atol=1e-5)
    fresh.load_adapter(tmp_path / "lora")
    assert torch.allclose(fresh.eps(x, t, cond), bb.eps(x, t, cond), atol=1e-6)


def test_flux_bad_input():
    with pytest.raises(ValueError, match="guidance_scale"):
        _backbone(guidance_scale=-1.0)
    with pytest.raises(ValueError, match="max_sequence_length"):
        _backbone(max_sequence_length=600)
    with pytest.raises(ValueError, match="image_size"):
        _backbone(image_size=6)  # 3×3 latents cannot be packed into 2×2 patches
    with pytest.raises(ValueError, match="cps kernel"):
        _backbone(eta=1.4, sampler_kernel="cps")

"""SD3 backbone on tiny random components built from configs (no downloads): the velocity policy, its
deterministic chain equals StableDiffusion3Pipeline's, LoRA round-trips through load_lora_weights."""

import copy

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from gfnalign.backbones.sd3 import SD3Backbone, random_sd3_components  # noqa: E402
from gfnalign.sampling import rollout  # noqa: E402

PROMPTS = ["a handwritten digit seven", "a handwritten digit one"]


def _backbone(parts=None, **kw):
    parts = parts or random_sd3_components(seed=0)
    opts = dict(num_inference_steps=4, guidance_scale=3.0, eta=0.7, max_sequence_length=8, lora_rank=2)
    opts.update(kw)
    return SD3Backbone(**parts, **opts)


def test_sd3_deterministic_chain_equals_the_pipeline():
    parts = random_sd3_components(seed=1)
    bb = _backbone(copy.deepcopy(parts), lora_rank=0)
    pipe = diffusers.StableDiffusion3Pipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    x = torch.randn(2, *bb.latent_shape, generator=torch.Generator().manual_seed(0))
    ref = pipe(PROMPTS, num_inference_steps=4, guidance_scale=3.0, latents=x.clone(), output_type="latent",
               max_sequence_length=8).images
    cond = bb.encode_prompts(PROMPTS)
    sched = bb.schedule
    assert sched.interpolant == "rectified_flow" and sched.kernel == "flow_sde"
    z = x.clone()
    for k in range(sched.num_steps):
        step = torch.full((2,), k)
        t = sched.at_steps(step)[0]
        z = sched.forward_kernel(z, bb.eps(z, t, cond), step, 0.0).mean  # a = 0: the Euler step
    assert torch.allclose(z, ref, atol=1e-5, rtol=1e-4)


def test_sd3_policy_rollout_reference_and_x0():
    bb = _backbone()
    cond = bb.encode_prompts(PROMPTS)
    assert cond.shape == (2, 16 + 8 + 1, bb.cond_dim)
    x = bb.initial_noise(2, torch.Generator().manual_seed(0))
    traj = rollout(bb, cond, x, eta=0.7, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(traj.log_pf).all() and traj.states.shape == (2, 5, *bb.latent_shape)
    t = bb.schedule.at_steps(torch.full((2,), 1))[0]
    assert t.is_floating_point()
    v_ref = bb.eps(x, t, cond, reference=True)
    assert torch.equal(v_ref, bb.eps(x, t, cond))  # the LoRA starts at zero (gaussian A, zero B)
    with torch.no_grad():
        for p in bb.trainable_parameters():
            p.add_(0.05)
    assert not torch.allclose(v_ref, bb.eps(x, t, cond), atol=1e-4)
    assert torch.equal(v_ref, bb.eps(x, t, cond, reference=True))  # adapters off: the base transformer
    sigma = bb.schedule.sigma_of_timestep(t)[:, None, None, None].float()
    assert torch.allclose(bb.predict_x0(x, t, cond), x - sigma * bb.eps(x, t, cond), atol=1e-6)
    images = bb.decode(traj.final)
    assert images.shape == (2, 3, bb.image_size, bb.image_size) and 0 <= float(images.min())


def test_sd3_lora_round_trips_through_load_lora_weights(tmp_path):
    parts = random_sd3_components(seed=2)
    bb = _backbone(copy.deepcopy(parts), lora_rank=2)
    fresh = _backbone(copy.deepcopy(parts), lora_rank=2)
    with torch.no_grad():
        for p in bb.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    bb.save_adapter(tmp_path / "lora")
    cond = bb.encode_prompts(PROMPTS)
    x = bb.initial_noise(2, torch.Generator().manual_seed(3))
    t = bb.schedule.at_steps(torch.zeros(2, dtype=torch.int64))[0]
    ours = bb.cond_eps(x, t, cond)
    pipe = diffusers.StableDiffusion3Pipeline(**parts)
    pipe.load_lora_weights(tmp_path / "lora")
    embeds, pooled = cond[:, :-1], cond[:, -1, : bb.pooled_dim]
    with torch.no_grad():
        theirs = pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=embeds, pooled_projections=pooled).sample
        base = bb.cond_eps(x, t, cond, reference=True)
    assert torch.allclose(ours, theirs, atol=1e-5) and not torch.allclose(ours, base, atol=1e-4)
    fresh.load_adapter(tmp_path / "lora")
    assert torch.allclose(fresh.cond_eps(x, t, cond), ours, atol=1e-6)


def test_sd3_with_t5_and_bad_input():
    bb = _backbone(random_sd3_components(seed=3, with_t5=True))
    assert bb.encode_prompts(PROMPTS).shape[1] == 16 + 8 + 1
    with pytest.raises(ValueError, match="eta"):
        _backbone(eta=0.0)
    with pytest.raises(ValueError, match="cps kernel"):
        _backbone(eta=1.4, sampler_kernel="cps")
    parts = random_sd3_components(seed=4)
    parts["text_encoder_3"] = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="text_encoder_3 and tokenizer_3"):
        _backbone(parts)

"""StableDiffusionXLBackbone on tiny random-initialised SDXL components built from configs (no downloads):
it answers exactly what diffusers' StableDiffusionXLPipeline computes, and its LoRA loads there."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from diffusers import DDIMScheduler, StableDiffusionXLPipeline  # noqa: E402

from gfnalign.backbones.families import backbone_class, detect_family  # noqa: E402
from gfnalign.backbones.sd import StableDiffusionBackbone  # noqa: E402
from gfnalign.backbones.sdxl import StableDiffusionXLBackbone  # noqa: E402
from gfnalign.core.kernels import forward_kernel  # noqa: E402
from gfnalign.core.protocols import PolicyModel  # noqa: E402
from tests.integration._sdxl_utils import build_tiny_sdxl, make_sdxl_pipeline  # noqa: E402

PROMPTS = ["a photo of a cat", "a red car", "the sea painting"]
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_sdxl") / "pipeline"
    make_sdxl_pipeline(build_tiny_sdxl(seed=11)).save_pretrained(d)
    return d


def _perturb_lora(b, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in b.named_trainable_parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))


def _inputs(b, n: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *b.latent_shape), generator=g)
    t = b.schedule.timesteps[torch.arange(n) % b.schedule.num_steps]
    return x, t, b.encode_prompts(PROMPTS[:n])


@pytest.fixture(scope="module")
def backbone(pipe_dir):
    b = StableDiffusionXLBackbone.from_pretrained(pipe_dir, num_inference_steps=4, guidance_scale=3.0, lora_rank=4)
    _perturb_lora(b)
    return b


def test_conditioning_matches_pipeline_encode_prompt(backbone, pipe_dir):
    b = backbone
    assert isinstance(b, PolicyModel)
    assert (b.text_len, b.text_dim, b.pooled_dim, b.cond_dim) == (16, 56, 16, 56)
    assert b.latent_shape == (4, 8, 8) and b.image_size == 16
    assert b.add_time_ids.tolist() == [[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]]
    cond = b.encode_prompts(PROMPTS)
    assert cond.shape == (3, 17, 56)
    pipe = b.pipeline()
    pe, npe, ppe, nppe = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                            do_classifier_free_guidance=True, negative_prompt=None)
    embeds, pooled = b.unpack_cond(cond)
    assert torch.equal(embeds, pe) and torch.equal(pooled, ppe)
    assert torch.equal(b.pack_cond(pe, ppe), cond)
    # force_zeros_for_empty_prompt: the cached negative is all zeros, as the pipeline's
    un_e, un_p = b.unpack_cond(b.uncond_embedding)
    assert torch.equal(un_e.expand(3, -1, -1), npe) and torch.equal(un_p.expand(3, -1), nppe)
    assert torch.count_nonzero(b.uncond_embedding) == 0
    # an explicit negative prompt is encoded like the pipeline's
    neg = StableDiffusionXLBackbone.from_pretrained(pipe_dir, negative_prompt="blue tree", num_inference_steps=4,
                                                    lora_rank=0)
    _, npe2, _, nppe2 = neg.pipeline().encode_prompt(PROMPTS[:1], device="cpu", do_classifier_free_guidance=True,
                                           negative_prompt=["blue tree"])
    assert torch.equal(neg.uncond_embedding, b.pack_cond(npe2, nppe2))


def test_guided_eps_equals_the_pipelines_at_every_step(backbone):
    """Run StableDiffusionXLPipeline itself (same modules, LoRA active) and capture every UNet call: our guided ε
    at the latents it was called with equals the pipeline's CFG-combined noise prediction."""
    b = backbone
    pipe = b.pipeline()
    pipe.scheduler = DDIMScheduler.from_config(b.scheduler.config)
    calls = []
    hook = pipe.unet.register_forward_hook(
        lambda mod, args, kwargs, out: calls.append((args[0].detach(), args[1], out.sample.detach() if hasattr(out, "sample") else out[0].detach())),
        with_kwargs=True,
    )
    try:
        with torch.no_grad():
            x = torch.randn((3, *b.latent_shape), generator=torch.Generator().manual_seed(3))
            pipe(PROMPTS, num_inference_steps=b.num_inference_steps, guidance_scale=3.0, latents=x.clone(),
                 output_type="latent", eta=1.0, generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    assert len(calls) == b.schedule.num_steps
    cond = b.encode_prompts(PROMPTS)
    for k, (x_in, t, out) in enumerate(calls):
        assert int(t) == int(b.schedule.timesteps[k])
        x_k = x_in[3:]  # the pipeline batches [uncond, cond]; both halves hold the same latents
        assert torch.equal(x_in[:3], x_k)
        out_u, out_c = out.chunk(2)
        theirs = out_u + 3.0 * (out_c - out_u)
        with torch.no_grad():
            ours = b.eps(x_k, torch.full((3,), int(t)), cond)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # the reference (adapters off) differs from the LoRA policy
    with torch.no_grad():
        assert (b.eps(x, b.schedule.timesteps[:1], cond, reference=True) - b.eps(x, b.schedule.timesteps[:1], cond)).abs().max() > 1e-3


def test_one_ddim_eta_step_equals_the_pipeline_scheduler_step(backbone):
    b = backbone
    sched = DDIMScheduler.from_config(b.scheduler.config)
    sched.set_timesteps(b.schedule.num_steps)
    assert torch.equal(sched.timesteps, b.schedule.timesteps)
    x, _, cond = _inputs(b, seed=4)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    for k in (0, b.schedule.num_steps - 1):
        for eta in (1.0, 0.5):
            t, _, a, an = b.schedule.at_steps(torch.full((len(x),), k))
            with torch.no_grad():
                eps = b.eps(x, t, cond)
            ours = forward_kernel(x, eps, a, an, eta=eta).sample(noise)
            theirs = sched.step(eps, int(t[0]), x, eta=eta, variance_noise=noise).prev_sample
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_lora_loads_in_plain_diffusers_and_changes_the_output(backbone, pipe_dir, tmp_path):
    b = backbone
    b.save_adapter(tmp_path / "lora")
    x, t, cond = _inputs(b, seed=2)
    pipe = StableDiffusionXLPipeline.from_pretrained(pipe_dir, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    latents = torch.randn((1, *b.latent_shape), generator=torch.Generator().manual_seed(5))

    def sample():
        with torch.no_grad():
            return pipe(PROMPTS[:1], num_inference_steps=3, guidance_scale=3.0, latents=latents.clone(),
                        output_type="latent").images

    before = sample()
    pipe.load_lora_weights(tmp_path / "lora")
    after = sample()
    assert (after - before).abs().max() > 1e-3  # the LoRA changes what plain diffusers samples
    embeds, pooled = b.unpack_cond(cond)
    kw = {"encoder_hidden_states": embeds,
          "added_cond_kwargs": {"text_embeds": pooled, "time_ids": b.add_time_ids.expand(3, -1)}}
    with torch.no_grad():
        theirs = pipe.unet(x, t, **kw).sample
        ours = b.unet(x, t, **kw).sample
    assert torch.equal(ours, theirs)
    # and back into a fresh gfnalign backbone
    b2 = StableDiffusionXLBackbone.from_pretrained(pipe_dir, num_inference_steps=4, guidance_scale=3.0, lora_rank=4)
    b2.load_adapter(tmp_path / "lora")
    assert torch.equal(b2.cond_eps(x, t, cond).detach(), b.cond_eps(x, t, cond).detach())


def test_gradients_reach_only_the_lora_and_heads_fit_the_packed_cond(backbone):
    b = backbone
    x, t, cond = _inputs(b)
    step = torch.arange(len(x)) % b.schedule.num_steps
    _, _, a, an = b.schedule.at_steps(step)
    kernel = forward_kernel(x, b.eps(x, t, cond), a, an, eta=b.eta)
    for p in b.trainable_parameters():
        p.grad = None
    kernel.log_prob(kernel.sample(torch.randn_like(x)).detach()).sum().backward()
    assert all(p.grad is not None for p in b.trainable_parameters())
    for m in (b.vae, b.text_encoder, b.text_encoder_2):
        assert all(p.grad is None for p in m.parameters())
    flow, score = b.make_log_flow_head(), b.make_flow_score_head()
    assert flow(x, t, cond).shape == (3,) and score(x, t, cond).shape == x.shape
    img = b.decode(b.predict_x0(x, t, cond).detach())
    assert img.shape == (3, 3, 16, 16) and 0 <= img.min() and img.max() <= 1


def test_fp16_vae_is_upcast_and_latent_statistics_are_undone():
    c = build_tiny_sdxl(seed=2)
    b = StableDiffusionXLBackbone(**c, num_inference_steps=4, dtype="fp16", lora_rank=2)
    assert b.unet.dtype == torch.float16 and b.text_encoder_2.dtype == torch.float16
    assert b.vae.dtype == torch.float32  # force_upcast: SDXL's VAE overflows in float16
    assert {p.dtype for p in b.trainable_parameters()} == {torch.float32}
    c = build_tiny_sdxl(seed=2)
    c["vae"].register_to_config(force_upcast=False, latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[2.0, 1.0, 0.5, 1.5])
    b = StableDiffusionXLBackbone(**c, num_inference_steps=4, lora_rank=0)
    z = torch.randn((2, *b.latent_shape), generator=torch.Generator().manual_seed(1))
    mean = torch.tensor([0.1, -0.2, 0.3, 0.0]).view(1, 4, 1, 1)
    std = torch.tensor([2.0, 1.0, 0.5, 1.5]).view(1, 4, 1, 1)
    with torch.no_grad():
        expected = (b.vae.decode(z * std / b.vae.config.scaling_factor + mean).sample / 2 + 0.5).clamp(0, 1)
        assert torch.equal(b.decode(z), expected)


def test_v_prediction_and_micro_conditioning_options():
    from gfnalign.core.parametrization import v_to_eps

    c = build_tiny_sdxl(seed=3, prediction_type="v_prediction")
    b = StableDiffusionXLBackbone(**c, num_inference_steps=4, guidance_scale=1.0, lora_rank=0,
                                  original_size=(32, 24), crops_coords_top_left=(4, 2), target_size=16)
    assert b.schedule.prediction_type == "v_prediction"
    assert b.add_time_ids.tolist() == [[32.0, 24.0, 4.0, 2.0, 16.0, 16.0]]
    x, t, cond = _inputs(b, n=2)
    embeds, pooled = b.unpack_cond(cond)
    with torch.no_grad():
        v = b.unet(x, t, encoder_hidden_states=embeds,
                   added_cond_kwargs={"text_embeds": pooled, "time_ids": b.add_time_ids.expand(2, -1)}).sample
        expected = v_to_eps(x, v, b.schedule.alpha_bar_of_timestep(t))
        torch.testing.assert_close(b.eps(x, t, cond), expected)
        default = StableDiffusionXLBackbone(**build_tiny_sdxl(seed=3, prediction_type="v_prediction"),
                                            num_inference_steps=4, guidance_scale=1.0, lora_rank=0)
        assert (default.eps(x, t, cond) - expected).abs().max() > 1e-4  # the micro-conditioning reaches the UNet


def test_family_detection_and_bad_inputs(backbone, pipe_dir, tmp_path):
    from gfnalign.backbones.digits_pretrain import build_components, make_pipeline

    sd_dir = tmp_path / "sd"
    make_pipeline(build_components(seed=0)).save_pretrained(sd_dir)
    assert detect_family(pipe_dir) == "sdxl" and detect_family(sd_dir) == "sd" and detect_family("org/model") is None
    assert backbone_class("sd", pipe_dir) is StableDiffusionXLBackbone  # detected from model_index.json
    assert backbone_class("sd", sd_dir) is StableDiffusionBackbone
    assert backbone_class("sdxl", "stabilityai/stable-diffusion-xl-base-1.0") is StableDiffusionXLBackbone
    with pytest.raises(ValueError, match="backbone.kind: sd"):
        backbone_class("sdxl", sd_dir)
    c = build_components(seed=0)
    sdxl = build_tiny_sdxl(seed=0)
    with pytest.raises(ValueError, match="not an SDXL UNet"):
        StableDiffusionXLBackbone(**{**sdxl, "unet": c["unet"]})
    with pytest.raises(ValueError, match="refiner"):
        StableDiffusionXLBackbone(**{**sdxl, "text_encoder": None})
    with pytest.raises(ValueError, match="original_size"):
        StableDiffusionXLBackbone(**sdxl, original_size=(16,))
    x, t, cond = _inputs(backbone)
    with pytest.raises(ValueError, match=r"SDXL conditioning \[N, 17, 56\]"):
        backbone.eps(x, t, cond[:, :16])
    with pytest.raises(FileNotFoundError, match="text_encoder_2"):
        StableDiffusionXLBackbone.from_pretrained(sd_dir)

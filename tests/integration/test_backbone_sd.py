"""StableDiffusionBackbone on tiny random-initialised components built from configs (no downloads)."""

from __future__ import annotations

import inspect

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402

from gfnalign.backbones.digits_pretrain import build_components, make_pipeline  # noqa: E402
from gfnalign.backbones.sd import StableDiffusionBackbone, schedule_from_scheduler_config  # noqa: E402
from gfnalign.core.kernels import forward_kernel  # noqa: E402
from gfnalign.core.protocols import PolicyModel  # noqa: E402

PROMPTS = ["a handwritten digit seven", "the number two written by hand", "a handwritten digit 4"]


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    """A random-init tiny SD pipeline (the digits world's configs) saved with plain diffusers."""
    d = tmp_path_factory.mktemp("tiny_sd") / "pipeline"
    make_pipeline(build_components(seed=123)).save_pretrained(d)
    return d


def _load(pipe_dir, **kw):
    opts = dict(num_inference_steps=5, guidance_scale=3.0, lora_rank=4)
    opts.update(kw)
    return StableDiffusionBackbone.from_pretrained(pipe_dir, **opts)


def _perturb_lora(b: StableDiffusionBackbone, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in b.named_trainable_parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))


def _inputs(b: StableDiffusionBackbone, n: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *b.latent_shape), generator=g)
    t = b.schedule.timesteps[torch.arange(n) % b.schedule.num_steps]
    cond = b.encode_prompts(PROMPTS[:n])
    return x, t, cond


@pytest.fixture(scope="module")
def backbone(pipe_dir):
    b = _load(pipe_dir)
    _perturb_lora(b)
    return b


def test_shapes_schedule_and_protocol(backbone, pipe_dir):
    b = backbone
    assert isinstance(b, PolicyModel)
    params = inspect.signature(b.eps).parameters
    assert list(params)[:3] == ["x", "t", "cond"] and params["reference"].kind is inspect.Parameter.KEYWORD_ONLY
    assert b.latent_shape == (4, 8, 8) and b.image_size == 16 and b.device == torch.device("cpu")
    ddim = DDIMScheduler.from_pretrained(pipe_dir, subfolder="scheduler")
    ddim.set_timesteps(5)
    assert torch.equal(b.schedule.timesteps, ddim.timesteps)
    # set_alpha_to_one=False: the last step lands on alphas_cumprod[0], exactly as diffusers' DDIM
    assert float(b.schedule.alpha_bars_next[-1]) == pytest.approx(float(ddim.final_alpha_cumprod), abs=1e-7)
    # DDPM config: the last step lands on alphas_cumprod[0] (documented) instead of a deterministic 1.0
    kw = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
    ddpm = DDPMScheduler(steps_offset=1, **kw)
    s = schedule_from_scheduler_config(ddpm, 10)
    assert float(s.alpha_bars_next[-1]) == pytest.approx(float(ddpm.alphas_cumprod[0]), abs=1e-7)
    assert float(s.alpha_bars_next[-1]) < 1.0
    assert int(s.timesteps[-1]) == 1
    with pytest.raises(ValueError, match="steps_offset=1"):
        schedule_from_scheduler_config(DDPMScheduler(steps_offset=0, **kw), 10)


def test_encode_prompts_matches_pipeline(backbone):
    pipe = backbone.pipeline()
    ref, neg = pipe.encode_prompt(PROMPTS, "cpu", 1, True, negative_prompt=[""] * len(PROMPTS))
    assert torch.equal(backbone.encode_prompts(PROMPTS), ref)
    assert torch.equal(backbone.uncond_embedding.expand(len(PROMPTS), -1, -1), neg)


def test_guided_eps_equals_manual_cfg(backbone):
    b = backbone
    x, t, cond = _inputs(b)
    unc = b.uncond_embedding.expand(len(x), -1, -1)
    with torch.no_grad():
        e_u = b.unet(x, t, encoder_hidden_states=unc).sample
        e_c = b.unet(x, t, encoder_hidden_states=cond).sample
        guided = b.eps(x, t, cond)
        g5 = b.eps(x, t, cond, guidance_scale=5.0)
    torch.testing.assert_close(guided, e_u + 3.0 * (e_c - e_u), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g5, e_u + 5.0 * (e_c - e_u), rtol=1e-5, atol=1e-5)
    # guidance 1 runs the conditional branch only, bit for bit
    assert torch.equal(b.eps(x, t, cond, guidance_scale=1.0).detach(), e_c)
    assert torch.equal(b.cond_eps(x, t, cond).detach(), e_c)


def test_reference_is_bit_identical_to_fresh_base_model(backbone, pipe_dir):
    b = backbone
    x, t, cond = _inputs(b, seed=1)
    fresh = UNet2DConditionModel.from_pretrained(pipe_dir, subfolder="unet").eval()
    with torch.no_grad():
        base = fresh(x, t, encoder_hidden_states=cond).sample
        unc = b.uncond_embedding.expand(len(x), -1, -1)
        both = fresh(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=torch.cat([unc, cond])).sample
    ref = b.cond_eps(x, t, cond, reference=True)
    assert torch.equal(ref, base) and ref.grad_fn is None
    u, c = both.chunk(2)
    assert torch.equal(b.eps(x, t, cond, reference=True), u + 3.0 * (c - u))
    # the policy (LoRA on) differs, and training flags survive the reference call
    assert (b.cond_eps(x, t, cond) - base).abs().max() > 1e-3
    assert all(p.requires_grad for p in b.trainable_parameters())
    _perturb_lora(b, seed=5)  # change the adapter again: reference unchanged
    assert torch.equal(b.cond_eps(x, t, cond, reference=True), base)


def test_lora_saved_loads_in_plain_diffusers(pipe_dir, tmp_path):
    b = _load(pipe_dir, lora_rank=4, lora_alpha=8.0)  # alpha != rank: the scale must survive the round trip
    _perturb_lora(b, seed=3)
    b.save_adapter(tmp_path / "lora")
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()
    x, t, cond = _inputs(b, seed=2)
    with torch.no_grad():
        ours = b.unet(x, t, encoder_hidden_states=cond).sample
        pipe = StableDiffusionPipeline.from_pretrained(pipe_dir, safety_checker=None, requires_safety_checker=False)
        base = pipe.unet(x, t, encoder_hidden_states=cond).sample
        pipe.load_lora_weights(tmp_path / "lora")
        theirs = pipe.unet(x, t, encoder_hidden_states=cond).sample
    assert (ours - base).abs().max() > 1e-3
    assert torch.equal(ours, theirs)
    # and back into a fresh gfnalign backbone
    b2 = _load(pipe_dir, lora_rank=4, lora_alpha=8.0)
    b2.load_adapter(tmp_path / "lora")
    assert torch.equal(b2.cond_eps(x, t, cond).detach(), b.cond_eps(x, t, cond).detach())


def test_trainable_state_roundtrip_and_gradients(pipe_dir):
    b = _load(pipe_dir)
    state0 = b.trainable_state_dict()
    n_lora = sum(v.numel() for v in state0.values())
    assert 0 < n_lora < 50_000 and all(v.dtype == torch.float32 for v in state0.values())
    x, t, cond = _inputs(b)
    # LoRA starts at zero effect (gaussian init: B = 0)
    assert torch.equal(b.eps(x, t, cond).detach(), b.eps(x, t, cond, reference=True))
    _perturb_lora(b, seed=7)
    moved = b.cond_eps(x, t, cond).detach()
    b.load_trainable_state_dict(state0)
    torch.testing.assert_close(b.cond_eps(x, t, cond).detach(), b.cond_eps(x, t, cond, reference=True), rtol=0, atol=0)
    b.load_trainable_state_dict({k: v for k, v in zip(state0, b.trainable_state_dict().values())})
    _perturb_lora(b, seed=7)
    b.load_trainable_state_dict(b.trainable_state_dict())
    assert torch.equal(b.cond_eps(x, t, cond).detach(), moved)
    with pytest.raises(KeyError, match="missing"):
        b.load_trainable_state_dict({})


def test_policy_works_with_forward_kernel_and_backprop(backbone):
    b = backbone
    x, t, cond = _inputs(b)
    step = torch.arange(len(x)) % b.schedule.num_steps
    _, _, a, an = b.schedule.at_steps(step)
    eps = b.eps(x, t, cond)
    kernel = forward_kernel(x, eps, a, an, eta=b.eta)
    x_next = kernel.sample(torch.randn_like(x)).detach()
    log_pf = kernel.log_prob(x_next)
    assert log_pf.shape == (len(x),) and torch.isfinite(log_pf).all()
    for p in b.trainable_parameters():
        p.grad = None
    log_pf.sum().backward()
    grads = [p.grad for p in b.trainable_parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    assert all(p.grad is None for p in b.vae.parameters()) and all(p.grad is None for p in b.text_encoder.parameters())


def test_forward_kernel_reproduces_the_pipeline_scheduler_step(backbone):
    """One policy step (guided eps + core kernel) equals diffusers' DDIMScheduler.step(eta=1) with that noise."""
    b = backbone
    sched = DDIMScheduler.from_config(b.scheduler.config)
    sched.set_timesteps(b.schedule.num_steps)
    x, _, cond = _inputs(b, seed=4)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    for k in (0, b.schedule.num_steps - 1):
        t, _, a, an = b.schedule.at_steps(torch.full((len(x),), k))
        with torch.no_grad():
            eps = b.eps(x, t, cond)
        ours = forward_kernel(x, eps, a, an, eta=1.0).sample(noise)
        theirs = sched.step(eps, int(t[0]), x, eta=1.0, variance_noise=noise).prev_sample
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_predict_x0_decode_and_noise(backbone):
    b = backbone
    x, t, cond = _inputs(b)
    x0 = b.predict_x0(x, t, cond)
    x0_c = b.predict_x0(x, t, cond, guided=False)
    assert x0.shape == x.shape and not torch.equal(x0, x0_c)
    latents = x0.detach().requires_grad_(True)
    img = b.decode(latents)
    assert img.shape == (3, 3, 16, 16) and img.dtype == torch.float32 and 0 <= img.min() and img.max() <= 1
    img.mean().backward()
    assert latents.grad is not None and torch.isfinite(latents.grad).all()
    with torch.no_grad():
        vae_img = b.vae.decode(x0.detach() / b.vae.config.scaling_factor).sample
    torch.testing.assert_close(b.decode(x0.detach()), (vae_img / 2 + 0.5).clamp(0, 1))
    n1 = b.initial_noise(4, torch.Generator().manual_seed(0))
    n2 = b.initial_noise(4, torch.Generator().manual_seed(0))
    assert n1.shape == (4, 4, 8, 8) and torch.equal(n1, n2)


def test_heads(backbone):
    b = backbone
    x, t, cond = _inputs(b)
    flow, score = b.make_log_flow_head(), b.make_flow_score_head()
    f, s = flow(x, t, cond), score(x, t, cond)
    assert f.shape == (3,) and s.shape == x.shape
    assert torch.equal(s, torch.zeros_like(x)) and torch.equal(f, torch.zeros(3))
    assert torch.equal(score.unet.conv_out.weight, torch.zeros_like(score.unet.conv_out.weight))
    assert torch.equal(score.unet.conv_out.bias, torch.zeros_like(score.unet.conv_out.bias))
    (f.sum() + s.sum()).backward()
    assert flow.out.weight.grad is not None and score.unet.conv_out.weight.grad is not None


def test_low_precision_base_with_fp32_lora_and_full_finetune(pipe_dir):
    b = _load(pipe_dir, dtype="bf16", gradient_checkpointing=True)
    assert b.unet.dtype == torch.bfloat16 and b.vae.dtype == torch.bfloat16
    assert {p.dtype for p in b.trainable_parameters()} == {torch.float32}
    x, t, cond = _inputs(b)
    e = b.eps(x, t, cond)
    assert e.dtype == torch.float32 and torch.isfinite(e).all()
    e.square().mean().backward()
    assert all(p.grad is not None for p in b.trainable_parameters())
    full = _load(pipe_dir, full_finetune=True)
    n_full = sum(p.numel() for p in full.trainable_parameters())
    assert n_full == sum(p.numel() for p in full.unet.parameters())
    ref0 = full.cond_eps(x, t, cond, reference=True)
    with torch.no_grad():
        full.unet.conv_out.bias.add_(1.0)
    assert torch.equal(full.cond_eps(x, t, cond, reference=True), ref0)
    assert (full.cond_eps(x, t, cond).detach() - ref0).abs().min() > 0.5


def test_bad_inputs_give_clear_errors(backbone, pipe_dir, tmp_path):
    missing = tmp_path / "no_such_pipeline"
    with pytest.raises(FileNotFoundError, match="no_such_pipeline"):
        StableDiffusionBackbone.from_pretrained(missing)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "model_index.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="unet"):
        StableDiffusionBackbone.from_pretrained(tmp_path / "half")
    with pytest.raises(TypeError, match="list of str"):
        backbone.encode_prompts("a handwritten digit seven")
    with pytest.raises(TypeError, match="must all be str"):
        backbone.encode_prompts(["ok", 7])
    with pytest.raises(ValueError, match="multiple of the VAE factor 2"):
        _load(pipe_dir, image_size=15)
    with pytest.raises(ValueError, match="dtype"):
        _load(pipe_dir, dtype="int8")
    x, t, cond = _inputs(backbone)
    with pytest.raises(ValueError, match=r"x must be latents \[N, 4, 8, 8\]"):
        backbone.eps(x[:, :3], t, cond)
    with pytest.raises(ValueError, match="cond has 2 rows"):
        backbone.eps(x, t, cond[:2])
    with pytest.raises(TypeError, match="integer"):
        backbone.eps(x, t.float(), cond)


def test_v_prediction_is_converted_to_eps():
    from gfnalign.core.parametrization import v_to_eps

    c = build_components(seed=5)
    sched = DDIMScheduler.from_config(c["scheduler"].config, prediction_type="v_prediction")
    b = StableDiffusionBackbone(unet=c["unet"], vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"],
                                scheduler=sched, num_inference_steps=4, guidance_scale=1.0, lora_rank=0)
    assert b.schedule.prediction_type == "v_prediction" and b.trainable_parameters() == []
    x, t, cond = _inputs(b, n=2)
    with torch.no_grad():
        v = b.unet(x, t, encoder_hidden_states=cond).sample
        expected = v_to_eps(x, v, b.schedule.alpha_bar_of_timestep(t))
    torch.testing.assert_close(b.eps(x, t, cond), expected)
    assert torch.equal(b.eps(x, t, cond, reference=True), b.eps(x, t, cond).detach())

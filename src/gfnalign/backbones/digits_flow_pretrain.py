"""Reproducible pretraining of the shipped tiny flow-matching digits world (an SD3-style pipeline).

Run ``python scripts/pretrain_digits_flow.py`` (the defaults reproduce the shipped weights). It reuses the
digits world's VAE and classifier (``gfnalign/assets/digits``) and trains only the transformer:

1. components: the digits VAE with SD3's latent normalisation (``shift_factor`` = mean, ``scaling_factor`` =
   1 / std of the training latents), two frozen random-init tiny ``CLIPTextModelWithProjection`` encoders on
   the digits world's offline tokenizer, no T5, a tiny ``SD3Transformer2DModel`` (patch 1 on 4×8×8 latents),
   ``FlowMatchEulerDiscreteScheduler`` with shift 1;
2. the rectified-flow loss ‖v_θ(x_σ, σ) − (ε − x0)‖² with x_σ = (1 − σ)·x0 + σ·ε and σ logit-normal
   (SD3's training density), one of several phrasings per digit, 10% of prompts replaced by ``""`` for
   classifier-free guidance, an exponential moving average of the weights (the shipped weights);
3. the zero T5 rows: without T5 the pipeline appends ``max_sequence_length`` identical zero rows to each
   prompt (256 by default). Identical rows stay identical through every layer (SD3 gives text no positions),
   so L of them act as one row whose attention logit is raised by log L; training draws L from 1..256
   (log-uniformly) and runs one row with that bias (:class:`ZeroRowCountProcessor`), so the model serves
   any ``max_sequence_length`` at the cost of one row;
4. every ``eval_every`` steps (after ``min_steps``) the EMA model samples at the world's default sampler
   (gfnalign's policy: Flow-GRPO SDE, a = 0.7, 20 steps, guidance 1) and the classifier scores it; training
   stops at the first evaluation reaching ``target_acc`` (or at ``max_steps``);
5. the final accuracies on ``final_per_class`` samples per digit at several samplers, ``save_pretrained``,
   ``train_report.json``, sample grids and the model card.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from gfnalign.backbones.digits import (
    ASSET_DIR as DIGITS_ASSET_DIR,
)
from gfnalign.backbones.digits import (
    DIGIT_PROMPTS,
    IMAGE_SIZE,
    all_digit_prompts,
    load_digit_classifier,
    load_digits_images,
)
from gfnalign.backbones.digits_flow import (
    ASSET_DIR,
    DEFAULT_GUIDANCE,
    DEFAULT_NOISE_LEVEL,
    DEFAULT_STEPS,
    T5_PLACEHOLDER_TOKENS,
)
from gfnalign.backbones.digits_pretrain import TOKENIZER_MAX_LENGTH, build_tokenizer, save_grid

TEXT_HIDDEN = 32  # per CLIP encoder; joint width 2·32 = 64, pooled 2·32 = 64
MAX_ZERO_ROWS = 256  # StableDiffusion3Pipeline's default max_sequence_length


# -- components ---------------------------------------------------------------------------------------


def build_flow_components(seed: int = 0, *, vae_dir: Path | None = None, num_layers: int = 4, heads: int = 4,
                          head_dim: int = 16, shift: float = 1.0) -> dict[str, Any]:
    """The pipeline's components: the digits VAE (normalisation set later) and random-init text encoders and
    transformer (deterministic given ``seed``)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    tok, tok2 = build_tokenizer(), build_tokenizer()
    clip_cfg = CLIPTextConfig(
        vocab_size=len(tok), hidden_size=TEXT_HIDDEN, intermediate_size=2 * TEXT_HIDDEN, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=TOKENIZER_MAX_LENGTH, projection_dim=TEXT_HIDDEN,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )
    torch.manual_seed(seed)
    te = CLIPTextModelWithProjection(clip_cfg)
    torch.manual_seed(seed + 1)
    te2 = CLIPTextModelWithProjection(clip_cfg)
    vae = AutoencoderKL.from_pretrained(vae_dir or DIGITS_ASSET_DIR / "pipeline" / "vae")
    vae.eval().requires_grad_(False)
    torch.manual_seed(seed + 2)
    latent = IMAGE_SIZE // 2
    transformer = SD3Transformer2DModel(
        sample_size=latent, patch_size=1, in_channels=4, out_channels=4, num_layers=num_layers,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=2 * TEXT_HIDDEN,
        caption_projection_dim=heads * head_dim, pooled_projection_dim=2 * TEXT_HIDDEN, pos_embed_max_size=latent,
    )
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    return {"transformer": transformer, "vae": vae, "text_encoder": te, "text_encoder_2": te2, "tokenizer": tok,
            "tokenizer_2": tok2, "scheduler": sched}


def make_flow_pipeline(c: dict[str, Any], transformer: Any = None):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(
        transformer=transformer if transformer is not None else c["transformer"], vae=c["vae"],
        text_encoder=c["text_encoder"], text_encoder_2=c["text_encoder_2"], text_encoder_3=None,
        tokenizer=c["tokenizer"], tokenizer_2=c["tokenizer_2"], tokenizer_3=None, scheduler=c["scheduler"],
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def encode_flow_text(pipe, prompts: list[str], zero_rows: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``(prompt_embeds [N, 16 + zero_rows, 64], pooled [N, 64])`` exactly as the pipeline computes them."""
    embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False,
                                              max_sequence_length=zero_rows)
    return embeds, pooled


class ZeroRowCountProcessor:
    """SD3's joint attention (diffusers' ``JointAttnProcessor2_0``) where the last context row stands for
    ``count`` identical rows: ``log_count`` ``[B]`` is added to its attention logit. Exact, because identical
    keys and values contribute ``count·exp(logit)`` to the softmax, and identical queries get identical
    outputs (so the rows stay identical). Used only while pretraining; the saved model has the stock processor.
    """

    def __init__(self) -> None:
        self.log_count: torch.Tensor | None = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        n_image, batch = hidden_states.shape[1], hidden_states.shape[0]

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        cq = heads(attn.add_q_proj(encoder_hidden_states))
        ck = heads(attn.add_k_proj(encoder_hidden_states))
        cv = heads(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_added_q is not None:
            cq = attn.norm_added_q(cq)
        if attn.norm_added_k is not None:
            ck = attn.norm_added_k(ck)
        q, k, v = torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)
        mask = None
        if self.log_count is not None:
            mask = torch.zeros(batch, 1, 1, k.shape[2], dtype=q.dtype, device=q.device)
            mask[:, 0, 0, -1] = self.log_count.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * q.shape[-1]).to(q.dtype)
        out, ctx = out[:, :n_image], out[:, n_image:]
        if not attn.context_pre_only:
            ctx = attn.to_add_out(ctx)
        out = attn.to_out[1](attn.to_out[0](out))
        return out, ctx


# -- latents -------------------------------------------------------------------------------------------


@torch.no_grad()
def normalise_vae(vae, images: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Posterior mean/std of every training image and SD3's latent normalisation written into the config."""
    post = vae.encode(images * 2 - 1).latent_dist
    g = torch.Generator().manual_seed(seed)
    z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
    shift, std = float(z.mean()), float(z.std())
    vae.register_to_config(shift_factor=shift, scaling_factor=1.0 / std)
    return post.mean, post.std, {"shift_factor": shift, "scaling_factor": 1.0 / std}


# -- sampling for evaluation ----------------------------------------------------------------------------


def eval_backbone(c: dict[str, Any], transformer: Any, *, guidance: float = DEFAULT_GUIDANCE,
                  steps: int = DEFAULT_STEPS, eta: float = DEFAULT_NOISE_LEVEL):
    """An SD3 backbone (no LoRA) over ``transformer`` with the world's default sampler settings."""
    from gfnalign.backbones.sd3 import SD3Backbone

    return SD3Backbone(transformer=transformer, vae=c["vae"], text_encoder=c["text_encoder"],
                       text_encoder_2=c["text_encoder_2"], tokenizer=c["tokenizer"], tokenizer_2=c["tokenizer_2"],
                       scheduler=c["scheduler"], num_inference_steps=steps, guidance_scale=guidance, eta=eta,
                       lora_rank=0, max_sequence_length=T5_PLACEHOLDER_TOKENS)


@torch.no_grad()
def sample_policy(backbone, prompts: list[str], seed: int, *, chunk: int = 250) -> torch.Tensor:
    """Images ``[N, 3, 16, 16]`` from gfnalign's policy kernel (the backbone's schedule, noise level, guidance):
    the same chain the trainer's rollout runs."""
    g = torch.Generator().manual_seed(seed)
    out = []
    sched = backbone.schedule
    for i in range(0, len(prompts), chunk):
        part = prompts[i : i + chunk]
        cond = backbone.encode_prompts(part)
        x = backbone.initial_noise(len(part), g)
        for k in range(sched.num_steps):
            step = torch.full((len(part),), k, dtype=torch.int64)
            t, _, _, _ = sched.at_steps(step, dtype=x.dtype, device=x.device)
            v = backbone.eps(x, t, cond)
            x = sched.forward_kernel(x, v, step, backbone.eta).sample(torch.randn(x.shape, generator=g))
        out.append(backbone.decode(x))
    return torch.cat(out)


def digit_prompts(per_class: int) -> tuple[list[str], torch.Tensor]:
    return [DIGIT_PROMPTS[k] for k in range(10) for _ in range(per_class)], torch.arange(10).repeat_interleave(per_class)


@torch.no_grad()
def policy_accuracy(backbone, classifier, per_class: int, seed: int) -> tuple[float, torch.Tensor]:
    prompts, labels = digit_prompts(per_class)
    images = sample_policy(backbone, prompts, seed)
    return (classifier(images).argmax(-1) == labels).float().mean().item(), images


@torch.no_grad()
def pipeline_accuracy(pipe, classifier, per_class: int, seed: int, **call: Any) -> float:
    """Accuracy of plain ``StableDiffusion3Pipeline.__call__`` (its Euler ODE sampler) with ``call`` options."""
    prompts, labels = digit_prompts(per_class)
    g = torch.Generator().manual_seed(seed)
    correct = 0
    for i in range(0, len(prompts), 250):
        images = pipe(prompts[i : i + 250], generator=g, output_type="pt", **call).images
        correct += int((classifier(images).argmax(-1) == labels[i : i + 250]).sum())
    return correct / len(prompts)


# -- training ---------------------------------------------------------------------------------------


def train_transformer(c, classifier, images, labels, *, seed, max_steps, min_steps, eval_every, batch, lr,
                      p_uncond, ema_decay, target_acc, eval_per_class, max_minutes, log) -> tuple[Any, dict[str, Any]]:
    transformer = c["transformer"]
    ema = copy.deepcopy(transformer).eval().requires_grad_(False)
    pipe = make_flow_pipeline(c)
    pairs = all_digit_prompts()
    embeds, pooled = encode_flow_text(pipe, [p for p, _ in pairs])  # [P, 17, 64], [P, 64]
    empty_embeds, empty_pooled = encode_flow_text(pipe, [""])
    n_templates = len(pairs) // 10
    mu, sd, norm = normalise_vae(c["vae"], images, seed)
    shift, scale = norm["shift_factor"], norm["scaling_factor"]
    processor = ZeroRowCountProcessor()
    default_processors = transformer.attn_processors
    transformer.set_attn_processor(processor)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(transformer.parameters(), lr=lr, weight_decay=1e-2)
    warm = 50
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    evals, recent, t0 = [], [], time.time()
    stopped, step = "max_steps", 0
    backbone = eval_backbone(c, ema)
    for step in range(1, max_steps + 1):
        transformer.train()
        b = torch.randint(0, len(mu), (batch,), generator=g)
        z0 = (mu[b] + sd[b] * torch.randn(mu[b].shape, generator=g) - shift) * scale
        noise = torch.randn(z0.shape, generator=g)
        sigma = torch.sigmoid(torch.randn(batch, generator=g))  # logit-normal(0, 1), SD3's density
        s4 = sigma.view(-1, 1, 1, 1)
        x = (1 - s4) * z0 + s4 * noise
        tpl = torch.randint(0, n_templates, (batch,), generator=g)
        row = tpl * 10 + labels[b]
        drop = torch.rand(batch, generator=g) < p_uncond
        cond = torch.where(drop.view(-1, 1, 1), empty_embeds.expand(batch, -1, -1), embeds[row])
        cond_pooled = torch.where(drop.view(-1, 1), empty_pooled.expand(batch, -1), pooled[row])
        # the zero T5 rows: L = 2^u, u uniform in [0, 8] (1..256 rows), as one row with logit + log L
        processor.log_count = torch.rand(batch, generator=g) * math.log(MAX_ZERO_ROWS)
        pred = transformer(hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=cond,
                           pooled_projections=cond_pooled).sample
        loss = F.mse_loss(pred, noise - z0)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        with torch.no_grad():
            d = min(ema_decay, (1 + step) / (10 + step))
            for pe, p in zip(ema.parameters(), transformer.parameters(), strict=True):
                pe.lerp_(p, 1 - d)
        recent.append(loss.item())
        if step % 100 == 0:
            log(f"transformer step {step}/{max_steps} v-mse(last 100) {sum(recent[-100:]) / 100:.4f} "
                f"{(time.time() - t0) / 60:.1f} min")
        if step >= min_steps and (step - min_steps) % eval_every == 0:
            te0 = time.time()
            acc, _ = policy_accuracy(backbone, classifier, eval_per_class, seed + 100)
            evals.append({"step": step, "acc_default": acc, "minutes": (time.time() - t0) / 60})
            log(f"eval step {step}: accuracy at the default sampler {acc:.3f} ({time.time() - te0:.0f}s)")
            if acc >= target_acc:
                stopped = f"acc_default >= {target_acc}"
                break
        if max_minutes and (time.time() - t0) / 60 > max_minutes:
            stopped = f"max_minutes={max_minutes} (NOT reproducible by step count)"
            log(f"time budget reached at step {step}")
            break
    transformer.set_attn_processor(default_processors)
    info = {"steps": step, "batch": batch, "lr": lr, "p_uncond": p_uncond, "ema_decay": ema_decay,
            "stopped_by": stopped, "final_v_mse_last100": sum(recent[-100:]) / len(recent[-100:]), "evals": evals,
            "seconds": time.time() - t0, "latent_normalisation": norm}
    return ema, info


def model_card(r: dict[str, Any]) -> str:
    """The flow world's model card (markdown) for a ``train_report.json`` dict."""
    a, u, f = r["args"], r["transformer"], r["final"]
    norm = u["latent_normalisation"]
    evals = "\n".join(f"| {e['step']} | {e['acc_default']:.3f} | {e['minutes']:.1f} |" for e in u["evals"]) or "| - | | |"
    return f"""# gfnalign tiny flow-matching digits world (shipped weights)

A real diffusers `StableDiffusion3Pipeline` with tiny configs, pretrained from scratch with the rectified-flow
loss by `scripts/pretrain_digits_flow.py` (module `gfnalign.backbones.digits_flow_pretrain`) on
scikit-learn's bundled handwritten digits. It shares the digits world's prompts, VAE weights, classifier and
rewards (`../digits/`); `backbone.kind: digits-flow` and the `digits-flow-<method>` presets train on it.

Load with plain diffusers (offline; T5 is absent, so pass it as `None`, the documented way to drop it):

`StableDiffusion3Pipeline.from_pretrained(".../digits_flow/pipeline", text_encoder_3=None, tokenizer_3=None)`,
then `pipe(["a handwritten digit seven"] * 4, output_type="pt").images` (`[4, 3, 16, 16]`; more in the project's
`docs/digits_model_card.md`);

or `gfnalign.backbones.digits_flow.load_digits_flow_backbone()` (the world's sampler defaults below).

## Model

* Images 3×16×16 in [0, 1]; latents 4×8×8 from the digits world's `AutoencoderKL` (same weights) with SD3's
  normalisation: `shift_factor` {norm["shift_factor"]:.4f}, `scaling_factor` {norm["scaling_factor"]:.4f}
  (mean and 1 / std of the training latents).
* `SD3Transformer2DModel`: patch 1, {a["layers"]} joint blocks, {a["heads"]} heads × {a["head_dim"]}, joint
  attention and pooled width 64, {u["parameters"] / 1e6:.2f} M parameters; velocity prediction.
* Text: two **frozen random-init** tiny `CLIPTextModelWithProjection` encoders (hidden 32, 2 layers, max
  length 16) on the digits world's offline CLIP-style tokenizer, no T5. The transformer learned what each
  prompt means.
* Zero T5 rows: without T5 the pipeline appends `max_sequence_length` zero rows (256 by default). They stay
  identical through every layer, so L of them act as one row with its attention logit raised by log L;
  pretraining drew L log-uniformly in 1..256 and ran one row with that bias, so any `max_sequence_length` up
  to 256 is in distribution. gfnalign samples with one row (cheapest).
* Scheduler: `FlowMatchEulerDiscreteScheduler`, shift 1.0, 1000 training timesteps.

## Training (seed {a["seed"]}, {r["threads"]} thread(s), torch {r["torch"]})

Rectified flow ‖v_θ(x_σ, σ) − (ε − x0)‖², x_σ = (1 − σ)·x0 + σ·ε, σ logit-normal(0, 1) (SD3's density);
the digits world's four phrasings per digit, {a["p_uncond"]:.0%} of prompts replaced by "" for classifier-free
guidance; AdamW lr {a["lr"]} (50 warm-up steps, weight decay 0.01), batch {a["batch"]}, gradient clip 1,
EMA of the weights with decay {a["ema_decay"]} (the shipped weights are the EMA). {u["steps"]} steps,
{u["seconds"] / 60:.1f} min; final v-MSE (last 100 steps) {u["final_v_mse_last100"]:.4f}.
Stopped by: {u["stopped_by"]}. Total wall time **{r["total_minutes"]:.1f} min** (2-core CPU shared with other jobs).

Evaluations during training ({a["eval_per_class"]} samples per digit at the default sampler):

| step | accuracy | minutes |
|---|---|---|
{evals}

## Quality (final, {f["per_class"]} samples per digit = {10 * f["per_class"]}, canonical prompts, other seeds)

Shipped classifier's accuracy on the prompted digit:

| sampler | accuracy |
|---|---|
| **default** (gfnalign's policy: Flow-GRPO SDE a = {DEFAULT_NOISE_LEVEL}, {DEFAULT_STEPS} steps, guidance {DEFAULT_GUIDANCE:g}, 1 zero row) | **{f["policy_g1"]:.3f}** |
| the same at guidance 3 | {f["policy_g3"]:.3f} |
| plain pipeline, Euler ODE, 20 steps, guidance 1, `max_sequence_length=1` | {f["ode_g1_20steps_1row"]:.3f} |
| plain pipeline at its defaults (28 steps, guidance 7, 256 zero rows; {10 * f["ode_pipeline_defaults_per_class"]} draws) | {f["ode_pipeline_defaults"]:.3f} |

Sample grids: `samples_guidance1.png` (default sampler), `samples_guidance3.png`; rows are digits 0-9.

## Reproduce

```
{r["command"].strip()}
```
Seeds are fixed and the stopping decision is made at fixed step counts, so a re-run with the same thread count
on the same CPU type is expected to give the same weights; other thread counts or CPUs change the
floating-point bits. Intended for tests, demos and method comparisons only.
"""


def drop_source_path(config_file: Path) -> None:
    """Remove ``_name_or_path`` (the folder the VAE was loaded from, a machine path) from a saved config."""
    cfg = json.loads(config_file.read_text())
    cfg.pop("_name_or_path", None)
    config_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


# -- entry point ----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=ASSET_DIR, help="asset folder (pipeline/ goes inside)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the shipped run: 1)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=16)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema-decay", type=float, default=0.995)
    p.add_argument("--max-steps", type=int, default=3000)
    p.add_argument("--min-steps", type=int, default=800)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--eval-per-class", type=int, default=20)
    p.add_argument("--target-acc", type=float, default=0.94)
    p.add_argument("--final-per-class", type=int, default=50)
    p.add_argument("--p-uncond", type=float, default=0.1)
    p.add_argument("--max-minutes", type=float, default=0.0, help="safety cap on training (0 = none)")
    p.add_argument("--skip-final", action="store_true", help="pilot runs: no final evaluation, nothing saved")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    out: Path = args.out
    t_start = time.time()

    def log(msg: str) -> None:
        print(f"[{(time.time() - t_start) / 60:5.1f} min] {msg}", flush=True)

    images, labels = load_digits_images(IMAGE_SIZE)
    classifier = load_digit_classifier()
    c = build_flow_components(args.seed, num_layers=args.layers, heads=args.heads, head_dim=args.head_dim)
    n_params = sum(p.numel() for p in c["transformer"].parameters())
    log(f"transformer: {n_params / 1e6:.2f} M parameters")
    ema, info = train_transformer(
        c, classifier, images, labels, seed=args.seed, max_steps=args.max_steps, min_steps=args.min_steps,
        eval_every=args.eval_every, batch=args.batch, lr=args.lr, p_uncond=args.p_uncond, ema_decay=args.ema_decay,
        target_acc=args.target_acc, eval_per_class=args.eval_per_class, max_minutes=args.max_minutes, log=log,
    )
    info["parameters"] = n_params
    if args.skip_final:
        log("pilot: done, " + json.dumps(info["evals"]))
        return 0
    c["transformer"] = ema
    pipe = make_flow_pipeline(c)
    n = args.final_per_class
    final: dict[str, Any] = {"per_class": n, "prompts": "canonical"}
    out.mkdir(parents=True, exist_ok=True)
    for gs in (DEFAULT_GUIDANCE, 3.0):
        acc, imgs = policy_accuracy(eval_backbone(c, ema, guidance=gs), classifier, n, args.seed + 7)
        final[f"policy_g{gs:g}"] = acc
        k = min(8, n)
        pick = torch.cat([torch.arange(d * n, d * n + k) for d in range(10)])
        save_grid(imgs[pick], k, out / f"samples_guidance{gs:g}.png")
    final["ode_g1_20steps_1row"] = pipeline_accuracy(pipe, classifier, n, args.seed + 8, num_inference_steps=20,
                                                     guidance_scale=1.0, max_sequence_length=1)
    # 28 steps, guidance 7, 256 zero rows: 17x the default sampler's cost per image, so fewer draws
    final["ode_pipeline_defaults_per_class"] = n_defaults = min(n, 20)
    final["ode_pipeline_defaults"] = pipeline_accuracy(pipe, classifier, n_defaults, args.seed + 9)
    log("final: " + json.dumps(final))
    pipe_dir = out / "pipeline"
    if pipe_dir.exists():
        shutil.rmtree(pipe_dir)
    pipe.save_pretrained(pipe_dir, safe_serialization=True)
    drop_source_path(pipe_dir / "vae" / "config.json")
    report = {
        "command": "python scripts/pretrain_digits_flow.py " + " ".join(argv if argv is not None else []),
        # the package's own folder is recorded by name, not by this machine's path
        "args": {k: ("assets/digits_flow (default)" if v == ASSET_DIR else str(v) if isinstance(v, Path) else v)
                 for k, v in vars(args).items()},
        "torch": torch.__version__, "threads": args.threads, "transformer": info, "final": final,
        "total_minutes": (time.time() - t_start) / 60,
    }
    (out / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "README.md").write_text(model_card(report))
    log(f"saved to {out} in {report['total_minutes']:.1f} min")
    return 0

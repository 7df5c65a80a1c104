"""Reproducible pretraining of the shipped tiny digits world (classifier, VAE, text-conditional UNet).

Run ``python scripts/pretrain_digits.py`` (defaults reproduce the shipped weights; about 10-15 minutes on
two CPU cores). Steps, all with fixed seeds:

1. a small CNN digit classifier on 16×16 digits, 80/20 stratified split, held-out accuracy reported;
2. a tiny ``AutoencoderKL`` (factor 2: 3×16×16 images ↔ 4×8×8 latents), MSE + 1e-4·KL, then
   ``scaling_factor = 1 / std(latents)``;
3. a tiny ``UNet2DConditionModel`` with the ε loss on a scaled-linear 1000-step schedule, conditioned on a
   frozen random-init tiny ``CLIPTextModel`` (offline-built CLIP-style BPE tokenizer) fed one of several
   phrasings per digit, 10% of prompts replaced by ``""`` for classifier-free guidance;
4. every ``eval_every`` steps (after ``min_unet_steps``) samples of the stock ``StableDiffusionPipeline``
   (DDIM, 20 steps, eta 0) are classified at guidance 1 and 3; training stops at the first evaluation where
   guidance 3 reaches ``target_acc_g3`` (accurate when guided, with headroom unguided), or at ``max_unet_steps``;
5. ``save_pretrained`` of the pipeline, the classifier, ``train_report.json`` and a sample grid.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from gfnalign.backbones.digits import (
    ASSET_DIR,
    DIGIT_PROMPTS,
    DIGIT_VOCABULARY,
    IMAGE_SIZE,
    DigitClassifier,
    all_digit_prompts,
    load_digits_images,
)

TOKENIZER_MAX_LENGTH = 16
TEXT_HIDDEN = 32


# -- components ---------------------------------------------------------------------------------------


def _byte_chars() -> list[str]:
    """The 256 printable stand-ins for bytes that CLIP/GPT-2 byte-level BPE uses (same mapping)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def build_tokenizer(words=DIGIT_VOCABULARY, max_length: int = TOKENIZER_MAX_LENGTH):
    """A CLIP-style BPE tokenizer built offline: bytes as characters, each known word one token."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in _byte_chars():
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    for w in sorted(set(words)):
        if len(w) < 2:
            continue
        parts = [*w[:-1], w[-1] + "</w>"]
        cur = parts[0]
        for p in parts[1:]:
            if (cur, p) not in merges:
                merges.append((cur, p))
            cur += p
            vocab.setdefault(cur, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def build_components(seed: int = 0, image_size: int = IMAGE_SIZE) -> dict[str, Any]:
    """Randomly initialised tiny pipeline components (deterministic given ``seed``)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = build_tokenizer()
    torch.manual_seed(seed)
    te = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tok), hidden_size=TEXT_HIDDEN, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=TOKENIZER_MAX_LENGTH, projection_dim=TEXT_HIDDEN,
            bos_token_id=0, eos_token_id=1, pad_token_id=1,
        )
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=32, sample_size=image_size,
    )
    torch.manual_seed(seed + 2)
    unet = UNet2DConditionModel(
        sample_size=image_size // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=8, norm_num_groups=32,
    )
    sched = DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )
    return {"tokenizer": tok, "text_encoder": te, "vae": vae, "unet": unet, "scheduler": sched}


def make_pipeline(c: dict[str, Any]):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"], unet=c["unet"],
        scheduler=c["scheduler"], safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


@torch.no_grad()
def encode_text(tok, te, prompts: list[str]) -> torch.Tensor:
    """Exactly what ``StableDiffusionPipeline.encode_prompt`` computes (max-length padding, no mask)."""
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
    return te(ids.input_ids)[0]


# -- training steps -----------------------------------------------------------------------------------


def _shift(x: torch.Tensor, g: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Random integer translation by up to ``max_shift`` pixels (zero fill), per image."""
    n, _, h, w = x.shape
    pad = F.pad(x, (max_shift,) * 4)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=g)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=g)
    return torch.stack([pad[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


def train_classifier(images, labels, *, seed: int, epochs: int, log) -> tuple[DigitClassifier, dict[str, Any]]:
    g = torch.Generator().manual_seed(seed)
    # stratified 80/20 split
    train_idx, test_idx = [], []
    for k in range(10):
        idx = (labels == k).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_test = round(0.2 * len(idx))
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    tr, te = torch.cat(train_idx), torch.cat(test_idx)
    torch.manual_seed(seed)
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(tr) / 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=epochs * steps_per_epoch)
    t0 = time.time()
    for ep in range(epochs):
        model.train()
        perm = tr[torch.randperm(len(tr), generator=g)]
        for i in range(0, len(perm), 64):
            b = perm[i : i + 64]
            x = _shift(images[b], g)
            x = x * (0.7 + 0.3 * torch.rand(len(b), 1, 1, 1, generator=g))  # ink intensity
            loss = F.cross_entropy(model(x), labels[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if (ep + 1) % 10 == 0 or ep == epochs - 1:
            log(f"classifier epoch {ep + 1}/{epochs} loss {loss.item():.4f}")
    model.eval()
    with torch.no_grad():
        acc = (model(images[te]).argmax(-1) == labels[te]).float().mean().item()
        train_acc = (model(images[tr]).argmax(-1) == labels[tr]).float().mean().item()
    info = {"heldout_accuracy": acc, "train_accuracy": train_acc, "n_train": len(tr), "n_heldout": len(te),
            "epochs": epochs, "seconds": time.time() - t0}
    log(f"classifier held-out accuracy {acc:.4f} (train {train_acc:.4f}) in {info['seconds']:.0f}s")
    return model, info


def train_vae(vae, images, *, seed: int, steps: int, batch: int, lr: float, log) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    x_all = images * 2 - 1
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    vae.train()
    t0, recent = time.time(), []
    for step in range(steps):
        b = torch.randint(0, len(x_all), (batch,), generator=g)
        x = x_all[b]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        mse = F.mse_loss(rec, x)
        kl = post.kl().mean() / post.mean[0].numel()
        loss = mse + 1e-4 * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        recent.append(mse.item())
        if (step + 1) % 100 == 0 or step == steps - 1:
            log(f"vae step {step + 1}/{steps} recon mse {sum(recent[-50:]) / len(recent[-50:]):.5f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        post = vae.encode(x_all).latent_dist
        lat_std = float(torch.cat([post.mean + post.std * torch.randn(post.mean.shape, generator=g)]).std())
        rec = vae.decode(post.mean).sample
        recon = F.mse_loss(rec, x_all).item()
    vae.register_to_config(scaling_factor=1.0 / lat_std)
    info = {"steps": steps, "batch": batch, "lr": lr, "recon_mse_full": recon, "latent_std": lat_std,
            "scaling_factor": 1.0 / lat_std, "seconds": time.time() - t0}
    log(f"vae done: recon mse {recon:.5f}, scaling_factor {1 / lat_std:.4f}, {info['seconds']:.0f}s")
    return info


@torch.no_grad()
def sample_and_classify(pipe, classifier, *, guidance: float, per_class: int, seed: int, steps: int = 20,
                        eta: float = 1.0):
    """Accuracy of the classifier on ``per_class`` samples of each canonical digit prompt, and the images
    (the stock pipeline's DDIM sampler with ``eta``; eta 1 is gfnalign's stochastic policy kernel)."""
    prompts = [DIGIT_PROMPTS[k] for k in range(10) for _ in range(per_class)]
    labels = torch.tensor([k for k in range(10) for _ in range(per_class)])
    g = torch.Generator().manual_seed(seed)
    out = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, eta=eta, generator=g,
               output_type="pt").images
    pred = classifier(out).argmax(-1)
    return (pred == labels).float().mean().item(), out


def train_unet(c, classifier, images, *, seed, max_steps, min_steps, eval_every, batch, lr, p_uncond,
               target_acc_g3, eval_per_class, max_minutes, log, eta: float = 1.0) -> dict[str, Any]:
    from diffusers import DDPMScheduler

    tok, te, vae, unet = c["tokenizer"], c["text_encoder"], c["vae"], c["unet"]
    te.eval().requires_grad_(False)
    pairs = all_digit_prompts()
    prompt_embs = encode_text(tok, te, [p for p, _ in pairs])  # [P, L, D]
    empty_emb = encode_text(tok, te, [""])  # [1, L, D]
    n_templates = len(pairs) // 10
    with torch.no_grad():
        post = vae.encode(images * 2 - 1).latent_dist
        mu, sd = post.mean, post.std
    sf = vae.config.scaling_factor
    _, labels = load_digits_images(IMAGE_SIZE)
    train_sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                beta_schedule="scaled_linear")
    ac = train_sched.alphas_cumprod.float()
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-2)
    warm = 50
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    pipe = make_pipeline(c)
    pipe.set_progress_bar_config(disable=True)
    evals, recent, t0 = [], [], time.time()
    stopped = "max_unet_steps"
    step = 0
    for step in range(1, max_steps + 1):
        unet.train()
        b = torch.randint(0, len(mu), (batch,), generator=g)
        z0 = (mu[b] + sd[b] * torch.randn(mu[b].shape, generator=g)) * sf
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        a = ac[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        tpl = torch.randint(0, n_templates, (batch,), generator=g)
        cond = prompt_embs[tpl * 10 + labels[b]]
        drop = torch.rand(batch, generator=g) < p_uncond
        cond = torch.where(drop.view(-1, 1, 1), empty_emb.expand_as(cond), cond)
        pred = unet(zt, t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        recent.append(loss.item())
        if step % 100 == 0:
            log(f"unet step {step}/{max_steps} eps mse(last 100) {sum(recent[-100:]) / 100:.4f} "
                f"{(time.time() - t0) / 60:.1f} min")
        if step >= min_steps and (step - min_steps) % eval_every == 0:
            unet.eval()
            te0 = time.time()
            kw = {"per_class": eval_per_class, "eta": eta}
            acc1, _ = sample_and_classify(pipe, classifier, guidance=1.0, seed=seed + 100, **kw)
            acc3, _ = sample_and_classify(pipe, classifier, guidance=3.0, seed=seed + 101, **kw)
            evals.append({"step": step, "acc_g1": acc1, "acc_g3": acc3, "minutes": (time.time() - t0) / 60})
            log(f"eval step {step} (eta {eta}): acc guidance1 {acc1:.3f}  guidance3 {acc3:.3f}  "
                f"({time.time() - te0:.0f}s)")
            if acc3 >= target_acc_g3:
                stopped = f"acc_g3 >= {target_acc_g3}"
                break
        if max_minutes and (time.time() - t0) / 60 > max_minutes:
            stopped = f"max_minutes={max_minutes} (NOT reproducible by step count)"
            log(f"time budget reached at step {step}")
            break
    unet.eval().requires_grad_(False)
    return {"steps": step, "batch": batch, "lr": lr, "p_uncond": p_uncond, "stopped_by": stopped,
            "final_eps_mse_last100": sum(recent[-100:]) / len(recent[-100:]), "evals": evals,
            "seconds": time.time() - t0}


def save_grid(images: torch.Tensor, nrow: int, path: Path, scale: int = 2) -> None:
    from PIL import Image

    n, c, h, w = images.shape
    rows = math.ceil(n / nrow)
    grid = torch.zeros(c, rows * h, nrow * w)
    for i in range(n):
        r, q = divmod(i, nrow)
        grid[:, r * h : (r + 1) * h, q * w : (q + 1) * w] = images[i]
    arr = (grid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(arr).resize((nrow * w * scale, rows * h * scale), Image.NEAREST).save(path)


def model_card(r: dict[str, Any]) -> str:
    """The model card (markdown) for a ``train_report.json`` dict."""
    a, c, v, u, f = r["args"], r["classifier"], r["vae"], r["unet"], r["final"]
    evals = "\n".join(
        f"| {e['step']} | {e['acc_g1']:.3f} | {e['acc_g3']:.3f} | {e['minutes']:.1f} |" for e in u["evals"]
    ) or "| (none) | | | |"
    return f"""# gfnalign tiny digits world (shipped weights)

A real diffusers `StableDiffusionPipeline` with tiny configs, pretrained from scratch by
`scripts/pretrain_digits.py` (module `gfnalign.backbones.digits_pretrain`) on scikit-learn's bundled
handwritten digits, plus a small CNN digit classifier trained on the same data. It is the embedded default
world of gfnalign: small enough to align on two CPU cores in minutes, with rewards that have headroom.

## Contents

| path | what |
|---|---|
| `pipeline/` | `StableDiffusionPipeline.save_pretrained` folder: UNet, VAE, text encoder, tokenizer, DDIM scheduler |
| `classifier/` | `DigitClassifier` weights (`model.safetensors`) and `config.json` |
| `train_report.json` | every number below, the arguments, the evaluation history |
| `samples_guidance1.png`, `samples_guidance3.png` | 8 samples per digit (rows 0-9), DDIM 20 steps, eta 1 |

Load with plain diffusers (offline, no gfnalign needed):
`StableDiffusionPipeline.from_pretrained(".../pipeline", safety_checker=None, requires_safety_checker=False)`;
or `gfnalign.backbones.digits.load_digits_backbone()` / `load_digit_classifier()`.

## Model

* Images 3×16×16 in [0, 1] (bright ink on black, grey replicated to RGB); latents 4×8×8.
* `AutoencoderKL`: block_out_channels (32, 64), 1 layer per block, factor 2, scaling_factor {v["scaling_factor"]:.4f}
  (= 1 / std of the training latents).
* `UNet2DConditionModel`: (32, 64), `DownBlock2D` + `CrossAttnDownBlock2D`, 1 layer per block,
  cross_attention_dim 32, about 1 M parameters; epsilon prediction.
* Text: a **frozen random-init** tiny `CLIPTextModel` (hidden 32, 2 layers, max length 16) with a CLIP-style
  BPE tokenizer generated offline (bytes + one merge chain per known word; unknown words fall back to
  characters). The text encoder carries no semantics; the UNet learned what each prompt means.
* Scheduler: `DDIMScheduler`, scaled_linear betas 0.00085-0.012, 1000 steps, steps_offset 1,
  set_alpha_to_one False, clip_sample False.

## Data and prompts

`sklearn.datasets.load_digits()` (1797 images, 8×8, 0-16), divided by 16 and upsampled bilinearly to
16×16. Prompts: for digit k one of 4 phrasings chosen uniformly per sample ("a handwritten digit seven",
"a handwritten digit 7", "the number seven written by hand", "a picture of the digit seven");
{a["p_uncond"]:.0%} of prompts replaced by "" for classifier-free guidance.

## Training (seed {a["seed"]}, {r["threads"]} thread(s), torch {r["torch"]})

* Classifier: CNN (conv 32-32-pool-64-pool, linear 128, linear 10), {c["epochs"]} epochs, random ±1 px
  shifts and ink-intensity jitter, stratified 80/20 split: **held-out accuracy {c["heldout_accuracy"]:.4f}**
  ({c["n_heldout"]} images); {c["seconds"]:.0f} s.
* VAE: {v["steps"]} AdamW steps (lr {v["lr"]}, batch {v["batch"]}), MSE + 1e-4·KL; reconstruction MSE on
  [-1, 1] images {v["recon_mse_full"]:.5f}; {v["seconds"] / 60:.1f} min.
* UNet: {u["steps"]} AdamW steps (lr {u["lr"]}, 50 warm-up steps, batch {u["batch"]}, grad-clip 1), ε-MSE on a
  1000-step scaled-linear DDPM schedule; final ε-MSE (last 100 steps) {u["final_eps_mse_last100"]:.4f};
  {u["seconds"] / 60:.1f} min. Stopped by: {u["stopped_by"]}.
* Total wall time: **{r["total_minutes"]:.1f} min** (2-core AMD EPYC CPU, shared with other jobs during the run).

Evaluations during UNet training ({a["eval_per_class"]} samples per digit, DDIM 20 steps, eta {a.get("eval_eta", 0.0):g}):

| step | acc. guidance 1 | acc. guidance 3 | minutes |
|---|---|---|---|
{evals}

## Quality (final, {f["per_class"]} samples per digit, canonical prompts, 20 DDIM steps, other seeds)

Shipped classifier accuracy on samples of the stock pipeline:

| guidance | eta 1 (gfnalign's stochastic policy) | eta 0 (deterministic DDIM) |
|---|---|---|
| 1.0 | **{f["acc_guidance1"]:.3f}** | {f.get("acc_guidance1_eta0", float("nan")):.3f} |
| 3.0 | **{f["acc_guidance3"]:.3f}** | {f.get("acc_guidance3_eta0", float("nan")):.3f} |

Guidance 1 leaves headroom for alignment (samples are digits but not always the prompted one); guidance 3
is accurate. The sample grids show eta 1.

## Reproduce

```
{r["command"].strip()}
```
`--out` only chooses where the folders are written (the default is the package's `assets/digits/`, which this
card describes); `--max-minutes` is a safety cap that did not trigger. Seeds are fixed and every stopping
decision is made at fixed step counts, so a re-run with the same thread count on the same CPU type is
expected to reproduce the run; other thread counts or CPUs change the floating-point bits, and how far that
moves the accuracies has not been measured. Intended for tests, demos and method comparisons only.
"""


# -- entry point ----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=ASSET_DIR, help="asset folder (pipeline/, classifier/ go inside)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; 1 (the shipped run) is fastest on a CPU shared with other jobs")
    p.add_argument("--classifier-epochs", type=int, default=30)
    p.add_argument("--vae-steps", type=int, default=300)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--unet-lr", type=float, default=2e-3)
    p.add_argument("--max-unet-steps", type=int, default=2400)
    p.add_argument("--min-unet-steps", type=int, default=800)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-per-class", type=int, default=20)
    p.add_argument("--eval-eta", type=float, default=1.0,
                   help="DDIM eta of the sampler that decides when to stop (1 = gfnalign's policy kernel)")
    p.add_argument("--final-per-class", type=int, default=50)
    p.add_argument("--target-acc-g3", type=float, default=0.92)
    p.add_argument("--p-uncond", type=float, default=0.1)
    p.add_argument("--max-minutes", type=float, default=0.0, help="safety cap on UNet training (0 = none)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    def log(msg: str) -> None:
        print(f"[{(time.time() - t_start) / 60:5.1f} min] {msg}", flush=True)

    images, labels = load_digits_images(IMAGE_SIZE)
    classifier, clf_info = train_classifier(images, labels, seed=args.seed, epochs=args.classifier_epochs, log=log)
    classifier.requires_grad_(False)
    c = build_components(args.seed)
    vae_info = train_vae(c["vae"], images, seed=args.seed, steps=args.vae_steps, batch=args.batch,
                         lr=args.vae_lr, log=log)
    unet_info = train_unet(
        c, classifier, images, seed=args.seed, max_steps=args.max_unet_steps, min_steps=args.min_unet_steps,
        eval_every=args.eval_every, batch=args.batch, lr=args.unet_lr, p_uncond=args.p_uncond,
        target_acc_g3=args.target_acc_g3, eval_per_class=args.eval_per_class, max_minutes=args.max_minutes,
        log=log, eta=args.eval_eta,
    )
    pipe = make_pipeline(c)
    pipe.set_progress_bar_config(disable=True)
    final: dict[str, Any] = {"per_class": args.final_per_class, "steps": 20, "prompts": "canonical"}
    imgs = {}
    for eta in (1.0, 0.0):
        for gs in (1.0, 3.0):
            acc, imgs[(eta, gs)] = sample_and_classify(
                pipe, classifier, guidance=gs, per_class=args.final_per_class, seed=args.seed + 7 + int(gs), eta=eta
            )
            final[f"acc_guidance{gs:g}" + ("" if eta == 1.0 else "_eta0")] = acc
    log(f"final ({args.final_per_class}/class, other sampling seeds): " + json.dumps(final))
    img1, img3 = imgs[(1.0, 1.0)], imgs[(1.0, 3.0)]

    pipe_dir, clf_dir = out / "pipeline", out / "classifier"
    for d in (pipe_dir, clf_dir):
        if d.exists():
            shutil.rmtree(d)
    pipe.save_pretrained(pipe_dir, safe_serialization=True)
    classifier.save(clf_dir, extra={"heldout_accuracy": clf_info["heldout_accuracy"], "seed": args.seed})
    k = min(8, args.final_per_class)
    pick = torch.cat([torch.arange(d * args.final_per_class, d * args.final_per_class + k) for d in range(10)])
    save_grid(img1[pick], k, out / "samples_guidance1.png")
    save_grid(img3[pick], k, out / "samples_guidance3.png")
    report = {
        "command": "python scripts/pretrain_digits.py " + " ".join(argv if argv is not None else []),
        "args": {k2: (str(v) if isinstance(v, Path) else v) for k2, v in vars(args).items()},
        "torch": torch.__version__, "threads": args.threads,
        "classifier": clf_info, "vae": vae_info, "unet": unet_info,
        "final": final,
        "total_minutes": (time.time() - t_start) / 60,
    }
    (out / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "README.md").write_text(model_card(report))
    log(f"saved to {out} in {report['total_minutes']:.1f} min")
    return 0

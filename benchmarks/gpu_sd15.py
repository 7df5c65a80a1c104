"""Step time and peak GPU memory per method and batch size, at Stable Diffusion 1.5 size and 512 px.

    python benchmarks/gpu_sd15.py [--methods dag-db,...] [--batches 1,2,4,8] [--steps 20] [--dtype bfloat16]
                                  [--budget-gb 24] [--json benchmarks/out/gpu_sd15.json]
    python benchmarks/gpu_sd15.py --device cpu --tiny      # smoke mode: tiny components, runs anywhere

Nothing is downloaded: the UNet, VAE and CLIP text encoder are built from the real SD1.5 config values with
random weights (UNet block_out_channels (320, 640, 1280, 1280), cross_attention_dim 768, 2 layers per
block; the f8 KL-VAE with (128, 256, 512, 512); the CLIP ViT-L/14 text transformer, 12 layers × 768, 77
tokens), so every forward/backward costs what the real model costs. The reward is the LAION aesthetic
predictor's compute: a random CLIP ViT-L/14 vision tower (24 layers × 1024, 224 px) and the 768→1 MLP head.
LoRA rank 4 on the UNet attention projections; frozen weights in ``--dtype``; classifier-free guidance 7.5
(CFG doubles every UNet pass).

For each method and batch size B: one warm-up epoch, then ``--repeats`` timed epochs of B trajectories;
each epoch trains on its selected transitions in micro-batches of B (one optimizer update each). Reported:
sampling seconds per epoch, **seconds per update** (micro-batch of B transitions), transitions/s, network
rows per transition (counted by hooks, see throughput.py), and ``torch.cuda.max_memory_allocated``.
"Fits in 24 GB" is peak allocated ≤ ``--budget-gb`` (allocator caching and CUDA context add ~1 GB more in
practice). Without CUDA the script exits with a message unless ``--device cpu`` is given explicitly.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import METHODS, Harness, accepts_option, measure  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------------
# components from configs (no downloads)


def _tokenizer(model_max_length: int = 77):
    """An offline CLIP-style BPE tokenizer over a small word list (ids are arbitrary; lengths are padded
    to ``model_max_length`` exactly like the real tokenizer, which is what the compute depends on)."""
    from transformers import CLIPTokenizer

    from gfnalign.rewards.prompts import load_prompts

    words = sorted({w for p in load_prompts("animals") for w in p.lower().split()} | {"a", "photo", "of", "the"})
    byte_chars = [chr(c) for c in range(ord("!"), ord("~") + 1)]
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in byte_chars:
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    for w in words:
        w = "".join(c for c in w if c in byte_chars)
        if len(w) < 2:
            continue
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        cur = parts[0]
        for p in parts[1:]:
            if (cur, p) not in merges:
                merges.append((cur, p))
            cur += p
            vocab.setdefault(cur, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def build_components(tiny: bool) -> dict[str, Any]:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = _tokenizer(77 if not tiny else 16)
    if tiny:
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            norm_num_groups=32, sample_size=32)
        te_cfg = CLIPTextConfig(vocab_size=max(len(tok), 100), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
                                bos_token_id=0, eos_token_id=1, pad_token_id=1)
    else:
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
            downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, center_input_sample=False,
            mid_block_scale_factor=1)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, act_fn="silu", sample_size=512,
            scaling_factor=0.18215)
        te_cfg = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                                projection_dim=768, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000)
    return {"unet": unet, "vae": vae, "text_encoder": CLIPTextModel(te_cfg), "tokenizer": tok, "scheduler": sched}


def build_reward(tiny: bool, device: torch.device):
    """The aesthetic reward's compute with random weights: CLIP ViT-L/14 vision tower + LAION MLP head."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from gfnalign.rewards.clip import AestheticHead, AestheticReward

    if tiny:
        cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                               image_size=32, patch_size=8, projection_dim=32)
        dim = 32
    else:
        cfg = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                               image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
        dim = 768
    clip = CLIPVisionModelWithProjection(cfg).eval()
    return AestheticReward(clip_model=clip, head=AestheticHead(dim), device=device)


def build_backbone(tiny: bool, device: torch.device, dtype: str, steps: int, guidance: float,
                   gradient_checkpointing: bool):
    from gfnalign.backbones.sd import StableDiffusionBackbone

    comps = build_components(tiny)
    return StableDiffusionBackbone(
        **comps, num_inference_steps=steps, guidance_scale=guidance, eta=1.0, dtype=dtype, device=device,
        lora_rank=4, lora_alpha=4.0, gradient_checkpointing=gradient_checkpointing,
    )


def method_config(method: str, batch: int, steps: int, fraction: float,
                  sampling: dict[str, Any] | None = None) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if accepts_option(method, "fraction") and method != "rtb":  # rtb trains whole trajectories (its default)
        options["fraction"] = fraction
    return {
        "seed": 0,
        "backbone": {"kind": "digits"},  # unused: the backbone object is passed in
        "reward": "ink",  # unused: the reward object is passed in
        "prompts": "animals",
        "method": {"name": method, "options": options},
        "sampling": {"num_steps": steps, "batch_size": batch, "batches_per_epoch": 1, "guidance_scale": 7.5,
                     **(sampling or {})},
        "training": {"micro_batch": batch},
        "lookahead": {"mode": "cached"},
        "logging": {"progress": False, "tensorboard": False},
    }


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def main(argv: list[str] | None = None, *, name: str = "gpu_sd15", label: str = "SD1.5-size",
         builder: Any = None, doc: str | None = None, sampling: dict[str, Any] | None = None,
         default_methods: str | None = None, default_guidance: float = 7.5) -> int:
    """The benchmark loop; ``benchmarks/gpu_sdxl.py`` and ``gpu_flow.py`` run it with other components
    (``builder``; ``sampling`` overrides the rollout's sampling options, e.g. the flow kernel's noise level)."""
    builder = builder or build_backbone
    p = argparse.ArgumentParser(description=(doc or __doc__).split("\n\n")[0])
    p.add_argument("--methods", default=default_methods or ",".join(METHODS))
    p.add_argument("--batches", default="1,2,4,8,16", help="batch sizes to try, ascending")
    p.add_argument("--steps", type=int, default=20, help="sampling steps per trajectory (papers: 50)")
    p.add_argument("--fraction", type=float, default=0.1, help="fraction of transitions trained per trajectory")
    p.add_argument("--repeats", type=int, default=1, help="timed sampling epochs")
    p.add_argument("--train-repeats", type=int, default=3, help="timed training passes")
    p.add_argument("--dtype", default=None, help="frozen-weight dtype (default bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--guidance", type=float, default=default_guidance)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--budget-gb", type=float, default=24.0)
    p.add_argument("--device", default=None, help="cuda (default) or cpu (only with --tiny in practice)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (CPU smoke mode)")
    p.add_argument("--tiny", action="store_true", help="tiny components at 32 px (smoke test)")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "out" / f"{name}.json")
    args = p.parse_args(argv)

    if args.device is None:
        if not torch.cuda.is_available():
            print(f"{name}: CUDA is not available on this machine; this benchmark needs a GPU "
                  f"(run `python benchmarks/{name}.py --device cpu --tiny` for a smoke test).")
            return 0
        args.device = "cuda"
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"{name}: --device {args.device} requested but CUDA is not available; nothing to do.")
        return 0
    if device.type == "cpu" and not args.tiny:
        print(f"{name}: {label} models on the CPU would take hours; add --tiny for the smoke mode.")
        return 2
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    batches = sorted(int(b) for b in args.batches.split(","))

    t_build = time.perf_counter()
    backbone = builder(args.tiny, device, dtype, args.steps, args.guidance, args.gradient_checkpointing)
    reward = build_reward(args.tiny, device)
    print(f"built {'tiny' if args.tiny else label} components in {time.perf_counter() - t_build:.1f}s "
          f"({sum(p.numel() for p in backbone.unet.parameters()) / 1e6:.0f}M UNet params incl. LoRA)", flush=True)
    lora_state = backbone.trainable_state_dict()

    rows: list[dict[str, Any]] = []
    for method in methods:
        for b in batches:
            backbone.load_trainable_state_dict(lora_state)  # every run starts from the same adapter
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            try:
                h = Harness(method_config(method, b, args.steps, args.fraction, sampling), device, backbone=backbone,
                            reward=reward)
                res = measure(h.cfg.to_dict(), device, b, args.repeats, unit={}, harness=h,
                              train_repeats=args.train_repeats)
                updates = max(1, -(-res["transitions_per_epoch"] // b))
                row = {"method": method, "batch": b, "sample_s_per_epoch": min(res["sample_s"]),
                       "s_per_update": res["train_s_per_transition"] * res["transitions_per_epoch"] / updates,
                       "transitions_per_s": res["train_transitions_per_s"],
                       "nfe_per_transition": res["nfe_per_transition_train"],
                       "peak_mem_gb": res["peak_mem_mb"] / 1024}
                row["fits_budget"] = row["peak_mem_gb"] <= args.budget_gb
                h.probe.close()
            except Exception as err:  # noqa: BLE001 - record OOMs and failures per cell
                if not _is_oom(err):
                    import traceback

                    traceback.print_exc()
                row = {"method": method, "batch": b, "error": "OOM" if _is_oom(err) else f"{type(err).__name__}: {err}"}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if row.get("error") == "OOM" or not row.get("fits_budget", True):
                break  # larger batches only need more memory
    largest = {}
    for m in methods:
        ok = [r["batch"] for r in rows if r["method"] == m and r.get("fits_budget")]
        largest[m] = max(ok) if ok else None
    meta = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
            "torch": torch.__version__, "dtype": dtype, "steps": args.steps, "tiny": args.tiny,
            "budget_gb": args.budget_gb}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "rows": rows, "largest_batch_in_budget": largest}, indent=2) + "\n")
    print("| method | batch | s / update | sampling s / epoch | peak GB | fits |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['method']} | {r['batch']} | {r['error'][:80]} | | | no |")
        else:
            print(f"| {r['method']} | {r['batch']} | {r['s_per_update']:.3f} | {r['sample_s_per_epoch']:.2f} | "
                  f"{r['peak_mem_gb']:.2f} | {'yes' if r['fits_budget'] else 'no'} |")
    print("largest batch within budget:", json.dumps(largest))
    return 0


if __name__ == "__main__":
    sys.exit(main())

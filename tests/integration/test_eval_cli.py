"""`gfnalign eval` end to end on a tiny random-init Stable Diffusion pipeline (offline, seconds)."""

import json

import pytest
import torch
import yaml

pytest.importorskip("diffusers")


def _tiny_pipeline(path):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    vocab["ab"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=[("a", "b")], model_max_length=8)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=32, sample_size=16)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab) + 2, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                      num_attention_heads=4, max_position_embeddings=16, bos_token_id=0,
                                      eos_token_id=1, pad_token_id=1))
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched, safety_checker=None,
                            feature_extractor=None, requires_safety_checker=False).save_pretrained(path)


@pytest.mark.slow
def test_gfnalign_eval_on_tiny_run(tmp_path):
    from gfnalign.backbones.sd import StableDiffusionBackbone
    from gfnalign.cli.main import main

    pipe = tmp_path / "pipe"
    _tiny_pipeline(pipe)
    (tmp_path / "prompts.txt").write_text("a cat\na dog\n")
    run = tmp_path / "run"
    run.mkdir()
    cfg = {"backbone": {"kind": "sd", "path": str(pipe)}, "reward": "ink", "prompts": str(tmp_path / "prompts.txt"),
           "method": {"name": "dag-db"}, "sampling": {"num_steps": 3, "guidance_scale": 1.0}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    # a "fine-tuned" LoRA: perturb the adapter so the two models differ
    bb = StableDiffusionBackbone.from_pretrained(pipe, num_inference_steps=3, guidance_scale=1.0, lora_rank=4)
    with torch.no_grad():
        for p in bb.trainable_parameters():
            p.add_(0.5 * torch.randn_like(p))
    bb.save_adapter(run / "final")
    (run / "report.md").write_text("# report\n")

    out = tmp_path / "eval.json"
    rc = main(["eval", "--run", str(run), "--samples", "3", "--json", str(out), "--features", "pixels:4",
               "--batch-size", "4", "--device", "cpu"])
    assert rc == 0
    res = json.loads(out.read_text())
    for key in ("reward_mean", "reward_std", "diversity", "prior_drift", "prior_drift_floor", "pretrained", "per_prompt"):
        assert key in res, key
    assert res["num_prompts"] == 2 and res["samples_per_prompt"] == 3
    assert res["prior_drift"] > 0 and res["diversity"] > 0
    assert [r["prompt"] for r in res["per_prompt"]] == ["a cat", "a dog"]
    assert "## Evaluation: dag-db" in (run / "report.md").read_text()

    # --lora none evaluates the pretrained model against itself: zero drift, equal rewards
    rc = main(["eval", "--run", str(run), "--lora", "none", "--samples", "2", "--json", str(out), "--features",
               "pixels:4", "--no-floor", "--no-report", "--device", "cpu"])
    res = json.loads(out.read_text())
    assert res["prior_drift"] == pytest.approx(0.0, abs=1e-6)
    assert res["reward_mean"] == pytest.approx(res["pretrained"]["reward_mean"], abs=1e-6)


def test_gfnalign_eval_errors(tmp_path, capsys):
    from gfnalign.cli.main import main

    assert main(["eval", "--run", str(tmp_path)]) == 2
    assert "config.yaml" in capsys.readouterr().err
    assert main(["eval", "--run", str(tmp_path), "--samples", "1"]) == 2
    assert "--samples=1" in capsys.readouterr().err

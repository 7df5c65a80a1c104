"""The shipped flow-matching digits world: plain StableDiffusion3Pipeline loading, the pretraining's zero-row
emulation, and every objective training through the trainer on it with a LoRA plain diffusers loads."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from gfnalign.backbones.digits import DIGIT_PROMPTS
from gfnalign.backbones.digits_flow import PIPELINE_DIR
from gfnalign.training.presets import DIGITS_FLOW_METHODS
from tests.integration._train_utils import metrics_rows

pytestmark = pytest.mark.slow


def test_zero_row_count_processor_equals_repeated_zero_rows():
    """Pretraining runs one zero T5 row with its attention logit raised by log L; that must equal the pipeline's
    L identical zero rows (float64, random weights, L = 37), and differ from one plain row."""
    from gfnalign.backbones.digits_flow_pretrain import (
        ZeroRowCountProcessor,
        build_flow_components,
        encode_flow_text,
        make_flow_pipeline,
    )

    c = build_flow_components(0, num_layers=2, heads=2, head_dim=8)
    pipe = make_flow_pipeline(c)
    prompts = [DIGIT_PROMPTS[7], DIGIT_PROMPTS[2]]
    one, pooled = encode_flow_text(pipe, prompts, zero_rows=1)
    many, _ = encode_flow_text(pipe, prompts, zero_rows=37)
    assert many.shape[1] == one.shape[1] + 36 and bool((many[:, one.shape[1]:] == 0).all())
    tr = copy.deepcopy(c["transformer"]).double()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([300.0, 800.0], dtype=torch.float64)

    def run(embeds):
        return tr(hidden_states=x, timestep=t, encoder_hidden_states=embeds.double(),
                  pooled_projections=pooled.double()).sample

    reference, single = run(many), run(one)
    stock = tr.attn_processors
    processor = ZeroRowCountProcessor()
    processor.log_count = torch.full((2,), math.log(37.0), dtype=torch.float64)
    tr.set_attn_processor(processor)
    emulated = run(one)
    tr.set_attn_processor(stock)
    assert (emulated - reference).abs().max() < 1e-10
    assert (single - reference).abs().max() > 1e-3  # the count matters, so the check above can fail


def test_shipped_flow_pipeline_loads_in_plain_diffusers_and_draws_prompted_digits():
    from diffusers import StableDiffusion3Pipeline

    from gfnalign.backbones.digits import load_digit_classifier

    files = [p for p in PIPELINE_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 20e6  # a few MB
    pipe = StableDiffusion3Pipeline.from_pretrained(PIPELINE_DIR, text_encoder_3=None, tokenizer_3=None)
    assert pipe.text_encoder_3 is None
    pipe.set_progress_bar_config(disable=True)
    prompts = [DIGIT_PROMPTS[k] for k in range(10)] * 2
    # the pipeline's own sampler and defaults except the step count (28 -> 10): 256 zero T5 rows, guidance 7
    images = pipe(prompts, num_inference_steps=10, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert images.shape == (20, 3, 16, 16) and torch.isfinite(images).all()
    correct = int((load_digit_classifier()(images).argmax(-1) == torch.arange(10).repeat(2)).sum())
    # the card reports ≥ 0.9 on 500 draws; 14 of 20 fails with probability < 1e-3 at accuracy 0.9
    assert correct >= 14, f"{correct}/20 prompted digits"


def _flow_config(method: str, prompts: Path) -> dict:
    from gfnalign.training.presets import digits_flow_preset

    cfg = digits_flow_preset(method)
    cfg["prompts"] = str(prompts)
    cfg["sampling"].update({"num_steps": 4, "batch_size": 4, "batches_per_epoch": 1})
    if "images_per_prompt" in cfg["sampling"]:
        cfg["sampling"]["images_per_prompt"] = 2
    cfg["training"].update({"epochs": 1, "micro_batch": 4, "max_updates_per_epoch": 1, "lr": 0.05})
    cfg["method"]["options"]["fraction"] = 1.0 if "fraction" in cfg["method"]["options"] else None
    cfg["method"]["options"] = {k: v for k, v in cfg["method"]["options"].items() if v is not None}
    cfg["logging"] = {"report": False, "tensorboard": False, "progress": False, "sample_every": 0,
                      "checkpoint_every": 1, "eval_samples": 0}
    return cfg


@pytest.mark.parametrize("method", DIGITS_FLOW_METHODS)
def test_digits_flow_preset_trains_and_its_lora_loads_in_plain_diffusers(method, tmp_path):
    """Every method's digits-flow preset (shrunk to one update) through the trainer; the final LoRA changes
    the samples of a plain StableDiffusion3Pipeline loaded from the shipped folder."""
    from diffusers import StableDiffusion3Pipeline

    from gfnalign.training.config import TrainConfig
    from gfnalign.training.trainer import Trainer

    (tmp_path / "prompts.txt").write_text(f"{DIGIT_PROMPTS[3]}\n{DIGIT_PROMPTS[8]}\n")
    cfg = TrainConfig.from_dict(_flow_config(method, tmp_path / "prompts.txt"))
    assert cfg.backbone.kind == "digits-flow" and cfg.sampling.kernel == "flow_sde"
    run = tmp_path / "run"
    assert Trainer(cfg, run).train() == 0
    rows = metrics_rows(run)
    assert rows and math.isfinite(rows[-1]["loss/total"]) and math.isfinite(rows[-1]["reward/mean"])
    pipe = StableDiffusion3Pipeline.from_pretrained(PIPELINE_DIR, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)

    def draw():
        return pipe([DIGIT_PROMPTS[3]], num_inference_steps=3, guidance_scale=1.0, max_sequence_length=1,
                    generator=torch.Generator().manual_seed(0), output_type="pt").images

    base = draw()
    pipe.load_lora_weights(str(run / "final"))
    tuned = draw()
    assert not torch.allclose(base, tuned)

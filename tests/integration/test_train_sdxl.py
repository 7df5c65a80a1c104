"""`gfnalign train` (the command's in-process entry point) on a tiny random-init SDXL folder: one short run
per method family (DAG, ∇-GFlowNet, DDPO, reward-backprop) through the same trainer and objectives as SD."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from gfnalign.cli.main import main as gfnalign_main  # noqa: E402
from tests.integration._sdxl_utils import build_tiny_sdxl, make_sdxl_pipeline  # noqa: E402
from tests.integration._train_utils import metrics_rows, tiny_config  # noqa: E402

pytestmark = pytest.mark.slow

# (method, options, backbone.kind): "sd" checks that the SDXL folder is detected from model_index.json
RUNS = [
    ("dag-db", {"fraction": 0.5}, "sdxl"),
    ("residual-nabla-db", {"fraction": 0.5}, "sd"),
    ("ddpo", {"fraction": 0.5}, "sdxl"),
    ("reward-backprop", {"variant": "draft-k", "k": 1}, "sdxl"),
]
# the sdxl-* DAG presets' faithful choices: the authors' flow network and their recomputed, unguided lookahead
DAG_PRESET = {"backbone": {"log_flow_head": "dag"},
              "lookahead": {"mode": "recompute", "model": "policy", "guided": False}}


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny_sdxl_train") / "pipeline"
    make_sdxl_pipeline(build_tiny_sdxl(seed=0)).save_pretrained(d)
    return d


@pytest.mark.parametrize(("method", "options", "kind"), RUNS, ids=[r[0] for r in RUNS])
def test_gfnalign_train_runs_each_method_family_on_sdxl(method, options, kind, sdxl_dir, tmp_path):
    faithful = DAG_PRESET if method.startswith("dag") else {"backbone": {}}
    cfg = tiny_config(sdxl_dir, method, options,
                      backbone={"kind": kind, "path": str(sdxl_dir), "lora_rank": 2, "lora_alpha": 2.0,
                                "heads": "backbone", **faithful["backbone"]},
                      **({"lookahead": faithful["lookahead"]} if "lookahead" in faithful else {}),
                      prompts="animals",
                      sampling={"num_steps": 2, "guidance_scale": 2.0, "batch_size": 2, "batches_per_epoch": 1},
                      training={"epochs": 1, "micro_batch": 2, "max_updates_per_epoch": 1, "lr": 0.05})
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    assert gfnalign_main(["train", "--config", str(config), "--out", str(run)]) == 0
    rows = metrics_rows(run)
    assert rows and rows[-1]["step"] == 1
    for key in ("reward/mean", "loss/total"):
        assert math.isfinite(rows[-1][key]), key
    final = run / "final"
    assert (final / "pytorch_lora_weights.safetensors").is_file()
    assert "StableDiffusionXLPipeline.from_pretrained" in (final / "README.md").read_text()
    # the exported LoRA is what the run trained: it moves the UNet away from the base
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(sdxl_dir), add_watermarker=False)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    kw = {"encoder_hidden_states": torch.randn(1, 16, 56, generator=torch.Generator().manual_seed(1)),
          "added_cond_kwargs": {"text_embeds": torch.randn(1, 16, generator=torch.Generator().manual_seed(2)),
                                "time_ids": torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]])}}
    with torch.no_grad():
        base = pipe.unet(x, 500, **kw).sample
        pipe.load_lora_weights(str(final))
        tuned = pipe.unet(x, 500, **kw).sample
    assert (tuned - base).abs().max() > 1e-6

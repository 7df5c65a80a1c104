"""The trainer on a tiny random-init SD3 pipeline folder: the flow kernels under unchanged objectives, and
the final LoRA loads in plain StableDiffusion3Pipeline."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from gfnalign.training.config import ConfigError, TrainConfig
from gfnalign.training.trainer import Trainer
from tests.integration._train_utils import metrics_rows, tiny_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory) -> Path:
    from diffusers import StableDiffusion3Pipeline

    from gfnalign.backbones.sd3 import random_sd3_components

    path = tmp_path_factory.mktemp("sd3") / "tiny-sd3"
    StableDiffusion3Pipeline(**random_sd3_components(seed=0)).save_pretrained(str(path))
    return path


def _cfg(folder: Path, method: str, **sections):
    base = tiny_config(folder, method, {}, backbone={"kind": "sd3", "path": str(folder), "lora_rank": 2,
                                                     "lora_alpha": 2.0},
                       sampling={"num_steps": 3, "guidance_scale": 1.0, "batch_size": 2, "batches_per_epoch": 1,
                                 "eta": 0.7},
                       training={"epochs": 1, "micro_batch": 2, "max_updates_per_epoch": 1, "lr": 0.05})
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return TrainConfig.from_dict(base)


@pytest.mark.parametrize("method", ["grpo", "dag-db", "dag-kl", "nabla-db", "residual-nabla-db", "rtb", "ddpo",
                                    "reward-backprop"])
def test_sd3_trains_through_the_trainer_and_its_lora_loads_in_diffusers(method, sd3_folder, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    # one prompt: grpo's groups are per prompt, and a group of one has advantage 0
    (tmp_path / "prompts.txt").write_text("a handwritten digit seven\n")
    # dag-db with the sd35m-* presets' DAG choices: the authors' flow network and recomputed, unguided lookahead
    dag = {"backbone": {"heads": "backbone", "log_flow_head": "dag"},
           "lookahead": {"mode": "recompute", "model": "policy", "guided": False}} if method == "dag-db" else {}
    cfg = _cfg(sd3_folder, method, sampling={"batch_size": 3}, **dag)
    cfg = TrainConfig.from_dict({**cfg.to_dict(), "prompts": str(tmp_path / "prompts.txt")})
    run = tmp_path / "run"
    assert Trainer(cfg, run).train() == 0
    rows = metrics_rows(run)
    assert rows and math.isfinite(rows[-1]["loss/total"]) and math.isfinite(rows[-1]["reward/mean"])
    pipe = StableDiffusion3Pipeline.from_pretrained(str(sd3_folder), text_encoder_3=None, tokenizer_3=None)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    embeds = torch.randn(1, 24, 32, generator=torch.Generator().manual_seed(1))
    pooled = torch.randn(1, 32, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([500.0])
    with torch.no_grad():
        base = pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=embeds, pooled_projections=pooled).sample
        pipe.load_lora_weights(str(run / "final"))
        tuned = pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=embeds, pooled_projections=pooled).sample
    assert not torch.allclose(base, tuned)


def test_sd3_sampling_config_is_validated(sd3_folder):
    with pytest.raises(ConfigError, match="sampling.kernel"):
        _cfg(sd3_folder, "grpo", sampling={"kernel": "euler"})
    with pytest.raises(ConfigError, match="cps"):
        _cfg(sd3_folder, "grpo", sampling={"kernel": "cps", "eta": 1.5})
    assert _cfg(sd3_folder, "grpo", sampling={"eta": 1.4142}).sampling.eta == 1.4142  # flow_sde: a > 1 allowed
    with pytest.raises(ConfigError, match="flow_sde"):
        TrainConfig.from_dict(tiny_config(sd3_folder, "grpo", {}, sampling={"kernel": "flow_sde"}))

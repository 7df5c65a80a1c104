"""The trainer on a tiny random-init FLUX pipeline folder: the flow kernels and the guidance embedding under
unchanged objectives, and the final LoRA loads in plain FluxPipeline and changes its output."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from gfnalign.training.config import ConfigError, TrainConfig
from gfnalign.training.trainer import Trainer
from tests.integration._train_utils import metrics_rows, tiny_config

pytestmark = pytest.mark.slow
IMAGE = 16


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory) -> Path:
    from diffusers import FluxPipeline

    from gfnalign.backbones.flux import random_flux_components

    path = tmp_path_factory.mktemp("flux") / "tiny-flux"
    FluxPipeline(**random_flux_components(seed=0)).save_pretrained(str(path))
    return path


def _cfg(folder: Path, method: str, options=None, **sections):
    base = tiny_config(folder, method, options or {},
                       backbone={"kind": "flux", "path": str(folder), "lora_rank": 2, "lora_alpha": 2.0,
                                 "image_size": IMAGE, "max_sequence_length": 8},
                       sampling={"num_steps": 3, "guidance_scale": 3.5, "batch_size": 3, "batches_per_epoch": 1,
                                 "eta": 0.7},
                       training={"epochs": 1, "micro_batch": 3, "max_updates_per_epoch": 1, "lr": 0.05})
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return TrainConfig.from_dict(base)


@pytest.mark.parametrize("method,options", [("grpo", {"kl_beta": 0.04}), ("dag-db", {"relative": True}), ("dag-kl", {}),
                                            ("nabla-db", {}), ("residual-nabla-db", {}), ("rtb", {}), ("ddpo", {}),
                                            ("reward-backprop", {})])
def test_flux_trains_through_the_trainer_and_its_lora_changes_the_pipeline(method, options, flux_folder, tmp_path):
    from diffusers import FluxPipeline

    from gfnalign.backbones.flux import pack_latents

    # one prompt: grpo's groups are per prompt, and a group of one has advantage 0
    (tmp_path / "prompts.txt").write_text("a handwritten digit seven\n")
    # dag-db with the flux1-* presets' DAG choices: the authors' flow network and recomputed, unguided lookahead
    dag = {"backbone": {"heads": "backbone", "log_flow_head": "dag"},
           "lookahead": {"mode": "recompute", "model": "policy", "guided": False}} if method == "dag-db" else {}
    cfg = _cfg(flux_folder, method, options, **dag)
    cfg = TrainConfig.from_dict({**cfg.to_dict(), "prompts": str(tmp_path / "prompts.txt")})
    run = tmp_path / "run"
    assert Trainer(cfg, run).train() == 0
    rows = metrics_rows(run)
    assert rows and math.isfinite(rows[-1]["loss/total"]) and math.isfinite(rows[-1]["reward/mean"])
    pipe = FluxPipeline.from_pretrained(str(flux_folder))
    pipe.set_progress_bar_config(disable=True)
    z = pack_latents(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)))
    kw = dict(height=IMAGE, width=IMAGE, num_inference_steps=3, guidance_scale=3.5, output_type="latent",
              max_sequence_length=8)
    base = pipe("a handwritten digit seven", latents=z, **kw).images
    pipe.load_lora_weights(str(run / "final"))
    tuned = pipe("a handwritten digit seven", latents=z, **kw).images
    assert torch.isfinite(tuned).all() and not torch.allclose(base, tuned, atol=1e-6)


def test_flux_config_is_validated(flux_folder):
    cfg = _cfg(flux_folder, "grpo")
    assert cfg.backbone.kind == "flux"
    # "sd" detects the FLUX folder, so flow_sde (the flow families' default kernel) is allowed there
    assert _cfg(flux_folder, "grpo", backbone={"kind": "sd"}).sampling.eta == 0.7
    with pytest.raises(ConfigError, match="backbone.max_sequence_length"):
        _cfg(flux_folder, "grpo", backbone={"max_sequence_length": 1000})
    with pytest.raises(ConfigError, match="backbone.kind='sd3'.*flux"):
        _cfg(flux_folder, "grpo", backbone={"kind": "sd3"})
    with pytest.raises(ConfigError, match="max_sequence_length.*digits"):
        TrainConfig.from_dict(tiny_config(flux_folder, "grpo", {}, backbone={"kind": "digits", "path": None,
                                                                             "max_sequence_length": 8}))


def test_images_per_prompt_samples_whole_groups(flux_folder, tmp_path):
    """grpo's groups: sampling.images_per_prompt consecutive trajectories share one drawn prompt, across the
    epoch's sampling batches; a group size that does not divide the epoch is a named error."""
    cfg = _cfg(flux_folder, "grpo", sampling={"batch_size": 2, "batches_per_epoch": 3, "images_per_prompt": 3,
                                              "num_steps": 2})
    cfg = TrainConfig.from_dict({**cfg.to_dict(), "prompts": "digits"})
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.setup()
    traj, _ = trainer.sample_epoch(0)
    ids = traj.prompt_id.reshape(2, 3)
    assert (ids == ids[:, :1]).all() and traj.prompts[0] == traj.prompts[2] and traj.batch_size == 6
    with pytest.raises(ConfigError, match="sampling.images_per_prompt=4"):
        _cfg(flux_folder, "grpo", sampling={"batch_size": 2, "batches_per_epoch": 3, "images_per_prompt": 4})

"""Short trainer runs on a tiny random-init digits-like pipeline: every method, exact resume, reliability."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from gfnalign.training.config import TrainConfig
from gfnalign.training.trainer import NanLossError, Trainer
from tests.integration._train_utils import metrics_rows, tiny_config, tiny_pipeline, trainable

pytestmark = pytest.mark.slow
METHODS = ["dag-db", "dag-kl", "nabla-db", "residual-nabla-db", "rtb", "ddpo", "reward-backprop"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    return tiny_pipeline(tmp_path_factory.mktemp("tiny"))


@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_and_exports(method, pipeline, tmp_path):
    options = {"variant": "draft-k", "k": 1} if method == "reward-backprop" else {}
    cfg = TrainConfig.from_dict(tiny_config(pipeline, method, options,
                                            training={"epochs": 1, "micro_batch": 2, "max_updates_per_epoch": 1}))
    run = tmp_path / "run"
    assert Trainer(cfg, run).train() == 0
    rows = metrics_rows(run, drop_perf=False)
    assert rows and rows[-1]["step"] == 1
    for key in ("reward/mean", "loss/total", "perf/transitions_per_s", "perf/peak_mem_mb"):
        assert key in rows[-1] and math.isfinite(rows[-1][key]), key
    assert (run / "config.yaml").is_file()
    assert (run / "final" / "pytorch_lora_weights.safetensors").is_file()
    assert (run / "final" / "README.md").is_file()
    assert TrainConfig.load(run / "config.yaml") == cfg


def test_residual_with_decoupled_head_trains_through_the_trainer(pipeline, tmp_path):
    options = {"head_target": "reverse", "reverse_estimator": "bootstrap", "forward_at": "current", "fraction": 0.5}
    cfg = TrainConfig.from_dict(tiny_config(pipeline, "residual-nabla-db", options,
                                            training={"epochs": 1, "micro_batch": 2, "max_updates_per_epoch": 2}))
    run = tmp_path / "run"
    assert Trainer(cfg, run).train() == 0
    rows = [r for r in metrics_rows(run, drop_perf=False) if "loss/rev" in r]
    assert rows, "no training row logged the reverse (head) loss"
    for key in ("loss/fwd", "loss/rev", "loss/terminal"):
        assert math.isfinite(rows[-1][key]), key
    assert rows[-1]["loss/rev"] > 0  # the head's bootstrap target J_#ᵀψ(x_next) is not zero


@pytest.mark.parametrize(("method", "options"), [("rtb", {"log_z": "start", "grad_fraction": 0.5}),
                                                ("dag-db", {"relative": True})])
def test_tilted_start_trains_through_the_trainer(pipeline, tmp_path, method, options):
    cfg = TrainConfig.from_dict(tiny_config(pipeline, method, options, sampling={"start": "tilted", "start_candidates": 3},
                                            training={"epochs": 1, "micro_batch": 4, "max_updates_per_epoch": 1}))
    run = tmp_path / "run"
    assert Trainer(cfg, run).train() == 0
    rows = metrics_rows(run)
    assert rows and math.isfinite(rows[-1]["loss/total"])


def test_tilted_start_is_rejected_for_an_objective_without_a_start_value(pipeline, tmp_path):
    cfg = TrainConfig.from_dict(tiny_config(pipeline, "rtb", {}, sampling={"start": "tilted"}))
    with pytest.raises(ValueError, match="sampling.start=tilted needs"):
        Trainer(cfg, tmp_path / "run").train()


def _resume_cfg(pipeline: Path, flow_gradient: str = "full") -> TrainConfig:
    return TrainConfig.from_dict(tiny_config(
        pipeline, "dag-db", {"fraction": 0.5, "flow_gradient": flow_gradient},
        training={"epochs": 2, "micro_batch": 2, "max_updates_per_epoch": 2},
        logging={"report": False, "tensorboard": False, "progress": False, "sample_every": 0,
                 "checkpoint_every": 1, "keep_checkpoints": 3},
    ))


@pytest.mark.parametrize("flow_gradient", ["full", "target"])
def test_interrupt_and_resume_is_bit_exact(pipeline, tmp_path, flow_gradient):
    """Stopped mid-epoch (after update 1), then at an epoch boundary (update 2), then run to the end.
    With ``flow_gradient="target"`` the checkpoint must also carry DAG-DB's target flow network."""
    cfg = _resume_cfg(pipeline, flow_gradient)
    clean = tmp_path / "clean"
    assert Trainer(cfg, clean).train() == 0
    run = tmp_path / "interrupted"
    assert Trainer(cfg, run, stop_after_updates=1).train() == 0
    assert len(metrics_rows(run)) == 1 and not (run / "final").exists()
    assert Trainer(cfg, run, resume="latest", stop_after_updates=2).train() == 0
    assert len(metrics_rows(run)) == 2 and not (run / "final").exists()
    assert Trainer(cfg, run, resume="latest").train() == 0
    assert metrics_rows(run) == metrics_rows(clean)
    a, b = trainable(clean), trainable(run)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    if flow_gradient == "target":  # the trainer moved the target: its zero-initialised output layer is not zero
        heads = torch.load(sorted((run / "checkpoints").glob("*/heads.pt"))[-1])
        out = [v for k, v in heads.items() if k.startswith("target_log_flow_head.") and k.endswith("out.weight")]
        assert out and float(out[0].abs().sum()) > 0


def test_nan_reward_is_skipped_and_counted(pipeline, tmp_path):
    from gfnalign.training.build import build_components

    cfg = TrainConfig.from_dict(tiny_config(pipeline, training={"epochs": 2, "max_updates_per_epoch": 1}))
    comps = build_components(cfg, "cpu")
    calls = {"n": 0}
    good = comps.reward

    def flaky(images, prompts):
        calls["n"] += 1
        r = good(images, prompts)
        return torch.full_like(r, float("nan")) if calls["n"] == 1 else r  # the first epoch's reward is NaN

    flaky.differentiable = True
    trainer = Trainer(cfg, tmp_path / "run", components=replace(comps, reward=flaky))
    assert trainer.train() == 0
    assert trainer.counts["skipped_reward_epochs"] == 1
    rows = metrics_rows(tmp_path / "run")
    assert len(rows) == 1 and rows[0]["epoch"] == 1 and rows[0]["train/skipped_reward_epochs"] == 1
    assert all(math.isfinite(r["reward/mean"]) for r in rows)

    stop_cfg = TrainConfig.from_dict(tiny_config(pipeline, reliability={"on_bad_reward": "stop"}))
    calls["n"] = 0
    from gfnalign.training.trainer import BadRewardError

    with pytest.raises(BadRewardError, match="on_bad_reward"):
        Trainer(stop_cfg, tmp_path / "run2", components=replace(build_components(stop_cfg, "cpu"), reward=flaky)).train()


def test_nan_losses_in_a_row_stop_with_last_checkpoint_intact(pipeline, tmp_path):
    from gfnalign.training.build import build_components
    from gfnalign.training.checkpoint import latest_checkpoint

    cfg = TrainConfig.from_dict(tiny_config(pipeline, "dag-db", training={"epochs": 4, "max_updates_per_epoch": 1},
                                            reliability={"max_nan_streak": 2}))
    comps = build_components(cfg, "cpu")
    objective = comps.objective
    original = type(objective).forward
    state = {"calls": 0}

    def poisoned(self, batch, policy, lookahead, *, beta):
        # count the updates' passes only: the trainer's one-transition memory probe at the first update is not one
        state["calls"] += len(batch) > 1
        out = original(self, batch, policy, lookahead, beta=beta)
        if state["calls"] > 1:  # the first update is fine, every later loss is NaN
            out.loss = out.loss * float("nan")
        return out

    objective.forward = poisoned.__get__(objective)
    run = tmp_path / "run"
    with pytest.raises(NanLossError, match="max_nan_streak"):
        Trainer(cfg, run, components=comps).train()
    rows = metrics_rows(run)
    assert [r["train/skipped"] for r in rows] == [0.0, 1.0, 1.0]  # stopped at the second NaN in a row
    ckpt = latest_checkpoint(run / "checkpoints")
    assert ckpt is not None and ckpt.name == "step_2"  # written after epoch 2; no checkpoint of the failing step
    first = torch.load(run / "checkpoints" / "step_1" / "trainable.pt")
    weights = torch.load(ckpt / "trainable.pt")
    assert all(torch.isfinite(v).all() and torch.equal(v, first[k]) for k, v in weights.items())
    # the run can continue from that checkpoint (e.g. after lowering the learning rate)
    fresh = Trainer(cfg, run, resume="latest", components=build_components(cfg, "cpu"))
    fresh.setup()
    assert fresh.step == 2


def test_final_lora_loads_in_plain_diffusers(pipeline, tmp_path):
    from diffusers import StableDiffusionPipeline

    cfg = TrainConfig.from_dict(tiny_config(pipeline, "reward-backprop", {"k": 1},
                                            training={"epochs": 1, "lr": 0.05, "max_updates_per_epoch": 1}))
    run = tmp_path / "run"
    assert Trainer(cfg, run).train() == 0
    pipe = StableDiffusionPipeline.from_pretrained(str(pipeline), safety_checker=None, requires_safety_checker=False)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = torch.randn(1, 16, pipe.text_encoder.config.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = pipe.unet(x, 500, encoder_hidden_states=cond).sample
        pipe.load_lora_weights(str(run / "final"))
        tuned = pipe.unet(x, 500, encoder_hidden_states=cond).sample
    assert not torch.allclose(base, tuned)

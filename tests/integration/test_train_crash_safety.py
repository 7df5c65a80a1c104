"""Crash safety of a training run: crafted checkpoints, stale temporary folders, torn metrics lines,
several sampling batches per epoch, and runs that trained nothing."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from gfnalign.training import checkpoint as ckpt
from gfnalign.training.config import TrainConfig
from gfnalign.training.trainer import Trainer, TrainingFailedError
from tests.integration._train_utils import metrics_rows, tiny_config, tiny_pipeline, trainable

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    return tiny_pipeline(tmp_path_factory.mktemp("tiny"))


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _cfg(pipeline: Path, **sections) -> TrainConfig:
    base = {"training": {"epochs": 2, "micro_batch": 2, "max_updates_per_epoch": 2},
            "logging": {"report": False, "tensorboard": False, "progress": False, "sample_every": 0,
                        "checkpoint_every": 1, "keep_checkpoints": 3}}
    base.update(sections)
    return TrainConfig.from_dict(tiny_config(pipeline, "dag-db", {"fraction": 0.5}, **base))


def test_resume_refuses_a_crafted_checkpoint_without_running_it(pipeline, tmp_path):
    cfg = _cfg(pipeline)
    run = tmp_path / "run"
    assert Trainer(cfg, run, stop_after_updates=1).train() == 0  # mid-epoch checkpoint: rng + epoch state
    last = ckpt.latest_checkpoint(run / "checkpoints")
    marker = tmp_path / "pwned"
    for name in ("rng_rank0.pt", "epoch_rank0.pt", "optimizer.pt"):
        original = (last / name).read_bytes()
        torch.save({"state": _Payload(str(marker))}, last / name)
        with pytest.raises(ckpt.CheckpointError, match=name):
            Trainer(cfg, run, resume="latest").setup()
        assert not marker.exists(), name
        (last / name).write_bytes(original)


def test_stale_tmp_and_torn_metrics_line_resume_bit_exactly(pipeline, tmp_path):
    cfg = _cfg(pipeline)
    clean = tmp_path / "clean"
    assert Trainer(cfg, clean).train() == 0
    run = tmp_path / "run"
    assert Trainer(cfg, run, stop_after_updates=1).train() == 0
    # what a SIGKILL during the next checkpoint write and during a metrics append leaves behind
    (run / "checkpoints" / ".tmp-step_2").mkdir()
    (run / "checkpoints" / ".tmp-step_2" / "trainable.pt").write_bytes(b"\x00half")
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 2, "epoch": 0, "loss/to')
    assert Trainer(cfg, run, resume="latest").train() == 0
    assert not list((run / "checkpoints").glob(".tmp-*"))
    assert metrics_rows(run) == metrics_rows(clean)
    a, b = trainable(clean), trainable(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (run / "final" / "pytorch_lora_weights.safetensors").read_bytes() == \
        (clean / "final" / "pytorch_lora_weights.safetensors").read_bytes()


def test_kill_before_the_first_checkpoint_leaves_a_startable_run(pipeline, tmp_path):
    import yaml

    from gfnalign.cli.main import main

    run = tmp_path / "run"
    (run / "checkpoints" / ".tmp-step_1").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1, "lo')
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(_cfg(pipeline, training={"epochs": 1, "micro_batch": 2,
                                                             "max_updates_per_epoch": 1}).to_dict()))
    # both a fresh start and `--resume latest` work: there is no complete checkpoint to continue
    assert main(["train", "--config", str(config), "--out", str(run), "--resume", "latest"]) == 0
    assert [r["step"] for r in metrics_rows(run)] == [1]
    assert main(["train", "--config", str(config), "--out", str(run)]) == 2  # now it holds a checkpoint


def test_several_sampling_batches_per_epoch_train(pipeline, tmp_path):
    cfg = _cfg(pipeline, sampling={"num_steps": 3, "batch_size": 2, "batches_per_epoch": 2},
               training={"epochs": 1, "micro_batch": 2, "max_updates_per_epoch": 1})
    assert Trainer(cfg, tmp_path / "run").train() == 0
    assert metrics_rows(tmp_path / "run")[-1]["step"] == 1


def _bad_shape_reward(good):
    def reward(images, prompts):
        return good(images, prompts)[:1]  # one value for a whole batch

    return reward


def test_a_run_that_trained_nothing_fails_and_exports_nothing(pipeline, tmp_path):
    from gfnalign.training.build import build_components

    cfg = _cfg(pipeline)
    comps = build_components(cfg, "cpu")
    trainer = Trainer(cfg, tmp_path / "run", components=replace(comps, reward=_bad_shape_reward(comps.reward)))
    with pytest.raises(TrainingFailedError, match="max_skipped_epoch_fraction=0.5.*expected \\[2\\]"):
        trainer.train()
    assert trainer.epoch == 2 and not (tmp_path / "run" / "final").exists()
    # allowed to skip every epoch: it still trained nothing, so it still fails
    lenient = replace(cfg, reliability=replace(cfg.reliability, max_skipped_epoch_fraction=1.0))
    trainer = Trainer(lenient, tmp_path / "run2", components=replace(comps, reward=_bad_shape_reward(comps.reward)))
    with pytest.raises(TrainingFailedError, match="trained nothing"):
        trainer.train()
    assert not (tmp_path / "run2" / "final").exists()


def test_a_raising_reward_is_skipped_and_counted(pipeline, tmp_path):
    from gfnalign.training.build import build_components

    cfg = _cfg(pipeline)
    comps = build_components(cfg, "cpu")
    calls = {"n": 0}

    def flaky(images, prompts):
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyError("scores")  # the first epoch's reward crashes
        return comps.reward(images, prompts)

    trainer = Trainer(cfg, tmp_path / "run", components=replace(comps, reward=flaky))
    assert trainer.train() == 0
    assert trainer.counts["skipped_reward_epochs"] == 1
    assert [r["epoch"] for r in metrics_rows(tmp_path / "run")] == [1, 1]


def test_an_unreachable_reward_stops_with_a_checkpoint_and_resumes_bit_exactly(pipeline, tmp_path):
    from gfnalign.rewards.base import RewardUnreachableError
    from gfnalign.training.build import build_components
    from gfnalign.training.reward_guard import RewardUnavailableError

    cfg = _cfg(pipeline, reliability={"reward_wait_s": 0.5})
    clean = tmp_path / "clean"
    assert Trainer(cfg, clean).train() == 0
    from gfnalign.training.trainer import derive_seed, seed_everything

    seed_everything(derive_seed(cfg.seed, "init"))  # the initialisation Trainer.setup would make
    comps = build_components(cfg, "cpu")
    state = {"calls": 0, "down": False}

    def server(images, prompts):
        state["calls"] += 1
        if state["down"]:
            raise RewardUnreachableError("connection refused")
        return comps.reward(images, prompts)

    def down_in_epoch_1(images, prompts):
        state["down"] = trainer.epoch >= 1  # the first epoch is scored, then the server goes away
        return server(images, prompts)

    run = tmp_path / "run"
    trainer = Trainer(cfg, run, components=replace(comps, reward=down_in_epoch_1))
    with pytest.raises(RewardUnavailableError, match="checkpoint saved"):
        trainer.train()
    last = ckpt.latest_checkpoint(run / "checkpoints")
    assert last is not None and ckpt.read_json(last / "state.json")["epoch"] == 1
    assert not (run / "final").exists()
    state["down"] = False
    assert Trainer(cfg, run, resume="latest", components=replace(build_components(cfg, "cpu"),
                                                                 reward=server)).train() == 0
    assert metrics_rows(run) == metrics_rows(clean)
    a, b = trainable(clean), trainable(run)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_short_outage_is_waited_out(pipeline, tmp_path):
    from gfnalign.rewards.base import RewardUnreachableError
    from gfnalign.training.build import build_components

    cfg = _cfg(pipeline, training={"epochs": 1, "micro_batch": 2, "max_updates_per_epoch": 1},
               reliability={"reward_wait_s": 60})
    comps = build_components(cfg, "cpu")
    calls = {"n": 0}

    def flaky(images, prompts):
        calls["n"] += 1
        if calls["n"] <= 2:  # down for the first two attempts (~3 s of backoff)
            raise RewardUnreachableError("connection refused")
        return comps.reward(images, prompts)

    trainer = Trainer(cfg, tmp_path / "run", components=replace(comps, reward=flaky))
    assert trainer.train() == 0 and trainer.reward.waits == 2
    assert trainer.counts["skipped_reward_epochs"] == 0

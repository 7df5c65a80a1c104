"""The trainer's update within a memory budget (cut into parts, same weights) and its single progress bar."""

from __future__ import annotations

import pytest
import torch

from gfnalign.training.config import TrainConfig
from gfnalign.training.trainer import Trainer
from tests.integration._train_utils import tiny_config, tiny_pipeline, trainable

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return tiny_pipeline(tmp_path_factory.mktemp("tiny"))


def test_a_tiny_memory_budget_cuts_each_update_into_single_transitions_and_trains_the_same_weights(pipeline, tmp_path):
    runs = {}
    for budget in (1000.0, 1e-9):
        cfg = TrainConfig.from_dict(tiny_config(pipeline, "dag-db", {"fraction": 1.0},
                                                # Adam with a large eps moves the weights in proportion to the
                                                # gradient (a wrong weighting of the parts would show), no clipping
                                                training={"micro_batch": 3, "max_updates_per_epoch": 2, "lr": 0.01,
                                                          "lr_heads": 0.01, "adam_eps": 10.0, "clip_norm": -1},
                                                memory={"budget_gb": budget}))
        trainer = Trainer(cfg, tmp_path / f"b{budget:g}")
        assert trainer.train() == 0
        runs[budget] = (trainer._update_part_rows, trainable(tmp_path / f"b{budget:g}"))
    (rows_big, big), (rows_small, small) = runs[1000.0], runs[1e-9]
    assert rows_big >= 3 and rows_small == 1
    assert big.keys() == small.keys()
    # float32 sums in another order (and the lookahead cut too): equal up to rounding over all the weights together
    # (single tiny tensors such as a cross-attention value's LoRA carry cancelling gradients, where float32
    # rounding is a large share); the float64 test in test_shared_passes.py shows the cut gradient is exact. A
    # wrongly weighted part would move every weight by its share (here 1/3 each): a relative error near 1 or 2.
    # The LoRA up-projections start at zero, so they are the updates themselves (the other weights' norms are
    # dominated by their initial values, which would hide a wrong update).
    ups = [k for k in big if "lora_B" in k]
    diff = torch.cat([(small[k] - big[k]).flatten() for k in ups]).norm()
    moved = torch.cat([big[k].flatten() for k in ups]).norm()
    assert float(moved) > 0
    assert float(diff / moved) < 1e-3, float(diff / moved)


def test_training_draws_one_progress_bar_for_the_whole_run(pipeline, tmp_path, capfd):
    cfg = TrainConfig.from_dict(tiny_config(pipeline, "dag-db", training={"epochs": 2},
                                            logging={"progress": True}))
    assert Trainer(cfg, tmp_path / "run").train() == 0
    err = capfd.readouterr().err
    assert "training:" in err and "2/2" in err
    assert "sampling:" not in err  # no per-epoch sampling bar
    assert "epoch 1/2" not in err  # no per-epoch update bar


@pytest.mark.parametrize("method", ["dag-db", "dag-kl"])
def test_an_update_over_the_budget_even_as_one_part_turns_on_denoiser_checkpointing(pipeline, tmp_path, capfd, method):
    """dag-db is cut down to one transition, dag-kl never cut (leave-one-out groups); both still exceed a tiny
    budget, so the denoiser recomputes its blocks in the backward; with the option off it does not."""
    for auto in (True, False):
        cfg = TrainConfig.from_dict(tiny_config(pipeline, method, {"fraction": 1.0} if method == "dag-db" else {},
                                                training={"max_updates_per_epoch": 1},
                                                memory={"budget_gb": 1e-9, "auto_checkpointing": auto}))
        trainer = Trainer(cfg, tmp_path / f"{method}-{auto}")
        assert trainer.train() == 0
        assert trainer.backbone.unet.is_gradient_checkpointing is auto
        err = capfd.readouterr().err
        assert ("gradient checkpointing of the denoiser is on" in err) is auto


@pytest.mark.parametrize("method", ["nabla-db", "residual-nabla-db"])
def test_the_score_objectives_train_with_denoiser_checkpointing(pipeline, tmp_path, method):
    """Their loss differentiates reference passes of the denoiser (adapters off) after the pass; the blocks are
    recomputed with the adapters as in the forward, so automatic checkpointing applies to them too and the
    trained weights equal an un-checkpointed run's."""
    weights = {}
    for auto in (True, False):
        cfg = TrainConfig.from_dict(tiny_config(pipeline, method, {"fraction": 1.0},
                                                training={"max_updates_per_epoch": 1},
                                                memory={"budget_gb": 1e-9, "auto_checkpointing": auto}))
        trainer = Trainer(cfg, tmp_path / f"{method}-{auto}")
        assert trainer.train() == 0
        assert trainer.backbone.unet.is_gradient_checkpointing is auto
        weights[auto] = {k: v.detach().clone() for k, v in trainer.backbone.trainable_state_dict().items()}
    ups = [k for k in weights[True] if "lora_B" in k]
    moved = torch.cat([weights[False][k].flatten() for k in ups]).norm()
    diff = torch.cat([(weights[True][k] - weights[False][k]).flatten() for k in ups]).norm()
    assert float(moved) > 0
    assert float(diff / moved) < 1e-4, float(diff / moved)

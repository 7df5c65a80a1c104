"""The forward-looking reward: cached values equal per-state recomputation; gradients match finite differences;
recompute mode trains."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gfnalign.training.config import TrainConfig
from gfnalign.training.trainer import Trainer
from tests.integration._train_utils import metrics_rows, tiny_config, tiny_pipeline

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    return tiny_pipeline(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def world(pipeline):
    from gfnalign.training.build import build_components

    cfg = TrainConfig.from_dict(tiny_config(pipeline, "dag-db"))
    return build_components(cfg, "cpu")


def test_cached_lookahead_equals_recomputed_policy_lookahead(world):
    from gfnalign.sampling import rollout
    from gfnalign.training.lookahead import RewardLookahead

    bb = world.backbone
    texts = ["a handwritten digit one", "a handwritten digit seven"]
    cond = bb.encode_prompts(texts)
    gen = torch.Generator().manual_seed(0)
    traj = rollout(bb, cond, bb.initial_noise(2, gen), generator=gen, prompts=texts)
    traj = traj.__class__(**{**traj.__dict__, "reward": world.reward(bb.decode(traj.final).float(), texts)})
    la = RewardLookahead(bb, world.reward, model="policy", guided=True)
    la.set_prompts(cond, texts)
    cached = la.cache_trajectory(traj).lookahead_reward
    K = traj.num_steps
    for k in range(K + 1):
        t = bb.schedule.timesteps[min(k, K - 1)].repeat(2)
        terminal = torch.full((2,), k == K)
        direct = la.log_reward(traj.states[:, k], t, cond, terminal=terminal)
        torch.testing.assert_close(cached[:, k], direct, rtol=1e-4, atol=1e-5)
    assert la.counters.reward > 0 and la.counters.decode > 0


def test_lookahead_gradient_matches_finite_differences(world):
    from gfnalign.training.lookahead import RewardLookahead

    bb = world.backbone
    texts = ["a handwritten digit three"]
    cond = bb.encode_prompts(texts)
    la = RewardLookahead(bb, world.reward, model="reference", guided=True)
    la.set_prompts(cond, texts)
    x = torch.randn(1, *bb.latent_shape, generator=torch.Generator().manual_seed(1))
    t = bb.schedule.timesteps[1].repeat(1)
    terminal = torch.zeros(1, dtype=torch.bool)
    g = la.grad_log_reward(x, t, cond, terminal=terminal)
    v = torch.randn_like(x)
    v = v / v.norm()
    h = 1e-2
    up = la.log_reward(x + h * v, t, cond, terminal=terminal)
    down = la.log_reward(x - h * v, t, cond, terminal=terminal)
    fd = (up - down) / (2 * h)
    assert torch.allclose((g * v).sum(), fd.squeeze(), rtol=5e-2, atol=1e-5)


def test_recompute_mode_trains(pipeline, tmp_path):
    cfg = TrainConfig.from_dict(tiny_config(pipeline, "dag-db", lookahead={"mode": "recompute", "model": "reference"},
                                            training={"epochs": 1, "max_updates_per_epoch": 1}))
    assert Trainer(cfg, tmp_path / "run").train() == 0
    row = metrics_rows(tmp_path / "run")[0]
    assert row["nfe/train_decode_per_transition"] > 0  # rewards of x0_hat recomputed per transition
    assert row["nfe/sample_decode"] == 2  # only the terminal decodes at sampling time


def test_cache_transitions_scores_exactly_the_selected_states_once(world):
    from gfnalign.objectives import build_objective
    from gfnalign.sampling import rollout
    from gfnalign.training.lookahead import RewardLookahead

    bb = world.backbone
    texts = ["a handwritten digit one", "a handwritten digit seven", "a handwritten digit two"]
    cond = bb.encode_prompts(texts)
    gen = torch.Generator().manual_seed(3)
    traj = rollout(bb, cond, bb.initial_noise(3, gen), generator=gen, prompts=texts,
                   traj_id=torch.tensor([10, 11, 12]))
    traj = traj.__class__(**{**traj.__dict__, "reward": world.reward(bb.decode(traj.final).float(), texts)})
    la = RewardLookahead(bb, world.reward, model="policy", guided=True)
    la.set_prompts(cond, texts)
    every = la.cache_trajectory(traj)
    obj = build_objective("dag-db", state_shape=bb.latent_shape, fraction=0.5, stratified=True)
    batch = obj.select_transitions(traj.index(torch.tensor([2, 0, 1])), torch.Generator().manual_seed(0))
    la.counters.reset()
    cached = la.cache_transitions(traj, batch)
    expect = every.transitions(batch.traj_id - 10, batch.step)  # rows of `traj` are traj_id - 10
    torch.testing.assert_close(cached.lookahead_reward_t, expect.lookahead_reward_t)
    torch.testing.assert_close(cached.lookahead_reward_next, expect.lookahead_reward_next)
    K = traj.num_steps
    states = {(int(i), int(s)) for i, s in zip(batch.traj_id, batch.step, strict=True)}
    states |= {(int(i), int(s) + 1) for i, s in zip(batch.traj_id, batch.step, strict=True) if int(s) + 1 < K}
    assert la.counters.reward == len(states) < traj.batch_size * (K + 1)  # each selected state once, no others
    assert la.counters.unet == 0  # the rollout's own x0_hat


@pytest.mark.parametrize("method,reads", [("dag-db", True), ("ddpo", False), ("nabla-db", False)])
def test_trainer_caches_lookahead_only_for_objectives_that_read_it(pipeline, tmp_path, method, reads):
    opts = {"fraction": 0.5} if method != "nabla-db" else {"fraction": 0.5, "trust_region": 1.0}
    cfg = TrainConfig.from_dict(tiny_config(pipeline, method, opts, lookahead={"mode": "cached", "model": "reference"},
                                            training={"epochs": 1, "max_updates_per_epoch": 1}))
    assert Trainer(cfg, tmp_path / "run").train() == 0
    row = metrics_rows(tmp_path / "run")[0]
    if reads:
        # B = 2 trajectories × K = 3 steps: at most the 2·3 non-terminal states, one reference pass each
        assert 0 < row["nfe/lookahead_reward"] == row["nfe/lookahead_unet"] <= 6
    else:
        assert row["nfe/lookahead_reward"] == row["nfe/lookahead_unet"] == row["nfe/lookahead_decode"] == 0
    assert row["nfe/sample_decode"] == 2  # only the terminal decodes at sampling time

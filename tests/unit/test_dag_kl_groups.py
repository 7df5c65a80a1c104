"""DAG-KL's leave-one-out groups are G different trajectories at independently permuted steps (the authors'
per-GPU micro-batch of 8 with per-sample timestep permutation), not G adjacent steps of one trajectory."""

import pytest
import torch

from gfnalign.objectives import build_objective
from gfnalign.objectives.dag_kl import leave_one_out_advantage, rloo_groups
from tests.unit.test_objectives_gradients import BETA, RefParamPolicy, lookahead
from tests.unit.test_objectives_world import make_schedule, sample


def _traj(B, K=10, seed=0):
    return sample(RefParamPolicy(make_schedule(K)), B=B, seed=seed, reward_fn=lambda x: x.sum(1).float())


@pytest.mark.parametrize("B,G,fraction", [(16, 8, 1.0), (16, 8, 0.3), (12, 8, 1.0), (6, 4, 0.5)])
def test_groups_are_distinct_trajectories_at_permuted_steps(B, G, fraction):
    traj = _traj(B)
    obj = build_objective("dag-kl", state_shape=(2,), rloo_group=G, fraction=fraction, stratified=True)
    batch = obj.select_transitions(traj, torch.Generator().manual_seed(1))
    K = traj.num_steps
    J = len(batch) // B
    # every trajectory keeps exactly the steps the ordinary selection draws (same generator state)
    plain = build_objective("dag-kl", state_shape=(2,), rloo_group=0, fraction=fraction, stratified=True)
    ref = plain.select_transitions(traj, torch.Generator().manual_seed(1))
    for tid in range(B):
        assert sorted(batch.step[batch.traj_id == tid].tolist()) == sorted(ref.step[ref.traj_id == tid].tolist())
    # the trainer feeds consecutive rows; the objective's groups are G rows of distinct trajectories
    groups = rloo_groups(batch.traj_id, G)
    sizes = [len(g) for g in groups]
    assert sum(sizes) == len(batch) and all(s >= 2 for s in sizes)
    assert sizes.count(G) == (B // G) * J and all(s == B % G for s in sizes if s != G)
    for g in groups:
        tids = batch.traj_id[g]
        assert len(set(tids.tolist())) == len(tids), "a group holds each trajectory once"
    # steps are permuted per trajectory, so a full-fraction group mixes timesteps (the authors' slots)
    if fraction == 1.0:
        mixed = sum(len(set(batch.step[g].tolist())) > 1 for g in groups)
        assert mixed >= len(groups) - 1
        assert J == K


def test_loss_uses_per_group_leave_one_out_advantages():
    traj = _traj(16)
    pol = RefParamPolicy(make_schedule(10))
    obj = build_objective("dag-kl", state_shape=(2,), rloo_group=8, fraction=1.0, head_zero_init=False).double()
    batch = obj.select_transitions(traj, torch.Generator().manual_seed(0))
    mb = batch.index(torch.arange(32))  # a micro-batch of 4 groups
    delta, _, _, _ = obj.delta(mb, pol, lookahead(), BETA)
    reward = -delta.detach()
    expect = leave_one_out_advantage(reward.reshape(4, 8), obj.adv_clip).reshape(-1)
    whole = leave_one_out_advantage(reward, obj.adv_clip)
    assert not torch.allclose(expect, whole)
    out = obj(mb, pol, lookahead(), beta=BETA)
    assert out.metrics["policy/advantage_abs_mean"] == pytest.approx(float(expect.abs().mean()), rel=1e-9)


def test_rloo_group_validation_and_call_boundaries():
    for bad in (1, -2, 2.5, True):
        with pytest.raises(ValueError, match="rloo_group"):
            build_objective("dag-kl", state_shape=(2,), rloo_group=bad)
    # a repeated trajectory closes a group early; group size 0 is one group
    tid = torch.tensor([0, 1, 2, 0, 1, 2, 3])
    assert [g.tolist() for g in rloo_groups(tid, 8)] == [[0, 1, 2], [3, 4, 5, 6]]
    assert [g.tolist() for g in rloo_groups(tid, 0)] == [list(range(7))]
    with pytest.raises(ValueError, match="micro_batch"):
        leave_one_out_advantage(torch.ones(1), 5.0)

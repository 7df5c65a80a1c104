"""rollout / recompute_log_pf / select_transitions."""

from dataclasses import replace

import pytest
import torch

from gfnalign.sampling import num_selected, recompute_log_pf, rollout, select_slots, select_transitions
from tests.unit.test_objectives_world import DT, PointMassPolicy, make_schedule


@pytest.fixture
def world():
    sched = make_schedule(8)
    return PointMassPolicy(sched, mlp_init=0.3)


def _roll(policy, seed=0, B=5, **kw):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, 2, generator=g, dtype=DT)
    return rollout(policy, None, x0, generator=g, **kw)


def test_rollout_records_and_is_deterministic(world):
    traj = _roll(world)
    B, K = 5, world.schedule.num_steps
    assert traj.states.shape == (B, K + 1, 2) and traj.log_pf.shape == (B, K) and traj.eps.shape == (B, K, 2)
    assert torch.isnan(traj.reward).all() and traj.reward.dtype == torch.float32
    assert traj.prompt_id.tolist() == list(range(B)) and traj.traj_id.tolist() == list(range(B))
    assert traj.log_prob_reduction == "sum" and not traj.states.requires_grad
    again = _roll(world)
    assert torch.equal(traj.states, again.states) and torch.equal(traj.log_pf, again.log_pf)
    assert not torch.equal(traj.states, _roll(world, seed=1).states)
    # recorded eps is the policy's eps at every state
    for k in range(K):
        t = world.schedule.timesteps[k].expand(B)
        with torch.no_grad():
            assert torch.allclose(traj.eps[:, k], world.eps(traj.states[:, k], t, None))


def test_rollout_log_pf_matches_recompute_with_gradient(world):
    traj = _roll(world)
    B, K = traj.batch_size, traj.num_steps
    batch = traj.transitions(torch.arange(B).repeat_interleave(K), torch.arange(K).repeat(B))
    log_pf, eps, kernel = recompute_log_pf(world, batch)
    assert torch.allclose(log_pf, batch.log_pf_old, rtol=1e-12, atol=1e-10)
    assert torch.allclose(eps, batch.eps_old, atol=1e-12)
    log_pf.sum().backward()
    assert world.shift.grad is not None and world.shift.grad.abs().sum() > 0
    ref, _, _ = recompute_log_pf(world, batch, reference=True)
    assert not torch.allclose(ref, log_pf.detach())  # the MLP correction moves the policy off the reference


def test_rollout_mean_reduction_and_partial_steps(world):
    s = _roll(world)
    m = _roll(world, reduction="mean")
    assert torch.allclose(m.log_pf * 2, s.log_pf, rtol=1e-12)
    part = _roll(world, steps=torch.tensor([5, 6, 7]), prompt_id=torch.tensor([3, 3, 1, 1, 0]))
    assert part.num_steps == 3 and part.steps.tolist() == [5, 6, 7] and part.prompt_id.tolist() == [3, 3, 1, 1, 0]
    with pytest.raises(ValueError, match="consecutive"):
        _roll(world, steps=torch.tensor([1, 3]))
    with pytest.raises(ValueError, match="reduction"):
        _roll(world, reduction="avg")


@pytest.mark.parametrize("K,fraction,include_last,expected", [
    (50, 0.1, True, 6), (50, 1.0, True, 50), (10, 0.05, True, 1), (7, 0.5, True, 4), (10, 0.3, False, 3),
    (10, 1.0, False, 10), (10, 0.01, False, 1),
])
def test_num_selected(K, fraction, include_last, expected):
    assert num_selected(K, fraction, include_last) == expected


@pytest.mark.parametrize("stratified", [False, True])
@pytest.mark.parametrize("K,fraction", [(50, 0.1), (10, 1.0), (7, 0.5), (9, 0.3), (1, 1.0)])
def test_select_slots_properties(stratified, K, fraction):
    g = torch.Generator().manual_seed(0)
    slots = select_slots(64, K, fraction=fraction, stratified=stratified, generator=g)
    J = num_selected(K, fraction)
    assert slots.shape == (64, J)
    assert (slots[:, -1] == K - 1).all()  # last step always, sorted rows
    assert (slots[:, 1:] > slots[:, :-1]).all()  # strictly increasing: no duplicates
    assert slots.min() >= 0 and slots.max() <= K - 1
    if fraction == 1.0:
        assert (slots == torch.arange(K)).all()
    again = select_slots(64, K, fraction=fraction, stratified=stratified, generator=torch.Generator().manual_seed(0))
    assert torch.equal(slots, again)


def test_stratified_one_per_trunk_and_uniform_within():
    K, fraction, B = 50, 0.1, 4000
    slots = select_slots(B, K, fraction=fraction, stratified=True, generator=torch.Generator().manual_seed(1))
    # 5 trunks over steps 0..48 with sizes 9 or 10, one draw each, then the last step
    bounds = [(i * 49) // 5 for i in range(6)]
    for j in range(5):
        col = slots[:, j]
        assert ((col >= bounds[j]) & (col < bounds[j + 1])).all()
        counts = torch.bincount(col - bounds[j], minlength=bounds[j + 1] - bounds[j]).double()
        p = 1.0 / (bounds[j + 1] - bounds[j])
        sd = (B * p * (1 - p)) ** 0.5
        assert ((counts - B * p).abs() < 5 * sd).all()


def test_uniform_selection_is_uniform_without_replacement():
    K, fraction, B = 10, 0.3, 4000
    slots = select_slots(B, K, fraction=fraction, stratified=False, generator=torch.Generator().manual_seed(2))
    others = slots[:, :-1]
    counts = torch.bincount(others.flatten(), minlength=K).double()[: K - 1]
    p = 3 / 9  # 3 draws out of steps 0..8 per trajectory
    sd = (B * p * (1 - p)) ** 0.5
    assert ((counts - B * p).abs() < 5 * sd).all()


def test_select_transitions_gathers_rows(world):
    traj = replace(_roll(world), reward=torch.arange(5, dtype=torch.float32))
    batch = select_transitions(traj, fraction=0.5, stratified=True, generator=torch.Generator().manual_seed(0))
    J = num_selected(8, 0.5)
    assert len(batch) == 5 * J and batch.is_last.sum() == 5
    assert batch.traj_id.tolist() == sorted(batch.traj_id.tolist())
    assert batch.reward.tolist() == [float(i) for i in batch.traj_id.tolist()]
    i = 3
    k = int(batch.step[i])
    assert torch.equal(batch.x_t[i], traj.states[int(batch.traj_id[i]), k])
    assert torch.equal(batch.x_next[i], traj.states[int(batch.traj_id[i]), k + 1])
    assert batch.log_prob_reduction == "sum"
    with pytest.raises(ValueError, match="fraction"):
        select_transitions(traj, fraction=0.0)


def test_rollout_promotes_half_precision_states_to_float32():
    pol = PointMassPolicy(make_schedule(4), mlp_init=0.3).float()
    traj = rollout(pol, None, torch.randn(3, 2).to(torch.bfloat16), generator=torch.Generator().manual_seed(0))
    assert traj.states.dtype == torch.float32 and traj.log_pf.dtype == torch.float32

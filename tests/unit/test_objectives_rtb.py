"""Relative trajectory balance: exact on the analytic point-mass world with the plain reward, gradients as
its docstring's table says (subsampled steps scaled by K/J, the reference frozen), whole-trajectory checks."""

from dataclasses import replace

import pytest
import torch
from torch import nn

from gfnalign.objectives import build_objective
from gfnalign.sampling import rollout
from tests.unit.test_objectives_gradients import RefParamPolicy, policy_params
from tests.unit.test_objectives_world import (
    DT,
    A,
    M,
    PointMassPolicy,
    ab_of,
    exact_tilted_policy,
    log_normal,
    log_z,
    make_schedule,
    sample,
    tilted_center,
)

BETA = 0.7


def plain(x):
    return (x @ A).float()


class ExactStartValue(nn.Module):
    """log G(x, t) = log Z + log p'_t(x) − log p_t(x), the pretrained chain's soft value (exact kernels)."""

    def __init__(self, sched):
        super().__init__()
        self.sched, self.center, self.logz = sched, tilted_center(sched, BETA), log_z(sched, BETA)
        self.dummy = nn.Parameter(torch.zeros((), dtype=DT))

    def forward(self, x, t, cond):
        ab = ab_of(self.sched, t)
        return (self.logz + log_normal(x, ab.sqrt() * self.center, 1 - ab) - log_normal(x, ab.sqrt() * M, 1 - ab)
                + self.dummy)


@pytest.mark.parametrize("grad_fraction", [1.0, 0.25])
@pytest.mark.parametrize("detached", ["recompute", "recorded"])
def test_rtb_with_start_value_vanishes_at_the_tilted_path_measure(grad_fraction, detached):
    sched = make_schedule()
    traj = sample(exact_tilted_policy(sched, BETA), B=5, reward_fn=plain)
    obj = build_objective("rtb", log_z="start", log_flow_head=ExactStartValue(sched), grad_fraction=grad_fraction,
                          detached_log_pf=detached).double()
    assert obj.needs_reference and obj.whole_trajectories
    batch = obj.select_transitions(traj, torch.Generator().manual_seed(0))
    assert len(batch) == 5 * sched.num_steps
    out = obj(batch, exact_tilted_policy(sched, BETA), None, beta=BETA)
    assert out.residual.abs().max() < 1e-8 and float(out.loss.detach()) < 1e-14
    bad = exact_tilted_policy(sched, BETA)
    with torch.no_grad():
        bad.shift.add_(0.3)
    if detached == "recompute":  # "recorded" reads the behaviour policy's values for the detached steps
        assert obj(batch, bad, None, beta=BETA).residual.abs().mean() > 1e-2


def test_rtb_prompt_log_z_keeps_the_start_bias():
    """With one log Z for every start the exact global tilt leaves delta = log Z − log G(x_start): the
    value-function bias, exactly."""
    sched = make_schedule()
    traj = sample(exact_tilted_policy(sched, BETA), B=6, reward_fn=plain)
    obj = build_objective("rtb").double()
    with torch.no_grad():
        obj.log_z.bias.fill_(log_z(sched, BETA))
    batch = obj.select_transitions(traj)
    out = obj(batch, exact_tilted_policy(sched, BETA), None, beta=BETA)
    x0 = traj.states[:, 0]
    t0 = sched.timesteps[:1].expand(6)
    expect = log_z(sched, BETA) - ExactStartValue(sched)(x0, t0, None).detach()
    assert torch.allclose(out.residual.reshape(6, -1)[:, 0], expect, atol=1e-8)
    assert expect.abs().max() > 1e-6  # ā_start > 0: the start carries (a little) memory of the image


def _world():
    pol = RefParamPolicy(make_schedule(6))
    g = torch.Generator().manual_seed(0)
    traj = rollout(pol, None, torch.randn(4, 2, generator=g, dtype=DT), generator=g)
    return pol, replace(traj, reward=torch.tanh(traj.final @ A).float())


@pytest.mark.parametrize("grad_fraction", [1.0, 0.5, 0.2])
def test_rtb_gradients(grad_fraction):
    """θ: 2·delta·(K/J)·Σ_grad-rows ∇log P_F^θ (mean over trajectories); log Z: 2·delta; the reference never."""
    pol, traj = _world()
    K = traj.num_steps
    obj = build_objective("rtb", grad_fraction=grad_fraction).double()
    with torch.no_grad():
        obj.log_z.bias.fill_(0.3)
    batch = obj.select_transitions(traj, torch.Generator().manual_seed(1))
    mask = torch.ones(len(batch), dtype=torch.bool) if batch.grad_mask is None else batch.grad_mask
    J = int(mask.reshape(-1, K).sum(1)[0])
    assert J == max(1, int(K * grad_fraction)) and bool((mask.reshape(-1, K).sum(1) == J).all())
    pol.zero_grad()
    obj.zero_grad()
    out = obj(batch, pol, None, beta=BETA)
    out.loss.backward()
    assert pol.ref_gain.grad is None or float(pol.ref_gain.grad.abs().sum()) == 0
    got = [p.grad.clone() for p in policy_params(pol)]
    delta = out.residual.reshape(-1, K)[:, 0]
    # the value of delta is the full one whatever the subsample
    with torch.no_grad():
        lp = obj.policy_kernel(pol, batch)[1].log_prob(batch.x_next).reshape(-1, K).sum(1)
        lr = obj.policy_kernel(pol, batch, reference=True)[1].log_prob(batch.x_next).reshape(-1, K).sum(1)
    assert torch.allclose(delta, 0.3 + lp - lr - BETA * batch.reward.reshape(-1, K)[:, 0].to(DT), atol=1e-9)
    assert torch.allclose(obj.log_z.bias.grad, (2 * delta).mean(), atol=1e-9)
    pol.zero_grad()
    log_pf = obj.policy_kernel(pol, batch)[1].log_prob(batch.x_next)
    weights = (2 * delta.repeat_interleave(K) * K / J * mask.to(DT)) / delta.numel()
    (weights * log_pf).sum().backward()
    for a, p in zip(got, policy_params(pol), strict=True):
        assert torch.allclose(a, p.grad, rtol=1e-8, atol=1e-12)


def test_rtb_recorded_equals_recompute_on_policy():
    pol, traj = _world()
    a = build_objective("rtb", grad_fraction=0.34, detached_log_pf="recompute").double()
    b = build_objective("rtb", grad_fraction=0.34, detached_log_pf="recorded").double()
    batch = a.select_transitions(traj, torch.Generator().manual_seed(2))
    assert torch.allclose(a(batch, pol, None, beta=BETA).residual, b(batch, pol, None, beta=BETA).residual, atol=1e-9)


def test_rtb_rejects_partial_trajectories_and_transition_options():
    pol, traj = _world()
    obj = build_objective("rtb").double()
    batch = obj.select_transitions(traj)
    with pytest.raises(ValueError, match="all 6 steps"):
        obj(batch.index(torch.arange(3, len(batch))), pol, None, beta=BETA)
    with pytest.raises(ValueError, match="fraction=0.1 is not an option of rtb"):
        build_objective("rtb", fraction=0.1)
    with pytest.raises(ValueError, match="grad_fraction"):
        build_objective("rtb", grad_fraction=0.0)
    with pytest.raises(ValueError, match="log_z"):
        build_objective("rtb", log_z="per_prompt")
    with pytest.raises(ValueError, match="detached_log_pf"):
        build_objective("rtb", detached_log_pf="old")
    with pytest.raises(ValueError, match="state_shape"):
        build_objective("rtb", log_z="start")


def test_rtb_prompt_log_z_head_uses_the_conditioning():
    obj = build_objective("rtb", cond_dim=3).double()
    cond = torch.randn(4, 5, 3, dtype=DT)
    assert torch.allclose(obj.log_z(cond, 4), torch.zeros(4, dtype=DT))  # zero-initialised head
    with torch.no_grad():
        obj.log_z.net[2].weight.fill_(0.1)
    out = obj.log_z(cond, 4)
    assert out.shape == (4,) and out.std() > 0


def test_rtb_start_value_is_exposed_for_a_tilted_start():
    sched = make_schedule()
    obj = build_objective("rtb", log_z="start", log_flow_head=ExactStartValue(sched)).double()
    pol = PointMassPolicy(sched)
    x = torch.randn(3, 2, dtype=DT)
    v = obj.log_start_value(pol, x, None)
    assert torch.allclose(v, ExactStartValue(sched)(x, sched.timesteps[:1].expand(3), None))
    assert build_objective("rtb").log_start_value(pol, x, None) is None

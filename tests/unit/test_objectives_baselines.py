"""DDPO and reward backpropagation (ReFL / DRaFT-K / DRaFT-LV)."""

from dataclasses import replace

import pytest
import torch

from gfnalign.core.kernels import forward_kernel
from gfnalign.core.parametrization import eps_to_x0
from gfnalign.objectives import build_objective
from gfnalign.objectives.ddpo import per_prompt_advantages
from tests.unit.test_objectives_world import DT, FnLookahead, PointMassPolicy, make_schedule, sample

BETA = 0.7
C = torch.tensor([1.0, -0.5], dtype=DT)


def r(x):
    return -((x - C) ** 2).sum(1)


def grad_r(x, t=None, terminal=None):
    return -2 * (x - C)


def test_per_prompt_advantages_with_global_fallback():
    reward = torch.tensor([1.0, 3.0, 10.0, 0.0, 5.0])
    pid = torch.tensor([0, 0, 1, 2, 2])
    adv = per_prompt_advantages(reward, pid)
    assert torch.allclose(adv[:2], torch.tensor([-1.0, 1.0]), atol=1e-6)
    assert torch.allclose(adv[3:], torch.tensor([-1.0, 1.0]), atol=1e-6)
    g_mean, g_std = reward.mean(), reward.std(unbiased=False)
    assert adv[2] == pytest.approx(float((10 - g_mean) / g_std), rel=1e-5)
    with pytest.raises(ValueError, match="NaN"):
        per_prompt_advantages(torch.tensor([1.0, float("nan")]), torch.tensor([0, 0]))


def test_ddpo_ratio_is_one_on_policy_even_with_sum_recorded_log_probs():
    sched = make_schedule(6)
    pol = PointMassPolicy(sched, mlp_init=0.5)
    traj = sample(pol, B=8, reward_fn=lambda x: r(x).float())
    traj = replace(traj, prompt_id=torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    obj = build_objective("ddpo")
    assert obj.log_prob_reduction == "mean" and traj.log_prob_reduction == "sum"
    traj = obj.prepare(traj)
    batch = obj.select_transitions(traj, torch.Generator().manual_seed(0))
    out = obj(batch, pol, None, beta=BETA)
    assert out.residual.abs().max() < 1e-12 and out.metrics["policy/clipfrac"] == 0.0
    out.loss.backward()
    assert pol.shift.grad.abs().sum() > 0
    # the on-policy gradient is the plain policy gradient −mean(A ∇log π)
    with torch.no_grad():
        pol.shift.add_(0.05)
    out2 = obj(batch, pol, None, beta=BETA)
    assert out2.residual.abs().max() > 1e-4 and out2.metrics["policy/clipfrac"] > 0
    with pytest.raises(ValueError, match="prepare"):
        obj(batch.with_fields(advantage=None), pol, None, beta=BETA)


def _rerun_chain(pol, traj, k, eta=1.0):
    """Reference implementation: re-run the last k steps with recovered noise, differentiably."""
    K = traj.num_steps
    x = traj.states[:, K - k]
    for j in range(K - k, K):
        B = traj.batch_size
        step = torch.full((B,), j)
        t, _, a, an = pol.schedule.at_steps(step, dtype=DT)
        old = forward_kernel(traj.states[:, j], traj.eps[:, j], a, an, eta)
        z = old.noise_of(traj.states[:, j + 1])
        x = forward_kernel(x, pol.eps(x, t, None), a, an, eta).sample(z)
    return x


@pytest.mark.parametrize("k", [1, 3])
def test_draft_k_gradient_equals_direct_reward_backprop(k):
    sched = make_schedule(6)
    pol = PointMassPolicy(sched, mlp_init=0.5)
    traj = sample(pol, B=5, reward_fn=lambda x: r(x).float())
    obj = build_objective("reward-backprop", variant="draft-k", k=k)
    batch = obj.select_transitions(traj)
    assert len(batch) == 5 * k and batch.is_last.sum() == 5
    la = FnLookahead(grad=lambda x, t, term: (grad_r(x) if bool(term.all()) else pytest.fail("terminal only")))
    with torch.no_grad():
        pol.shift.add_(0.1)  # off-policy: the re-run chain differs from the record
    out = obj(batch, pol, la, beta=BETA)
    assert out.residual.max() > 0
    out.loss.backward()
    g_obj = [p.grad.clone() for p in pol.parameters()]
    pol.zero_grad()
    (-BETA * r(_rerun_chain(pol, traj, k)).mean()).backward()
    for a, p in zip(g_obj, pol.parameters(), strict=True):
        assert torch.allclose(a, p.grad, rtol=1e-9, atol=1e-12)


def test_draft_reparametrisation_reproduces_the_record_on_policy():
    sched = make_schedule(6)
    pol = PointMassPolicy(sched, mlp_init=0.5)
    traj = sample(pol, B=4, reward_fn=lambda x: r(x).float())
    obj = build_objective("reward-backprop", variant="draft-k", k=6)
    batch = obj.select_transitions(traj)
    out = obj(batch, pol, FnLookahead(grad=grad_r), beta=BETA)
    assert out.residual.max() < 1e-20
    assert torch.allclose(_rerun_chain(pol, traj, 6), traj.final, atol=1e-12)
    # rows of a trajectory must stay together and end at the last step
    with pytest.raises(ValueError, match="k=6"):
        obj(batch.index(torch.arange(5)), pol, FnLookahead(grad=grad_r), beta=BETA)


def test_draft_lv_and_refl():
    sched = make_schedule(8)
    pol = PointMassPolicy(sched, mlp_init=0.5)
    traj = sample(pol, B=6, reward_fn=lambda x: r(x).float())
    lv = build_objective("reward-backprop", variant="draft-lv", lv_samples=3)
    batch = lv.select_transitions(traj)
    assert len(batch) == 6 and bool(batch.is_last.all())
    torch.manual_seed(0)
    out = lv(batch, pol, FnLookahead(grad=grad_r), beta=BETA)
    out.loss.backward()
    assert pol.shift.grad.abs().sum() > 0 and out.residual.max() < 1e-20

    refl = build_objective("reward-backprop", variant="refl", refl_late_fraction=0.25)
    batch = refl.select_transitions(traj, torch.Generator().manual_seed(0))
    assert len(batch) == 6 and set(batch.step.tolist()) <= {6, 7}
    pol.zero_grad()
    out = refl(batch, pol, FnLookahead(grad=grad_r), beta=BETA)
    assert out.residual.max() < 1e-20
    out.loss.backward()
    g_obj = [p.grad.clone() for p in pol.parameters()]
    pol.zero_grad()
    t, _, a, _ = sched.at_steps(batch.step, dtype=DT)
    x0 = eps_to_x0(batch.x_t, pol.eps(batch.x_t, t, None), a)
    (-BETA * r(x0).mean()).backward()  # ⟨∇r(x̂0), x̂0_θ⟩ has the gradient of r(x̂0_θ)
    for g, p in zip(g_obj, pol.parameters(), strict=True):
        assert torch.allclose(g, p.grad, rtol=1e-9, atol=1e-12)

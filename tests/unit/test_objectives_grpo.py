"""Flow-GRPO: group-normalised advantages, PPO clip, the KL penalty as flow_grpo computes it, on the
Flow-GRPO SDE of a rectified-flow schedule (and unchanged on VP)."""

import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from gfnalign.core import NoiseSchedule
from gfnalign.objectives import build_objective
from gfnalign.objectives.grpo import group_advantages
from gfnalign.sampling import rollout

DT = torch.float64
C = torch.tensor([1.0, -0.5], dtype=DT)


class FlowPointMass(nn.Module):
    """Exact rectified-flow velocity of a point mass at ``m + shift`` (reference: at ``m``)."""

    def __init__(self, schedule: NoiseSchedule, shift: float = 0.0):
        super().__init__()
        self.schedule = schedule
        self.m = torch.tensor([0.3, 0.2], dtype=DT)
        self.shift = nn.Parameter(torch.full((2,), shift, dtype=DT))

    def eps(self, x, t, cond, *, reference=False):
        center = self.m if reference else self.m + self.shift
        sigma = self.schedule.sigma_of_timestep(t).to(x)[:, None]
        return (x - (1 - sigma) * center) / sigma - center  # u = ε − x0


def flow_schedule(K=6):
    return NoiseSchedule.from_flow_match_config({"shift": 3.0}, K)


def _trajectory(pol, B=8, seed=0, eta=0.7):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 2, dtype=DT, generator=gen)
    traj = rollout(pol, None, x, eta=eta, generator=gen)
    reward = -((traj.final - C) ** 2).sum(1)
    return replace(traj, reward=reward.float(), prompt_id=torch.arange(B) // 4)


def test_group_advantages():
    reward = torch.tensor([1.0, 3.0, 10.0, 0.0, 4.0, 8.0])
    pid = torch.tensor([0, 0, 1, 2, 2, 2])
    adv = group_advantages(reward, pid)
    assert torch.allclose(adv[:2], torch.tensor([-1.0, 1.0]) * 1 / (1 + 1e-4), atol=1e-6)
    assert float(adv[2]) == 0.0  # a group of one: flow_grpo's tracker gives 0
    g = reward[3:]
    assert torch.allclose(adv[3:], (g - g.mean()) / (g.std(unbiased=False) + 1e-4), atol=1e-6)
    adv_g = group_advantages(reward, pid, global_std=True)
    assert torch.allclose(adv_g[3:], (g - g.mean()) / (reward.std(unbiased=False) + 1e-4), atol=1e-6)
    with pytest.raises(ValueError, match="NaN"):
        group_advantages(torch.tensor([1.0, float("nan")]), torch.tensor([0, 0]))


def test_grpo_on_policy_gradient_is_the_policy_gradient():
    pol = FlowPointMass(flow_schedule(), shift=0.2)
    traj = _trajectory(pol)
    obj = build_objective("grpo", eta=0.7)
    traj = obj.prepare(traj)
    batch = obj.select_transitions(traj)
    out = obj(batch, pol, None, beta=1.0)
    assert out.residual.abs().max() < 1e-10 and out.metrics["policy/clipfrac"] == 0.0
    (g,) = torch.autograd.grad(out.loss, pol.shift)
    # on-policy PPO gradient = −mean(A ∇ log π) with the mean-reduced log-probs
    out_pf = pol.schedule.forward_kernel(batch.x_t, pol.eps(batch.x_t, pol.schedule.at_steps(batch.step)[0], None),
                                         batch.step, 0.7).log_prob(batch.x_next, "mean")
    (g_ref,) = torch.autograd.grad(-(batch.advantage.to(DT) * out_pf).mean(), pol.shift)
    assert torch.allclose(g, g_ref, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        pol.shift.add_(0.05)
    assert obj(batch, pol, None, beta=1.0).metrics["policy/clipfrac"] > 0
    with pytest.raises(ValueError, match="prepare"):
        obj(batch.with_fields(advantage=None), pol, None, beta=1.0)


@pytest.mark.parametrize("a", [0.7, 1.2])
def test_grpo_kl_is_flow_grpos_and_the_exact_kl(a):
    sched = flow_schedule(6)
    pol = FlowPointMass(sched, shift=0.3)
    traj = _trajectory(pol, eta=a)
    sig = sched.sigmas.tolist() + [0.0]
    obj = build_objective("grpo", eta=a, kl_beta=0.04)
    assert obj.needs_reference
    batch = obj.select_transitions(obj.prepare(traj))
    t = sched.at_steps(batch.step)[0]
    mean = sched.forward_kernel(batch.x_t, pol.eps(batch.x_t, t, None), batch.step, a).mean
    mean_ref = sched.forward_kernel(batch.x_t, pol.eps(batch.x_t, t, None, reference=True), batch.step, a).mean
    # flow_grpo: ((μ − μ_ref)²).mean(dims) / (2 std_dev_t²), std_dev_t = a √(σ/(1 − σ)) (σ = 1: next σ in the ratio)
    std_dev_t = torch.tensor([a * math.sqrt(sig[k] / (1 - (sig[1] if sig[k] == 1 else sig[k]))) for k in batch.step.tolist()],
                             dtype=DT)
    ref = ((mean - mean_ref) ** 2).mean(1) / (2 * std_dev_t**2)
    out = obj(batch, pol, None, beta=1.0)
    _, kernel = obj.policy_kernel(pol, batch)
    _, kernel_ref = obj.policy_kernel(pol, batch, reference=True)
    kl = obj.kl_term(kernel, kernel_ref, pol, batch)
    assert torch.allclose(kl, ref, rtol=1e-10)
    assert out.metrics["loss/kl"] == pytest.approx(float(ref.detach().mean()), rel=1e-10)
    exact = build_objective("grpo", eta=a, kl_beta=0.04, kl_form="exact", log_prob_reduction="sum",
                            clip_range=0.2)
    kl_exact = exact.kl_term(kernel, kernel_ref, pol, batch)
    std = kernel.std.expand_as(kernel.mean)
    want = torch.distributions.kl_divergence(torch.distributions.Normal(kernel.mean, std),
                                             torch.distributions.Normal(kernel_ref.mean, std)).sum(1)
    assert torch.allclose(kl_exact, want, rtol=1e-10)
    # the KL pulls the policy back to the reference: its gradient on the shift points along the shift
    (g,) = torch.autograd.grad(kl.sum(), pol.shift)
    assert float((g * pol.shift.detach()).sum()) > 0


def test_grpo_runs_on_vp_schedules_unchanged():
    from tests.unit.test_objectives_world import PointMassPolicy, make_schedule, sample

    pol = PointMassPolicy(make_schedule(6), mlp_init=0.5)
    traj = sample(pol, B=8, reward_fn=lambda x: (-((x - C) ** 2).sum(1)).float())
    traj = replace(traj, prompt_id=torch.arange(8) // 4)
    obj = build_objective("grpo", kl_beta=0.01)
    out = obj(obj.select_transitions(obj.prepare(traj)), pol, None, beta=1.0)
    out.loss.backward()
    assert torch.isfinite(out.loss) and "loss/kl" in out.metrics


def test_grpo_rejects_bad_options():
    with pytest.raises(ValueError, match="kl_form"):
        build_objective("grpo", kl_form="forward")
    with pytest.raises(ValueError, match="kl_beta"):
        build_objective("grpo", kl_beta=-1)


def test_grpo_groups_span_processes():
    """Two processes, prompts shared between them: each rank's advantages are (r − mean)/(std + 1e-4) over
    the prompt's samples on *both* ranks (flow_grpo gathers before grouping), sliced to that rank."""
    import threading

    from tests.unit.test_objectives_baselines import _traj, _two_process_collectives

    obj = build_objective("grpo")
    assert obj.lookahead_reads == frozenset()  # terminal rewards only: the trainer caches no lookahead
    collectives = _two_process_collectives()
    g = torch.Generator().manual_seed(5)
    ids = [torch.tensor([0, 1, 2, 0]), torch.tensor([1, 0, 2, 2])]
    rewards = [torch.randn(4, generator=g) * 3 for _ in range(2)]
    out = [None, None]

    def run(r):
        out[r] = obj.prepare(_traj(rewards[r], ids[r]), collectives[r]).advantage

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    all_r, all_id = torch.cat(rewards).double(), torch.cat(ids)
    for r in (0, 1):
        for i in range(4):
            group = all_r[all_id == ids[r][i]]
            expect = (float(rewards[r][i]) - group.mean()) / (group.std(unbiased=False) + 1e-4)
            assert abs(float(out[r][i]) - float(expect)) < 1e-5, (r, i)
    # one process alone groups only its own samples (prompt 1 has one sample on rank 0: advantage 0)
    alone = obj.prepare(_traj(rewards[0], ids[0])).advantage
    assert float(alone[1]) == 0.0 and abs(float(out[0][1])) > 0

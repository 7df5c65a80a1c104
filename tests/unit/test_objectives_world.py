"""A tiny analytic world for the objective tests (and checks of the world itself).

Data is a point mass at ``m`` in d = 2, so every noised marginal is N(√ā·m, (1−ā)I), the exact eps is
``(x − √ā·m)/√(1−ā)`` and the DDPM (eta = 1) kernel with exact eps *is* the true reverse kernel: detailed
balance with the noising P_B holds exactly with F(x_t) = p_t(x_t). Tilting the final marginal
N(√ā_f·m, (1−ā_f)I) by exp(β aᵀx) gives the final marginal of a point mass at

    m' = m + (1 − ā_f)·β·a / √ā_f,       with normaliser log Z = β aᵀ√ā_f m + ½β²(1−ā_f)|a|²,

so the exactly tilted policy is the same world centred at m', and all flows are closed form.
"""

import math

import torch
from torch import nn

from gfnalign.core import NoiseSchedule
from gfnalign.sampling import rollout

DT = torch.float64
T = 1000
M = torch.tensor([0.5, -1.0], dtype=DT)
A = torch.tensor([1.0, 0.5], dtype=DT)


def make_schedule(K: int = 8) -> NoiseSchedule:
    ac = torch.cumprod(1 - torch.linspace(1e-4, 0.02, T, dtype=DT), 0)
    return NoiseSchedule.from_alphas_cumprod(ac, K, steps_offset=1)  # final alpha-bar = ac[0] < 1


def final_ab(sched: NoiseSchedule) -> float:
    return float(sched.alpha_bars_next[-1])


def tilted_center(sched: NoiseSchedule, beta: float, m: torch.Tensor = M, a: torch.Tensor = A) -> torch.Tensor:
    abf = final_ab(sched)
    return m + (1 - abf) * beta * a / math.sqrt(abf)


def log_z(sched: NoiseSchedule, beta: float) -> float:
    abf = final_ab(sched)
    return float(beta * (A @ M) * math.sqrt(abf) + 0.5 * beta**2 * (1 - abf) * (A @ A))


def ab_of(sched: NoiseSchedule, t: torch.Tensor) -> torch.Tensor:
    return sched.alphas_cumprod.to(t.device)[t.long()][:, None]


def log_normal(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    return (-0.5 * (x - mean) ** 2 / var - 0.5 * torch.log(2 * math.pi * var)).sum(1)


class PointMassPolicy(nn.Module):
    """eps = exact eps of a point mass at ``m + shift`` + MLP correction; reference = exact at ``m``."""

    def __init__(self, sched: NoiseSchedule, m: torch.Tensor = M, *, hidden: int = 16, mlp_init: float = 0.0):
        super().__init__()
        self.schedule = sched
        self.register_buffer("m", m.clone())
        self.shift = nn.Parameter(torch.zeros_like(m))
        self.mlp = nn.Sequential(nn.Linear(3, hidden), nn.Tanh(), nn.Linear(hidden, 2)).to(DT)
        with torch.no_grad():
            self.mlp[2].weight.mul_(mlp_init)
            self.mlp[2].bias.mul_(mlp_init)

    def eps(self, x, t, cond, *, reference=False):
        ab = ab_of(self.schedule, t).to(x)
        center = self.m if reference else self.m + self.shift
        e = (x - ab.sqrt() * center) / (1 - ab).sqrt()
        if not reference:
            e = e + self.mlp(torch.cat([x, t[:, None].to(x) / T], 1))
        return e


class FnLookahead:
    """Lookahead from plain functions ``value(x, t, terminal)`` and ``grad(x, t, terminal)``; counts calls."""

    def __init__(self, value=None, grad=None):
        self.value, self.grad, self.calls = value, grad, 0

    def log_reward(self, x, t, cond, *, terminal):
        self.calls += 1
        return self.value(x, t, terminal)

    def grad_log_reward(self, x, t, cond, *, terminal):
        self.calls += 1
        return self.grad(x, t, terminal)


def exact_tilted_policy(sched: NoiseSchedule, beta: float) -> PointMassPolicy:
    pol = PointMassPolicy(sched)
    with torch.no_grad():
        pol.shift.copy_(tilted_center(sched, beta) - M)
    return pol


def sample(policy, B=6, seed=0, reward_fn=None):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, 2, generator=g, dtype=DT)
    traj = rollout(policy, None, x0, generator=g)
    if reward_fn is not None:
        from dataclasses import replace

        traj = replace(traj, reward=reward_fn(traj.final))
    return traj


# -- checks of the world itself ----------------------------------------------------------------------
def test_exact_flow_satisfies_detailed_balance():
    from gfnalign.core import backward_kernel, forward_kernel

    sched = make_schedule()
    pol = PointMassPolicy(sched)
    traj = sample(pol, B=4)
    for k in range(sched.num_steps):
        x, xn = traj.states[:, k], traj.states[:, k + 1]
        a, an = sched.alpha_bars[k], sched.alpha_bars_next[k]
        lpf = forward_kernel(x, traj.eps[:, k], a, an).log_prob(xn)
        lpb = backward_kernel(xn, a, an).log_prob(x)
        lf = log_normal(x, a.sqrt() * M, 1 - a)
        lfn = log_normal(xn, an.sqrt() * M, 1 - an)
        assert torch.allclose(lf + lpf, lfn + lpb, atol=1e-9)


def test_tilt_of_final_marginal_is_point_mass_at_m_prime():
    sched = make_schedule()
    beta = 0.7
    abf = final_ab(sched)
    x = torch.randn(5, 2, dtype=DT)
    lhs = log_normal(x, math.sqrt(abf) * M, torch.tensor(1 - abf, dtype=DT)) + beta * x @ A
    rhs = log_z(sched, beta) + log_normal(x, math.sqrt(abf) * tilted_center(sched, beta), torch.tensor(1 - abf, dtype=DT))
    assert torch.allclose(lhs, rhs, atol=1e-9)

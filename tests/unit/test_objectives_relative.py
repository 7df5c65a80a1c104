"""Prior-relative balance (``relative: true`` on dag-db / dag-kl): the residual vanishes at the exact
tilted path measure of the analytic point-mass world with the *plain* reward (no log p), and gradients
follow the docstring's table (the frozen kernel P_F^# is never trained)."""

import pytest
import torch
from torch import nn

from gfnalign.objectives import build_objective
from gfnalign.objectives.common import gamma_weight
from tests.unit.test_objectives_gradients import RefParamPolicy, gsum, lookahead, policy_params
from tests.unit.test_objectives_world import (
    DT,
    A,
    FnLookahead,
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


def u_value(x, t, terminal):  # an arbitrary forward-looking guess at non-terminal states
    assert not bool(terminal.any())
    return torch.sin(x[:, 0]) + 0.3 * x[:, 1] ** 2


class ExactRelativeLogFlow(nn.Module):
    """log G(x, t) = log E_#[exp(β aᵀx_final) | x_t] = log Z + log p'_t(x) − log p_t(x) (the exact kernels
    are the true reverse kernels of both point-mass worlds), minus the forward-looking guess."""

    def __init__(self, sched, forward_looking, scale=1.0, gamma="one"):
        super().__init__()
        self.sched, self.fl, self.scale, self.gamma = sched, forward_looking, scale, gamma
        self.center, self.logz = tilted_center(sched, BETA), log_z(sched, BETA)
        self.bias = nn.Parameter(torch.zeros((), dtype=DT))

    def forward(self, x, t, cond):
        ab = ab_of(self.sched, t)
        val = self.logz + log_normal(x, ab.sqrt() * self.center, 1 - ab) - log_normal(x, ab.sqrt() * M, 1 - ab)
        val = val * self.scale
        if self.fl:
            g = gamma_weight(self.gamma, ab).reshape(-1)
            val = val - BETA * self.scale * g * u_value(x, t, torch.zeros(len(x), dtype=torch.bool))
        return val + self.bias


@pytest.mark.parametrize("method", ["dag-db", "dag-kl"])
@pytest.mark.parametrize(("forward_looking", "gamma"), [(False, "one"), (True, "one"), (True, "alpha_bar")])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize(("flow_gradient", "flow_loss"), [("full", "squared"), ("target", "exponential")])
def test_relative_residual_vanishes_at_the_tilted_path_measure(method, forward_looking, gamma, reduction,
                                                                flow_gradient, flow_loss):
    sched = make_schedule()
    plain = lambda x: (x @ A).float()  # noqa: E731  (no log p anywhere)
    traj = sample(exact_tilted_policy(sched, BETA), reward_fn=plain)
    scale = 1.0 if reduction == "sum" else 0.5  # "mean": balance holds for D·log P (D = 2)
    obj = build_objective(method, log_flow_head=ExactRelativeLogFlow(sched, forward_looking, scale, gamma),
                          forward_looking=forward_looking, log_prob_reduction=reduction, gamma=gamma,
                          flow_gradient=flow_gradient, flow_loss=flow_loss, relative=True)
    assert obj.needs_reference
    la = FnLookahead(value=u_value)
    batch = obj.select_transitions(traj)
    out = obj(batch, exact_tilted_policy(sched, BETA), la, beta=BETA * scale)
    assert out.residual.abs().max() < 1e-6, out.residual
    # the same flow with the noising P_B is far from balance: relative=True is what makes it exact
    lebesgue = build_objective(method, log_flow_head=ExactRelativeLogFlow(sched, forward_looking, scale, gamma),
                               forward_looking=forward_looking, log_prob_reduction=reduction, gamma=gamma,
                               flow_gradient=flow_gradient, flow_loss=flow_loss)
    assert not lebesgue.needs_reference
    assert lebesgue(batch, exact_tilted_policy(sched, BETA), la, beta=BETA * scale).residual.abs().mean() > 0.1
    # a perturbed policy breaks the balance
    bad = exact_tilted_policy(sched, BETA)
    with torch.no_grad():
        bad.shift.add_(0.3)
    assert obj(batch, bad, la, beta=BETA * scale).residual.abs().mean() > 1e-2


def test_relative_pretrained_policy_balances_at_beta_zero_with_a_constant_flow():
    sched = make_schedule()
    pol = PointMassPolicy(sched)  # equals the reference
    traj = sample(pol, reward_fn=lambda x: (x @ A).float())
    obj = build_objective("dag-db", state_shape=(2,), relative=True).double()  # zero-initialised head
    batch = obj.select_transitions(traj)
    out = obj(batch, pol, FnLookahead(value=u_value), beta=0.0)
    assert out.residual.abs().max() < 1e-10


@pytest.mark.parametrize("method", ["dag-db", "dag-kl"])
def test_relative_gradient_routing(method):
    """θ through log P_F^θ only (equal to 2δ∇log P_F for dag-db), φ through the head, the reference never."""
    pol = RefParamPolicy(make_schedule(6))
    g = torch.Generator().manual_seed(0)
    from gfnalign.sampling import rollout

    traj = rollout(pol, None, torch.randn(8, 2, generator=g, dtype=DT), generator=g)
    from dataclasses import replace

    traj = replace(traj, reward=torch.tanh(traj.final @ A).float())
    obj = build_objective(method, state_shape=(2,), relative=True, head_zero_init=False).double()
    batch = obj.select_transitions(traj)
    pol.zero_grad()
    out = obj(batch, pol, lookahead(), beta=BETA)
    out.loss.backward()
    assert pol.ref_gain.grad is None or float(pol.ref_gain.grad.abs().sum()) == 0
    assert gsum(policy_params(pol)) > 0 and gsum(obj.parameters()) > 0
    if method == "dag-db":  # d(mean δ²)/dθ = mean 2δ·∇log P_F^θ, with δ's value from the objective
        grads = [p.grad.clone() for p in policy_params(pol)]
        pol.zero_grad()
        log_pf = obj.policy_kernel(pol, batch)[1].log_prob(batch.x_next)
        (2 * out.residual * log_pf).mean().backward()
        for a, p in zip(grads, policy_params(pol), strict=True):
            assert torch.allclose(a, p.grad, rtol=1e-9, atol=1e-12)


def test_relative_residual_uses_the_reference_kernel_not_the_noising_kernel():
    """δ_relative − δ_lebesgue = log P_B(x_t|x_next) − log P_F^#(x_next|x_t), transition by transition."""
    from gfnalign.core.kernels import backward_kernel

    sched = make_schedule()
    pol = PointMassPolicy(sched, mlp_init=0.5)
    traj = sample(pol, reward_fn=lambda x: (x @ A).float())
    rel = build_objective("dag-db", state_shape=(2,), relative=True, head_zero_init=False).double()
    leb = build_objective("dag-db", state_shape=(2,), head_zero_init=False).double()
    leb.load_state_dict(rel.state_dict())
    batch = rel.select_transitions(traj)
    la = FnLookahead(value=u_value)
    diff = rel(batch, pol, la, beta=BETA).residual - leb(batch, pol, la, beta=BETA).residual
    _, _, a, an = sched.at_steps(batch.step, dtype=DT)
    log_pb = backward_kernel(batch.x_next, a, an).log_prob(batch.x_t)
    log_ref = rel.policy_kernel(pol, batch, reference=True)[1].log_prob(batch.x_next)
    assert torch.allclose(diff, (log_pb - log_ref).detach(), atol=1e-9)


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_relative_must_be_a_bool(value):
    with pytest.raises(ValueError, match="relative="):
        build_objective("dag-db", state_shape=(2,), relative=value)

"""Every GFlowNet objective's residual vanishes at an exactly consistent construction (the analytic
point-mass world of test_objectives_world) and is clearly positive when the policy is perturbed."""

import math

import pytest
import torch
from torch import nn

from gfnalign.objectives import build_objective
from gfnalign.objectives.common import gamma_weight
from tests.unit.test_objectives_world import (
    DT,
    A,
    FnLookahead,
    M,
    PointMassPolicy,
    ab_of,
    exact_tilted_policy,
    final_ab,
    log_normal,
    log_z,
    make_schedule,
    sample,
    tilted_center,
)

BETA = 0.7


def u_value(x, t, terminal):  # arbitrary forward-looking "reward" at non-terminal states
    assert not bool(terminal.any()), "lookahead values are never needed at the terminal state"
    return torch.sin(x[:, 0]) + 0.3 * x[:, 1] ** 2


def u_grad(x, t, terminal):
    return torch.stack([torch.cos(x[:, 0]), 0.6 * x[:, 1]], 1)


# --------------------------------------------------------------------------- DB family (target ∝ R)
def db_reward(sched):
    """Raw reward with beta·r = log p_final(x) + beta·aᵀx, so that the target ∝ R is a point mass world."""
    abf = final_ab(sched)

    def r(x):
        return (x @ A + log_normal(x, math.sqrt(abf) * M, torch.tensor(1 - abf, dtype=DT)) / BETA).float()

    def grad(x):
        return A - (x - math.sqrt(abf) * M) / ((1 - abf) * BETA)

    return r, grad


class ExactLogFlow(nn.Module):
    """log F(x, t) = log Z + log N(x; √ā m', (1−ā)I), minus beta·u(x) when forward-looking; times ``scale``."""

    def __init__(self, sched, forward_looking, scale=1.0, gamma="one"):
        super().__init__()
        self.sched, self.fl, self.scale, self.gamma = sched, forward_looking, scale, gamma
        self.center, self.logz = tilted_center(sched, BETA), log_z(sched, BETA)
        self.bias = nn.Parameter(torch.zeros((), dtype=DT))

    def forward(self, x, t, cond):
        ab = ab_of(self.sched, t)
        val = (self.logz + log_normal(x, ab.sqrt() * self.center, 1 - ab)) * self.scale
        if self.fl:
            g = gamma_weight(self.gamma, ab).reshape(-1)
            val = val - BETA * self.scale * g * u_value(x, t, torch.zeros(len(x), dtype=torch.bool))
        return val + self.bias


@pytest.mark.parametrize("method", ["dag-db", "dag-kl"])
@pytest.mark.parametrize(("forward_looking", "gamma"), [(False, "one"), (True, "one"), (True, "alpha_bar"),
                                                       (True, "sqrt_alpha_bar")])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize(("flow_gradient", "flow_loss"), [("full", "squared"), ("target", "squared"),
                                                         ("target", "exponential"), ("semi", "exponential")])
def test_dag_residual_vanishes_at_exact_flow(method, forward_looking, gamma, reduction, flow_gradient, flow_loss):
    sched = make_schedule()
    r, _ = db_reward(sched)
    traj = sample(exact_tilted_policy(sched, BETA), reward_fn=r)
    D = 2
    scale = 1.0 if reduction == "sum" else 1.0 / D  # "mean": balance holds for D·log P, i.e. beta -> beta / D
    obj = build_objective(method, log_flow_head=ExactLogFlow(sched, forward_looking, scale, gamma),
                          forward_looking=forward_looking, log_prob_reduction=reduction, gamma=gamma,
                          flow_gradient=flow_gradient, flow_loss=flow_loss)
    la = FnLookahead(value=u_value)
    batch = obj.select_transitions(traj)
    assert len(batch) == traj.batch_size * sched.num_steps
    out = obj(batch, exact_tilted_policy(sched, BETA), la, beta=BETA * scale)
    assert out.residual.abs().max() < 1e-6, out.residual
    if method == "dag-db":  # every term of the loss vanishes with the residual
        assert abs(float(out.loss)) < 1e-10
    assert out.residual.shape == (len(batch),) and not out.residual.requires_grad
    # a perturbed policy breaks the balance
    bad = exact_tilted_policy(sched, BETA)
    with torch.no_grad():
        bad.shift.add_(0.3)
    out_bad = obj(batch, bad, la, beta=BETA * scale)
    assert out_bad.residual.abs().mean() > 1e-2


def test_dag_db_uses_cached_lookahead_and_skips_terminal_rows():
    sched = make_schedule()
    r, _ = db_reward(sched)
    traj = sample(exact_tilted_policy(sched, BETA), reward_fn=r)
    obj = build_objective("dag-db", log_flow_head=ExactLogFlow(sched, True))
    batch = obj.select_transitions(traj)
    la = FnLookahead(value=u_value)  # u_value asserts it never sees terminal rows
    out = obj(batch, exact_tilted_policy(sched, BETA), la, beta=BETA)
    assert la.calls == 1  # x_t and x_next scored in one lookahead call
    no_term = torch.zeros_like(batch.is_last)
    cached = batch.with_fields(lookahead_reward_t=u_value(batch.x_t, None, no_term),
                               lookahead_reward_next=torch.where(batch.is_last, torch.full_like(batch.reward, float("nan")).to(DT),
                                                                 torch.sin(batch.x_next[:, 0]) + 0.3 * batch.x_next[:, 1] ** 2))
    out_c = obj(cached, exact_tilted_policy(sched, BETA), None, beta=BETA)
    assert torch.allclose(out.residual, out_c.residual, atol=1e-12)
    with pytest.raises(ValueError, match="lookahead"):
        obj(batch, exact_tilted_policy(sched, BETA), None, beta=BETA)
    with pytest.raises(ValueError, match="reward"):
        obj(batch.with_fields(reward=torch.full_like(batch.reward, float("nan"))), exact_tilted_policy(sched, BETA), la, beta=BETA)


@pytest.mark.parametrize("forward_looking", [False, True])
def test_dag_db_reward_shift_is_absorbed_by_the_flow(forward_looking):
    sched = make_schedule()
    pol = PointMassPolicy(sched, mlp_init=0.5)
    traj = sample(pol, reward_fn=lambda x: (x @ A).float())
    obj = build_objective("dag-db", state_shape=(2,), forward_looking=forward_looking, head_zero_init=False).double()
    batch = obj.select_transitions(traj)
    la = FnLookahead(value=u_value)
    base = obj(batch, pol, la, beta=BETA).residual
    c = 3.25
    shifted = batch.with_fields(reward=batch.reward + c)
    la_shift = FnLookahead(value=lambda x, t, term: u_value(x, t, term) + c)
    if forward_looking:  # every log F shifts by beta*c through the lookahead: no head change needed
        res = obj(shifted, pol, la_shift, beta=BETA).residual
    else:
        unadjusted = obj(shifted, pol, la, beta=BETA).residual
        assert (unadjusted - base)[batch.is_last].abs().min() > 0.5 * BETA * c  # the shift matters...
        with torch.no_grad():
            obj.log_flow_head.out.bias.add_(BETA * c)  # ...until the flow absorbs it
        res = obj(shifted, pol, la, beta=BETA).residual
    assert torch.allclose(res, base, atol=1e-6)  # float32 rewards


class ExactScoreHead(nn.Module):
    """g(x, t) = exact flow score − beta·γ(ā)·u'(x) (forward-looking part), 0 at t = 0 (terminal)."""

    def __init__(self, sched, exact, forward_looking, gamma, scale=1.0):
        super().__init__()
        self.sched, self.exact, self.fl, self.gamma, self.scale = sched, exact, forward_looking, gamma, scale
        self.dummy = nn.Parameter(torch.zeros((), dtype=DT))

    def forward(self, x, t, cond):
        ab = ab_of(self.sched, t)
        val = self.exact(x, ab)
        if self.fl:
            val = val - BETA * gamma_weight(self.gamma, ab) * u_grad(x, t, None)
        val = torch.where((t == 0)[:, None], torch.zeros_like(val), val)
        return val * self.scale + self.dummy


@pytest.mark.parametrize("forward_looking,gamma", [(False, "one"), (True, "one"), (True, "alpha_bar"), (True, "sqrt_alpha_bar")])
@pytest.mark.parametrize("reverse", [0.0, 1.0])
def test_nabla_db_residual_vanishes_at_exact_flow_score(forward_looking, gamma, reverse):
    sched = make_schedule()
    r, rgrad = db_reward(sched)
    center = tilted_center(sched, BETA)
    head = ExactScoreHead(sched, lambda x, ab: -(x - ab.sqrt() * center) / (1 - ab), forward_looking, gamma)
    obj = build_objective("nabla-db", flow_score_head=head, forward_looking=forward_looking, gamma=gamma,
                          reverse_loss_weight=reverse, fraction=1.0)
    la = FnLookahead(grad=lambda x, t, term: torch.where(term[:, None], rgrad(x), u_grad(x, t, term)))
    traj = sample(exact_tilted_policy(sched, BETA), reward_fn=r)
    batch = obj.select_transitions(traj)
    out = obj(batch, exact_tilted_policy(sched, BETA), la, beta=BETA)
    assert out.residual.abs().max() < 1e-6 * (1 + out.residual.numel())
    bad = exact_tilted_policy(sched, BETA)
    with torch.no_grad():
        bad.shift.add_(0.3)
    assert obj(batch, bad, la, beta=BETA).residual.mean() > 1e-2


@pytest.mark.parametrize("forward_looking,gamma", [(False, "one"), (True, "alpha_bar"), (True, "sqrt_alpha_bar")])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize(("estimator", "forward_at"), [("sampled", "next"), ("expected", "next"), ("bootstrap", "next"),
                                                       ("bootstrap", "current")])
def test_residual_nabla_db_vanishes_at_exact_tilt(forward_looking, gamma, reduction, estimator, forward_at):
    sched = make_schedule()
    center = tilted_center(sched, BETA)  # exact target ∝ p_pretrained(x)·exp(beta·aᵀx)
    scale = 1.0 if reduction == "sum" else 0.5
    head = ExactScoreHead(sched, lambda x, ab: (ab.sqrt() * (center - M) / (1 - ab)).expand_as(x), forward_looking,
                          gamma, scale)
    obj = build_objective("residual-nabla-db", flow_score_head=head, forward_looking=forward_looking, gamma=gamma,
                          fraction=0.5, stratified=True, log_prob_reduction=reduction, reverse_estimator=estimator,
                          head_target="both" if estimator == "sampled" else "reverse", forward_at=forward_at)
    la = FnLookahead(grad=lambda x, t, term: torch.where(term[:, None], A.expand_as(x), u_grad(x, t, term)))
    traj = sample(exact_tilted_policy(sched, BETA), reward_fn=lambda x: (x @ A).float())
    batch = obj.select_transitions(traj, torch.Generator().manual_seed(0))
    out = obj(batch, exact_tilted_policy(sched, BETA), la, beta=BETA * scale)
    assert out.residual.abs().max() < 1e-8
    assert out.loss.abs() < 1e-8  # terminal loss included: g = 0 at the terminal state
    assert {"loss/total", "loss/fwd", "loss/rev", "loss/terminal", "policy/approx_kl"} <= set(out.metrics)
    bad = exact_tilted_policy(sched, BETA)
    with torch.no_grad():
        bad.shift.add_(0.3)
    assert obj(batch, bad, la, beta=BETA * scale).residual.mean() > 1e-2
    # a wrong head (exact policy) is rejected too: by the reverse condition, and through ψ(x_t) or ψ(x_next)
    with torch.no_grad():
        head.dummy.fill_(0.3)
    assert obj(batch, exact_tilted_policy(sched, BETA), la, beta=BETA * scale).residual.mean() > 1e-2


@pytest.mark.parametrize("forward_at", ["next", "current"])
def test_residual_nabla_db_no_flow_vanishes_when_lookahead_is_exact(forward_at):
    sched = make_schedule()
    center = tilted_center(sched, BETA)

    def grad(x, t, term):
        ab = ab_of(sched, t)
        exact = (ab.sqrt() * (center - M) / (1 - ab)).expand_as(x) / BETA  # gamma = one
        return torch.where(term[:, None], A.expand_as(x), exact)

    obj = build_objective("residual-nabla-db", no_flow=True, gamma="one", forward_at=forward_at)
    assert obj.trainable_modules() == {} and obj.reverse_loss_weight == 0
    traj = sample(exact_tilted_policy(sched, BETA), reward_fn=lambda x: (x @ A).float())
    batch = obj.select_transitions(traj, torch.Generator().manual_seed(0))
    out = obj(batch, exact_tilted_policy(sched, BETA), FnLookahead(grad=grad), beta=BETA)
    assert out.residual.abs().max() < 1e-8
    # cached gradients give the same answer without calling the lookahead
    la = FnLookahead(grad=grad)
    t, t_next = sched.at_steps(batch.step)[:2]
    cached = batch.with_fields(lookahead_grad_next=grad(batch.x_next, t_next, batch.is_last),
                               lookahead_grad_t=grad(batch.x_t, t, torch.zeros_like(batch.is_last)))
    out_c = obj(cached, exact_tilted_policy(sched, BETA), None, beta=BETA)
    assert la.calls == 0 and torch.allclose(out_c.residual, out.residual, atol=1e-12)


def test_residual_nabla_db_pretrained_policy_has_zero_residual_at_beta_zero():
    sched = make_schedule()
    obj = build_objective("residual-nabla-db", state_shape=(2,)).double()
    pol = PointMassPolicy(sched)  # equals the reference; zero-initialised g: everything balances at beta = 0
    traj = sample(pol, reward_fn=lambda x: (x @ A).float())
    batch = obj.select_transitions(traj, torch.Generator().manual_seed(0))
    out = obj(batch, pol, FnLookahead(grad=lambda x, t, term: A.expand_as(x)), beta=0.0)
    assert out.residual.abs().max() < 1e-10


@pytest.mark.parametrize("reverse", [0.0, 1.0])
def test_nabla_db_prior_score_vanishes_at_exact_flow_score(reverse):
    """With prior_score, ψ = −ε_#/√(1−ā) + g + FL: g only carries the tilt √ā(m' − m)/(1−ā)."""
    sched = make_schedule()
    r, rgrad = db_reward(sched)
    center = tilted_center(sched, BETA)
    head = ExactScoreHead(sched, lambda x, ab: (ab.sqrt() * (center - M) / (1 - ab)).expand_as(x), True, "alpha_bar")
    obj = build_objective("nabla-db", flow_score_head=head, prior_score=True, reverse_loss_weight=reverse)
    assert obj.needs_reference and not build_objective("nabla-db", state_shape=(2,)).needs_reference
    la = FnLookahead(grad=lambda x, t, term: torch.where(term[:, None], rgrad(x), u_grad(x, t, term)))
    traj = sample(exact_tilted_policy(sched, BETA), reward_fn=r)
    batch = obj.select_transitions(traj, torch.Generator().manual_seed(0))
    out = obj(batch, exact_tilted_policy(sched, BETA), la, beta=BETA)
    assert out.residual.abs().max() < 1e-8
    bad = exact_tilted_policy(sched, BETA)
    with torch.no_grad():
        bad.shift.add_(0.3)
    assert obj(batch, bad, la, beta=BETA).residual.mean() > 1e-2

"""nabla-db's ``residual_weight``: "sigma2" multiplies each transition's squared score residuals by exactly
the policy step's variance σ_t², and keeps the zero residual of an exactly balanced chain."""

import pytest
import torch

from gfnalign.core.kernels import forward_kernel
from gfnalign.objectives import build_objective
from gfnalign.objectives.score_balance import residual_weights
from tests.unit.test_objectives_exact import BETA, ExactScoreHead, db_reward, u_grad
from tests.unit.test_objectives_world import (
    FnLookahead,
    exact_tilted_policy,
    make_schedule,
    sample,
    tilted_center,
)


def _setup(reverse, weight, head_scale=1.0):
    sched = make_schedule()
    r, rgrad = db_reward(sched)
    center = tilted_center(sched, BETA)
    head = ExactScoreHead(sched, lambda x, ab: -(x - ab.sqrt() * center) / (1 - ab), True, "one",
                          scale=head_scale)
    obj = build_objective("nabla-db", flow_score_head=head, gamma="one", reverse_loss_weight=reverse,
                          fraction=1.0, residual_weight=weight)
    la = FnLookahead(grad=lambda x, t, term: torch.where(term[:, None], rgrad(x), u_grad(x, t, term)))
    traj = sample(exact_tilted_policy(sched, BETA), reward_fn=r)
    return sched, obj, la, obj.select_transitions(traj)


def _step_variance(sched, batch):
    """σ_t² of the DDPM (eta = 1) step of each row, from the schedule alone."""
    k = batch.step.long()
    a, an = sched.alpha_bars[k].double(), sched.alpha_bars_next[k].double()
    return (1 - an) / (1 - a) * (1 - a / an)


@pytest.mark.parametrize("reverse", [0.0, 1.0])
def test_sigma2_weight_is_exactly_the_step_variance_per_row(reverse):
    sched, obj_none, la, batch = _setup(reverse, "none")
    _, obj_s2, _, _ = _setup(reverse, "sigma2")
    bad = exact_tilted_policy(sched, BETA)
    with torch.no_grad():
        bad.shift.add_(0.3)
    out_none = obj_none(batch, bad, la, beta=BETA)
    out_s2 = obj_s2(batch, bad, la, beta=BETA)
    var = _step_variance(sched, batch)
    assert bool((out_none.residual > 1e-6).all())
    torch.testing.assert_close(out_s2.residual, var * out_none.residual, rtol=1e-9, atol=0)
    # the per-step variances span orders of magnitude, so this is not a global rescaling
    assert float(var.max() / var.min()) > 10


def test_residual_weights_helper_and_validation():
    x = torch.zeros(3, 2, dtype=torch.float64)
    eps = torch.zeros_like(x)
    kern = forward_kernel(x, eps, torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)[:, None],
                          torch.tensor([0.3, 0.6, 0.95], dtype=torch.float64)[:, None], 1.0)
    torch.testing.assert_close(residual_weights(kern, "sigma2"), kern.std.flatten() ** 2)
    assert torch.equal(residual_weights(kern, "none"), torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="residual_weight"):
        build_objective("nabla-db", state_shape=(2,), residual_weight="sigma")


@pytest.mark.parametrize("reverse", [0.0, 1.0])
def test_sigma2_keeps_the_exact_solution_residual_at_zero(reverse):
    sched, obj, la, batch = _setup(reverse, "sigma2")
    out = obj(batch, exact_tilted_policy(sched, BETA), la, beta=BETA)
    assert out.residual.abs().max() < 1e-8


def _grads(obj, pol, batch, la):
    out = obj(batch, pol, la, beta=BETA)
    params = [p for p in pol.parameters() if p.requires_grad]
    head = [p for p in obj.parameters() if p.requires_grad]
    g = torch.autograd.grad(out.loss, params + head, allow_unused=True)
    z = [torch.zeros_like(p) if gi is None else gi for gi, p in zip(g, params + head)]
    return out, z[: len(params)], z[len(params):]


@pytest.mark.parametrize("reverse", [0.0, 1.0])
def test_antithetic_theta_gradient_is_the_mean_of_the_two_mirrored_plain_gradients(reverse):
    """forward_control="antithetic": same loss value and head gradient as the plain loss; the policy
    gradient is the average of the plain policy gradients at x_next and at its mirror 2μ_old − x_next."""
    # a wrong flow score (0.7x): the z-odd part of the forward residual no longer cancels
    sched, obj, la, batch = _setup(reverse, "none", 0.7)
    _, anti, _, _ = _setup(reverse, "none", 0.7)
    anti.forward_control = "antithetic"
    anti.flow_score_head = obj.flow_score_head
    bad = exact_tilted_policy(sched, BETA)
    with torch.no_grad():
        bad.shift.add_(0.3)
    for p in obj.flow_score_head.parameters():  # give the head a gradient to compare
        p.requires_grad_(True)
    out_p, gp_theta, gp_head = _grads(obj, bad, batch, la)
    out_a, ga_theta, ga_head = _grads(anti, bad, batch, la)
    torch.testing.assert_close(out_a.loss, out_p.loss)
    torch.testing.assert_close(out_a.residual, out_p.residual)
    for x, y in zip(ga_head, gp_head):
        torch.testing.assert_close(x, y)
    # the mirrored batch: same x_t, x_next -> 2μ_old − x_next (μ_old from the recorded eps_old)
    k = batch.step.long()
    a, an = sched.alpha_bars[k].double(), sched.alpha_bars_next[k].double()
    mean_old = forward_kernel(batch.x_t, batch.eps_old, a, an, 1.0).mean
    mirror = batch.with_fields(x_next=2 * mean_old - batch.x_next, lookahead_grad_next=None)
    plain_fwd = _setup(0.0, "none", 0.7)[1]
    plain_fwd.flow_score_head = obj.flow_score_head
    _, g1, _ = _grads(plain_fwd, bad, batch, la)
    _, g2, _ = _grads(plain_fwd, bad, mirror, la)
    assert any(float((x - y).abs().max()) > 1e-6 for x, y in zip(ga_theta, gp_theta))
    for ga, x, y in zip(ga_theta, g1, g2):
        torch.testing.assert_close(ga, 0.5 * (x + y))

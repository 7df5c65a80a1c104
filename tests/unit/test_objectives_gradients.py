"""Where gradients go (policy θ vs head φ) per objective, per the tables in their docstrings, plus the
LossOutput contract, flags, and the trust-region term."""


import math

import pytest
import torch
from torch import nn

from gfnalign.objectives import REGISTRY, build_objective
from tests.unit.test_objectives_world import DT, A, FnLookahead, PointMassPolicy, make_schedule, sample

BETA = 0.7
ALL = ["dag-db", "dag-kl", "nabla-db", "residual-nabla-db", "ddpo", "reward-backprop"]


class RefParamPolicy(PointMassPolicy):
    """The reference path uses a parameter too, to prove objectives never train the reference."""

    def __init__(self, sched):
        super().__init__(sched, mlp_init=0.5)
        self.ref_gain = nn.Parameter(torch.ones((), dtype=DT))
        with torch.no_grad():
            self.shift.fill_(0.2)

    def eps(self, x, t, cond, *, reference=False):
        e = super().eps(x, t, cond, reference=reference)
        return e * self.ref_gain if reference else e


def lookahead():
    return FnLookahead(value=lambda x, t, term: torch.tanh(x @ A.to(x)),
                       grad=lambda x, t, term: (1 - torch.tanh(x @ A.to(x))[:, None] ** 2) * A.to(x))


def world(seed=0):
    sched = make_schedule(6)
    pol = RefParamPolicy(sched)
    traj = sample(pol, B=8, seed=seed, reward_fn=lambda x: torch.tanh(x @ A).float())
    return pol, traj


def gsum(params):
    return sum(float(p.grad.abs().sum()) for p in params if p.grad is not None)


def policy_params(pol):
    return [pol.shift, *pol.mlp.parameters()]


def run(obj, pol, traj, seed=0, **kw):
    traj = obj.prepare(traj)
    batch = obj.select_transitions(traj, torch.Generator().manual_seed(seed))
    pol.zero_grad()
    obj.zero_grad()
    out = obj(batch, pol, lookahead(), beta=BETA, **kw)
    out.loss.backward()
    return out, batch


@pytest.mark.parametrize("name", ALL)
def test_contract_flags_and_routing(name):
    assert name in REGISTRY
    pol, traj = world()
    obj = build_objective(name, state_shape=(2,)).double()
    out, batch = run(obj, pol, traj)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert out.residual.shape == (len(batch),) and not out.residual.requires_grad
    assert "loss/total" in out.metrics and all(isinstance(v, float) for v in out.metrics.values())
    assert gsum(policy_params(pol)) > 0, "the policy must be trained"
    assert pol.ref_gain.grad is None or float(pol.ref_gain.grad.abs().sum()) == 0, "the reference is frozen"
    heads = list(obj.parameters())
    if name in ("dag-db", "dag-kl", "nabla-db", "residual-nabla-db"):
        assert set(obj.trainable_modules()) and gsum(heads) > 0, "the flow head must be trained"
    else:
        assert obj.trainable_modules() == {} and heads == []
    expect_grad = {"nabla-db": True, "residual-nabla-db": True, "reward-backprop": True}
    assert obj.needs_reward_gradient == expect_grad.get(name, False)
    assert obj.needs_reference == (name == "residual-nabla-db")


def test_dag_kl_flow_loss_never_reaches_the_policy():
    pol, traj = world()
    obj0 = build_objective("dag-kl", state_shape=(2,), kl_weight=0.0, head_zero_init=False).double()
    out0, _ = run(obj0, pol, traj)
    assert gsum(policy_params(pol)) == 0.0
    head0 = [p.grad.clone() for p in obj0.parameters()]
    obj1 = build_objective("dag-kl", state_shape=(2,), kl_weight=1.0, head_zero_init=False).double()
    obj1.load_state_dict(obj0.state_dict())
    out1, _ = run(obj1, pol, traj)
    assert gsum(policy_params(pol)) > 0
    for g0, p in zip(head0, obj1.parameters(), strict=True):
        assert torch.allclose(g0, p.grad), "advantages are detached: the PG term never reaches the head"
    assert {"loss/flow", "loss/pg", "policy/clipfrac", "policy/approx_kl"} <= set(out1.metrics)


def test_dag_db_terminal_head_gets_no_gradient_from_terminal_state():
    """f_phi is never evaluated at the terminal state: its value there would be discarded."""
    pol, traj = world()
    calls = []
    obj = build_objective("dag-db", state_shape=(2,)).double()
    head = obj.log_flow_head
    obj.log_flow_head = nn.Module()
    obj.log_flow_head.forward = lambda x, t, c: (calls.append(t.clone()), head(x, t, c))[1]
    run(obj, pol, traj)
    assert all(bool((t > 0).all()) for t in calls)


@pytest.mark.parametrize("name", ["nabla-db", "residual-nabla-db"])
def test_reverse_loss_trains_the_head_only_unless_asked(name):
    pol, traj = world()
    base = build_objective(name, state_shape=(2,), reverse_loss_weight=0.0, head_zero_init=False).double()
    run(base, pol, traj)
    g_pol0 = [p.grad.clone() for p in policy_params(pol)]
    g_head0 = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in base.parameters()]
    for trains in (False, True):
        obj = build_objective(name, state_shape=(2,), reverse_loss_weight=1.0, head_zero_init=False,
                              reverse_trains_policy=trains).double()
        obj.load_state_dict(base.state_dict())
        out, _ = run(obj, pol, traj)
        assert "loss/rev" in out.metrics
        same_policy = all(torch.allclose(a, p.grad, rtol=1e-9, atol=1e-12) for a, p in zip(g_pol0, policy_params(pol), strict=True))
        assert same_policy == (not trains)
        assert any(not torch.allclose(a, p.grad) for a, p in zip(g_head0, obj.parameters(), strict=True))


def test_residual_nabla_db_terminal_loss_trains_head_at_t0():
    pol, traj = world()
    obj = build_objective("residual-nabla-db", state_shape=(2,), head_zero_init=False, reverse_loss_weight=0.0).double()
    out, batch = run(obj, pol, traj)
    assert out.metrics["loss/terminal"] > 0
    obj_off = build_objective("residual-nabla-db", state_shape=(2,), head_zero_init=False, reverse_loss_weight=0.0,
                              terminal_loss_weight=0.0).double()
    obj_off.load_state_dict(obj.state_dict())
    out_off, _ = run(obj_off, pol, traj)
    assert "loss/terminal" not in out_off.metrics and out_off.loss < out.loss


@pytest.mark.parametrize("name", ALL)
def test_trust_region_is_zero_on_policy_and_positive_after_an_update(name):
    pol, traj = world()
    kw = {} if name in ("ddpo", "reward-backprop") else {"state_shape": (2,)}
    obj = build_objective(name, trust_region=10.0, **kw).double()
    out, _ = run(obj, pol, traj)
    assert out.metrics["loss/trust_region"] < 1e-20
    with torch.no_grad():
        pol.mlp[2].bias.add_(0.1)
    out, _ = run(obj, pol, traj)
    assert out.metrics["loss/trust_region"] == pytest.approx(10.0 * 0.01, rel=0.05 if name == "reward-backprop" else 1e-6)


@pytest.mark.parametrize("name,kw", [("dag-db", {"eta": 0.0}), ("dag-db", {"log_prob_reduction": "avg"}),
                                     ("residual-nabla-db", {"gamma": "squared"}), ("ddpo", {"clip_range": 0}),
                                     ("reward-backprop", {"variant": "alignprop"}), ("nabla-db", {"fraction": 1.5}),
                                     ("residual-nabla-db", {"pretrained_strength": 0.0}), ("dag-kl", {"trust_region": -1}),
                                     ("residual-nabla-db", {"reverse_estimator": "bootstrap"}),
                                     ("residual-nabla-db", {"forward_at": "current"}),
                                     ("residual-nabla-db", {"head_target": "policy"}),
                                     ("residual-nabla-db", {"head_target": "reverse", "reverse_loss_weight": 0.0}),
                                     ("residual-nabla-db", {"forward_at": "current", "no_flow": True,
                                                            "forward_looking": False})])
def test_bad_options_raise_naming_the_field(name, kw):
    field = next(iter(kw))
    with pytest.raises(ValueError, match=field):
        build_objective(name, state_shape=(2,), **kw)
    with pytest.raises(ValueError, match="state_shape"):
        build_objective("dag-db")


def test_half_precision_batches_are_computed_in_float32():
    pol = PointMassPolicy(make_schedule(4), mlp_init=0.3).float()
    traj = sample(pol.double(), B=4, reward_fn=lambda x: torch.tanh(x @ A).float())
    pol = pol.float()
    obj = build_objective("dag-db", state_shape=(2,), head_zero_init=False)
    batch = obj.select_transitions(traj)
    half = batch.with_fields(x_t=batch.x_t.to(torch.bfloat16), x_next=batch.x_next.to(torch.bfloat16),
                             eps_old=batch.eps_old.float())
    ref = batch.with_fields(x_t=half.x_t.float(), x_next=half.x_next.float(), eps_old=batch.eps_old.float())
    out_h = obj(half, pol, lookahead(), beta=BETA)
    out_f = obj(ref, pol, lookahead(), beta=BETA)
    assert out_h.residual.dtype == torch.float32
    assert torch.allclose(out_h.residual, out_f.residual, atol=1e-5)


@pytest.mark.parametrize("name", ["dag-db", "nabla-db", "residual-nabla-db"])
def test_one_head_pass_and_one_lookahead_call_per_loss(name):
    pol, traj = world()
    obj = build_objective(name, state_shape=(2,)).double()
    head_name = next(iter(obj.trainable_modules()))
    head = getattr(obj, head_name)
    calls = []

    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = head

        def forward(self, x, t, c):
            calls.append(len(x))
            return self.inner(x, t, c)

    setattr(obj, head_name, Counting())
    la = lookahead()
    batch = obj.select_transitions(traj, torch.Generator().manual_seed(0))
    obj(batch, pol, la, beta=BETA)
    assert len(calls) == 1 and la.calls == 1


@pytest.mark.parametrize("name", ["dag-db", "dag-kl"])
def test_semi_flow_gradient_trains_the_head_through_x_t_only(name):
    """flow_gradient="semi": the head's gradient is Σ 2δ·∂f(x_t)/∂φ (f(x_next) is a fixed target); the
    value of the loss and the policy's gradient are those of the full-gradient objective."""
    pol, traj = world()
    grads, losses, policy_grads = {}, {}, {}
    for mode in ("full", "semi"):
        torch.manual_seed(0)
        obj = build_objective(name, state_shape=(2,), flow_gradient=mode).double()
        out, batch = run(obj, pol, traj)
        grads[mode] = [p.grad.clone() for p in obj.parameters()]
        losses[mode] = float(out.loss.detach())
        policy_grads[mode] = [p.grad.clone() for p in policy_params(pol)]
    assert losses["semi"] == pytest.approx(losses["full"], rel=1e-12)
    for a, b in zip(policy_grads["full"], policy_grads["semi"], strict=True):
        torch.testing.assert_close(a, b)
    # the semi-gradient equals the full gradient minus the part that flows through f(x_next)
    torch.manual_seed(0)
    obj = build_objective(name, state_shape=(2,)).double()
    batch = obj.select_transitions(obj.prepare(traj), torch.Generator().manual_seed(0))
    delta, _, _, _ = obj.delta(batch, pol, lookahead(), BETA)
    t, t_next, _, _ = pol.schedule.at_steps(batch.step, dtype=DT)
    f_t = obj.log_flow_head(batch.x_t, t, None)
    expected = torch.autograd.grad((2 * delta.detach() * f_t).sum() / len(batch), list(obj.parameters()),
                                   allow_unused=True)
    for got, want in zip(grads["semi"], expected, strict=True):
        torch.testing.assert_close(got, torch.zeros_like(got) if want is None else want)
    assert any(float((a - b).abs().max()) > 1e-8 for a, b in zip(grads["full"], grads["semi"], strict=True))


def test_target_flow_network_is_a_polyak_copy_that_is_saved_but_never_trained():
    pol, traj = world()
    torch.manual_seed(0)
    obj = build_objective("dag-db", state_shape=(2,), flow_gradient="target", target_ema=0.25).double()
    assert set(obj.trainable_modules()) == {"log_flow_head"}
    assert any(k.startswith("target_log_flow_head.") for k in obj.state_dict()), "checkpoints must carry the target"
    with torch.no_grad():  # make head and target differ
        for p in obj.log_flow_head.parameters():
            p.add_(0.1)
    out, _ = run(obj, pol, traj)
    assert all(p.grad is None for p in obj.target_log_flow_head.parameters())
    # x_next is read through the (now different) target copy: the loss is not the plain semi-gradient one
    semi_same_head = build_objective("dag-db", state_shape=(2,), flow_gradient="semi").double()
    semi_same_head.load_state_dict({k: v for k, v in obj.state_dict().items() if not k.startswith("target_")})
    other, _ = run(semi_same_head, pol, traj)
    assert abs(float(out.loss.detach()) - float(other.loss.detach())) > 1e-6
    assert gsum(obj.log_flow_head.parameters()) > 0
    before = [p.clone() for p in obj.target_log_flow_head.parameters()]
    obj.after_optimizer_step()
    for old, new, head in zip(before, obj.target_log_flow_head.parameters(), obj.log_flow_head.parameters(),
                              strict=True):
        torch.testing.assert_close(new, 0.75 * old + 0.25 * head)
    # τ = 1: the target is the head after one step, so the loss equals the plain semi-gradient one
    full = build_objective("dag-db", state_shape=(2,), flow_gradient="target", target_ema=1.0).double()
    semi = build_objective("dag-db", state_shape=(2,), flow_gradient="semi").double()
    semi.load_state_dict({k: v for k, v in full.state_dict().items() if not k.startswith("target_")})
    with torch.no_grad():
        for p in full.log_flow_head.parameters():
            p.add_(0.05)
        for p in semi.log_flow_head.parameters():
            p.add_(0.05)
    full.after_optimizer_step()
    a, _ = run(full, pol, traj)
    b, _ = run(semi, pol, traj)
    assert float(a.loss.detach()) == pytest.approx(float(b.loss.detach()), rel=1e-12)
    with pytest.raises(ValueError, match="target_ema"):
        build_objective("dag-db", state_shape=(2,), flow_gradient="target", target_ema=0.0)


def test_expected_reverse_score_is_the_reference_jacobian_times_the_mean_shift():
    from gfnalign.core.kernels import GaussianKernel
    from gfnalign.objectives.score_balance import expected_reverse_score, reverse_score

    gen = torch.Generator().manual_seed(3)
    W = torch.randn(3, 3, dtype=DT, generator=gen)

    def mean_fn(x):  # a nonlinear "reference mean" so that J varies with x
        return torch.tanh(x @ W) + 0.5 * x

    x = torch.randn(4, 3, dtype=DT, generator=gen)
    std = torch.full((4, 1), 0.3, dtype=DT)
    target = torch.randn(4, 3, dtype=DT, generator=gen)
    x_req = x.clone().requires_grad_(True)
    got = expected_reverse_score(GaussianKernel(mean_fn(x_req), std), target, x_req)
    for i in range(4):
        J = torch.autograd.functional.jacobian(mean_fn, x[i : i + 1])[0, :, 0, :]  # [out, in]
        want = J.T @ (target[i] - mean_fn(x[i : i + 1])[0]) / 0.3**2
        assert torch.allclose(got[i], want, atol=1e-12)
    # the sampled reverse score is linear in x_next, so its mean over x_next ~ N(target, σ²) is its value at target
    x_req2 = x.clone().requires_grad_(True)
    sampled = reverse_score(GaussianKernel(mean_fn(x_req2), std), target, x_req2, create_graph=False)
    assert torch.allclose(got, sampled, atol=1e-12)


def test_residual_head_target_reverse_keeps_the_forward_loss_off_the_head():
    # L = L_fwd + w·L_rev (terminal off), so ∂L_fwd/∂φ = 2·G(w=1) − G(w=2) for the head gradient G
    pol, traj = world()
    state, fwd_head_grad, pol_grads = None, {}, {}
    for target in ("both", "reverse"):
        grads = []
        for w in (1.0, 2.0):
            obj = build_objective("residual-nabla-db", state_shape=(2,), head_zero_init=False, reverse_loss_weight=w,
                                  terminal_loss_weight=0.0, head_target=target, fraction=1.0).double()
            if state is None:
                state = obj.state_dict()
            obj.load_state_dict(state)  # the same head everywhere
            out, _ = run(obj, pol, traj)
            assert out.metrics["loss/fwd"] > 0 and out.metrics["loss/rev"] > 0
            grads.append([p.grad.clone() for p in obj.parameters()])
            pol_grads[target, w] = [p.grad.clone() for p in policy_params(pol)]
        fwd_head_grad[target] = sum(float((2 * a - b).abs().sum()) for a, b in zip(*grads, strict=True))
    assert fwd_head_grad["both"] > 1e-6 and fwd_head_grad["reverse"] < 1e-12
    # the policy's gradient is the forward loss's in every case
    ref = pol_grads["both", 1.0]
    for key, g in pol_grads.items():
        assert all(torch.allclose(a, b, rtol=1e-10, atol=1e-14) for a, b in zip(ref, g, strict=True)), key


@pytest.mark.parametrize("estimator", ["expected", "bootstrap"])
def test_residual_closed_form_reverse_trains_the_head_only(estimator):
    pol, traj = world()
    obj = build_objective("residual-nabla-db", state_shape=(2,), head_zero_init=False, head_target="reverse",
                          reverse_estimator=estimator, terminal_loss_weight=0.0).double()
    out, _ = run(obj, pol, traj)
    assert out.metrics["loss/rev"] > 0 and gsum(obj.parameters()) > 0
    assert pol.ref_gain.grad is None or float(pol.ref_gain.grad.abs()) == 0
    # the policy's gradient is the forward loss's alone: the same as with the paper's sampled reverse loss,
    # which does not train the policy either (reverse_trains_policy=False)
    g_pol = [p.grad.clone() for p in policy_params(pol)]
    fwd_only = build_objective("residual-nabla-db", state_shape=(2,), head_zero_init=False,
                               terminal_loss_weight=0.0).double()
    fwd_only.load_state_dict(obj.state_dict())
    run(fwd_only, pol, traj)
    assert all(torch.allclose(a, p.grad, rtol=1e-12) for a, p in zip(g_pol, policy_params(pol), strict=True))


def test_residual_forward_at_current_is_an_eps_regression_on_the_flow_score_at_x_t():
    pol, traj = world()
    obj = build_objective("residual-nabla-db", no_flow=True, gamma="one", forward_at="current").double()
    la = lookahead()
    traj = obj.prepare(traj)
    batch = obj.select_transitions(traj, torch.Generator().manual_seed(0))
    out = obj(batch, pol, la, beta=BETA)
    # by hand: r = (C_t/σ_t²)·(ε_θ − ε_# + √(1−ᾱ_t)·β·∇r(x̂0(x_t))), C_t = ∂μ/∂ε
    from gfnalign.core.kernels import forward_kernel, forward_std

    t, _, a, an = pol.schedule.at_steps(batch.step, dtype=DT)
    a, an = a[:, None], an[:, None]
    std = forward_std(a, an, 1.0)
    c = forward_kernel(torch.zeros_like(batch.x_t), torch.ones_like(batch.x_t), a, an, 1.0).mean
    psi = BETA * la.grad(batch.x_t, t, torch.zeros_like(batch.is_last))
    with torch.no_grad():
        e_pol, e_ref = pol.eps(batch.x_t, t, None), pol.eps(batch.x_t, t, None, reference=True)
    r = c / std**2 * (e_pol - e_ref + (1 - a).sqrt() * psi)
    assert out.metrics["loss/fwd"] == pytest.approx(float((r**2).mean()), rel=1e-9)


@pytest.mark.parametrize("strength", [1.0, 0.5])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_residual_bootstrap_target_is_the_reference_jacobian_times_the_next_flow_score(strength, reduction):
    # r_rev = ψ(x_t) − J_#(x_t)ᵀ ψ(x_next), whatever pretrained_strength and the reduction (no s, no scale)
    pol, traj = world()
    obj = build_objective("residual-nabla-db", state_shape=(2,), head_zero_init=False, head_target="reverse",
                          reverse_estimator="bootstrap", terminal_loss_weight=0.0, fraction=1.0,
                          pretrained_strength=strength, log_prob_reduction=reduction, gamma="one").double()
    la = lookahead()
    traj = obj.prepare(traj)
    batch = obj.select_transitions(traj, torch.Generator().manual_seed(0))
    out = obj(batch, pol, la, beta=BETA)
    from gfnalign.core.kernels import forward_kernel

    t, t_next, a, an = pol.schedule.at_steps(batch.step, dtype=DT)
    last = batch.is_last
    with torch.no_grad():
        psi_t = BETA * la.grad(batch.x_t, t, torch.zeros_like(last)) + obj.flow_score_head(batch.x_t, t, None)
        head_next = obj.flow_score_head(batch.x_next, t_next, None)
        psi_next = BETA * la.grad(batch.x_next, t_next, last) + torch.where(last[:, None], 0 * head_next, head_next)
    rows = []
    for i in range(len(batch)):
        def ref_mean(x, i=i):
            e = pol.eps(x, t[i : i + 1], None, reference=True)
            return forward_kernel(x, e, a[i : i + 1, None], an[i : i + 1, None], 1.0).mean
        J = torch.autograd.functional.jacobian(ref_mean, batch.x_t[i : i + 1])[0, :, 0, :]
        rows.append(psi_t[i] - J.T @ psi_next[i])
    r = torch.stack(rows)
    assert out.metrics["loss/rev"] == pytest.approx(float((r**2).mean()), rel=1e-9)


def moderate_residuals(monkeypatch):
    """Give DAG-DB's residual the moderate values c = linspace(−1.5, 1.5) with its graph kept
    (δ − δ.detach() + c): the point-mass world's residuals are ~1e4 nats, far outside any clamp.
    Returns (c, the unpatched DAGDB.delta)."""
    from gfnalign.objectives.dag_db import DAGDB

    original = DAGDB.delta
    values = torch.linspace(-1.5, 1.5, 48, dtype=DT)

    def moderate(self, *args):
        delta, log_pf, eps, metrics = original(self, *args)
        return delta - delta.detach() + values[: len(delta)], log_pf, eps, metrics

    monkeypatch.setattr(DAGDB, "delta", moderate)
    return values, original


@pytest.mark.parametrize("name", ["dag-db", "dag-kl"])
def test_exponential_flow_loss_routes_gradients_and_keeps_the_policy_loss(monkeypatch, name):
    """flow_loss="exponential": θ's gradient is that of δ² (unchanged); φ's is Σ 2(1 − e^{−δ})·∂f(x_t)/∂φ.

    The point-mass world's residuals are ~1e4 nats, so their values are replaced by moderate ones c
    (same graph, δ − δ.detach() + c) to test the exponential away from its clamp."""
    values, _ = moderate_residuals(monkeypatch)
    pol, traj = world()
    torch.manual_seed(0)
    sq = build_objective(name, state_shape=(2,), flow_gradient="semi").double()
    torch.manual_seed(0)
    ex = build_objective(name, state_shape=(2,), flow_gradient="semi", flow_loss="exponential", exp_clamp=5.0).double()
    with torch.no_grad():  # a non-zero head, the same in both
        for p, q in zip(sq.log_flow_head.parameters(), ex.log_flow_head.parameters(), strict=True):
            p.add_(0.1)
            q.copy_(p)
    run(sq, pol, traj)
    policy_sq = [p.grad.clone() for p in policy_params(pol)]
    out, batch = run(ex, pol, traj)
    assert gsum(policy_params(pol)) > 0
    for a, b in zip(policy_sq, [p.grad for p in policy_params(pol)], strict=True):
        torch.testing.assert_close(a, b)
    d = values[: len(batch)]
    t, _, _, _ = pol.schedule.at_steps(batch.step, dtype=DT)
    f_t = ex.log_flow_head(batch.x_t, t, None)
    want = torch.autograd.grad((2 * (1 - torch.exp(-d)) * f_t).sum() / len(batch), list(ex.log_flow_head.parameters()),
                               retain_graph=True)
    squared = torch.autograd.grad((2 * d * f_t).sum() / len(batch), list(ex.log_flow_head.parameters()))
    for got, w in zip([p.grad for p in ex.log_flow_head.parameters()], want, strict=True):
        torch.testing.assert_close(got, w)
    assert any(float((w - q).abs().max()) > 1e-6 for w, q in zip(want, squared, strict=True))
    assert ("loss/flow_fit" if name == "dag-db" else "loss/flow") in out.metrics
    with pytest.raises(ValueError, match="flow_gradient"):
        build_objective("dag-db", state_shape=(2,), flow_loss="exponential")  # the default "full"
    with pytest.raises(ValueError, match="flow_loss"):
        build_objective("dag-db", state_shape=(2,), flow_gradient="semi", flow_loss="huber")


def test_exponential_flow_loss_fits_the_log_mean_exp_not_the_mean_log():
    """With one state and many sampled residual targets ℓ, the squared loss's minimiser is mean(ℓ) and the
    exponential loss's is log mean e^ℓ (the exact flow); float64, minimised in closed form by Newton."""
    g = torch.Generator().manual_seed(3)
    ell = torch.randn(20000, dtype=DT, generator=g) * 0.8 + 1.0  # log F(x_next) + log P_B − log P_F samples
    f = torch.zeros((), dtype=DT, requires_grad=True)
    for _ in range(30):
        delta = f - ell
        loss = (2 * (torch.exp(-delta) + delta - 1)).mean()
        (grad,) = torch.autograd.grad(loss, f, create_graph=True)
        (hess,) = torch.autograd.grad(grad, f)
        with torch.no_grad():
            f -= grad / hess
    assert float(f) == pytest.approx(float(torch.logsumexp(ell, 0) - torch.log(torch.tensor(len(ell), dtype=DT))),
                                     abs=1e-10)
    assert abs(float(f) - float(ell.mean())) > 0.3  # the Jensen gap ½σ² = 0.32 the squared loss would leave


def test_exponential_flow_loss_continues_linearly_beyond_the_clamp():
    obj = build_objective("dag-db", state_shape=(2,), flow_gradient="semi", flow_loss="exponential", exp_clamp=1.0)
    delta = torch.tensor([-3.0, -1.0, -0.5, 0.0, 2.0], dtype=DT, requires_grad=True)
    loss = obj.flow_fit(delta)
    (grad,) = torch.autograd.grad(loss.sum(), delta)
    inside = delta.detach() >= -1.0
    torch.testing.assert_close(loss[inside], 2 * (torch.exp(-delta[inside]) + delta[inside] - 1))
    torch.testing.assert_close(grad[inside], 2 * (1 - torch.exp(-delta.detach()[inside])))
    torch.testing.assert_close(grad[0], torch.tensor(2 * (1 - math.e), dtype=DT))  # the clamp's slope
    assert float(loss[0]) == pytest.approx(float(loss[1]) + 2 * (math.e - 1) * 2.0)  # continuous, linear
    with pytest.raises(ValueError, match="exp_clamp"):
        build_objective("dag-db", state_shape=(2,), flow_gradient="semi", flow_loss="exponential", exp_clamp=0.0)


def test_forward_kl_policy_loss_weights_the_log_likelihood_by_the_balance_ratio(monkeypatch):
    """policy_loss="forward_kl": θ's gradient is −Σ 2(e^{−δ} − 1)·∇log P_F / N (weights detached, clamped
    at exp_clamp); the head's gradient is that of the flow loss alone."""
    values, original = moderate_residuals(monkeypatch)
    pol, traj = world()
    torch.manual_seed(0)
    obj = build_objective("dag-db", state_shape=(2,), flow_gradient="semi", flow_loss="exponential",
                          policy_loss="forward_kl", exp_clamp=1.0).double()
    out, batch = run(obj, pol, traj)
    got = [p.grad.clone() for p in policy_params(pol)]
    d = values[: len(batch)]
    weight = torch.exp((-d).clamp(max=1.0)) - 1
    _, log_pf, _, _ = original(obj, batch, pol, lookahead(), BETA)
    want = torch.autograd.grad((-2 * weight * log_pf).sum() / len(batch), policy_params(pol), allow_unused=True)
    for g_, w in zip(got, want, strict=True):
        torch.testing.assert_close(g_, torch.zeros_like(g_) if w is None else w)
    assert gsum(policy_params(pol)) > 0 and "loss/forward_kl" in out.metrics
    head = [p.grad.clone() for p in obj.log_flow_head.parameters()]
    torch.manual_seed(0)
    same_flow = build_objective("dag-db", state_shape=(2,), flow_gradient="semi", flow_loss="exponential",
                                exp_clamp=1.0).double()
    run(same_flow, pol, traj)
    for a, b in zip(head, [p.grad for p in same_flow.log_flow_head.parameters()], strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="policy_loss"):
        build_objective("dag-db", state_shape=(2,), policy_loss="kl")
    with pytest.raises(ValueError, match="flow_loss='exponential'"):
        build_objective("dag-db", state_shape=(2,), flow_gradient="semi", policy_loss="forward_kl")
    with pytest.raises(ValueError, match="exp_clamp"):
        build_objective("dag-db", state_shape=(2,), flow_gradient="semi", flow_loss="exponential",
                        exp_clamp=float("nan"))
    with pytest.raises(ValueError, match="dag-db option"):
        build_objective("dag-kl", state_shape=(2,), flow_gradient="semi", flow_loss="exponential",
                        policy_loss="forward_kl")

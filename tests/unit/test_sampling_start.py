"""The tilted start (x_start ∝ N(0, I)·G(x_start), by importance resampling) and the objectives' start values."""

import math

import pytest
import torch

from gfnalign.objectives import build_objective
from gfnalign.sampling.start import resample_start
from tests.unit.test_objectives_world import DT, FnLookahead, PointMassPolicy, make_schedule


def test_resample_start_draws_from_the_tilted_gaussian():
    """N(0, 1) tilted by exp(a·x) is N(a, 1): with M = 64 proposals the SIR mean is a − O(1/M)."""
    n, M, a = 20000, 64, 0.8
    g = torch.Generator().manual_seed(0)
    cand = torch.randn(n * M, 1, generator=g, dtype=DT)
    x = resample_start(cand, a * cand[:, 0], M, g)
    assert x.shape == (n, 1)
    se = 1 / math.sqrt(n)
    # SIR bias for this tilt: E[mean] = a·(1 − (e^{a²} − 1)/M) to first order (≈ 0.014 here); allow 5 s.e.
    expected = a * (1 - (math.exp(a**2) - 1) / M)
    assert abs(float(x.mean()) - expected) < 5 * se
    assert abs(float(x.var()) - 1) < 0.05
    # M = 1: no resampling at all
    assert torch.equal(resample_start(cand[:5], torch.zeros(5, dtype=DT), 1, g), cand[:5])


def test_resample_start_rejects_bad_weights_and_shapes():
    cand = torch.zeros(6, 2)
    with pytest.raises(ValueError, match="NaN"):
        resample_start(cand, torch.tensor([0, 1, float("nan"), 0, 0, 0.0]), 3)
    with pytest.raises(ValueError, match="groups of 4"):
        resample_start(cand, torch.zeros(6), 4)
    with pytest.raises(ValueError, match=">= 1"):
        resample_start(cand, torch.zeros(6), 0)


def u_value(x, t, terminal):
    return torch.sin(x[:, 0]) + 0.3 * x[:, 1] ** 2


@pytest.mark.parametrize("relative", [True, False])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_dag_start_weight_is_the_learned_start_value(relative, reduction):
    sched = make_schedule()
    pol = PointMassPolicy(sched)
    obj = build_objective("dag-db", state_shape=(2,), relative=relative, head_zero_init=False,
                          log_prob_reduction=reduction).double()
    assert obj.learns_start_value
    x = torch.randn(7, 2, dtype=DT)
    t0 = sched.timesteps[:1].expand(7)
    w = obj.log_start_weight(pol, FnLookahead(value=u_value), x, None, beta=0.7)
    D = 1.0 if reduction == "sum" else 2.0
    expect = D * (obj.log_flow_head(x, t0, None) + 0.7 * u_value(x, t0, None))
    if not relative:  # the start law ∝ F itself, against an N(0, I) proposal
        expect = expect + 0.5 * (x**2).sum(1)
    assert torch.allclose(w, expect.detach(), atol=1e-10) and not w.requires_grad


def test_rtb_start_weight_needs_a_start_head_and_other_objectives_have_none():
    sched = make_schedule()
    pol = PointMassPolicy(sched)
    x = torch.randn(4, 2, dtype=DT)
    obj = build_objective("rtb", log_z="start", state_shape=(2,)).double()
    with torch.no_grad():
        obj.log_z.bias.fill_(1.5)
    assert obj.learns_start_value
    assert torch.allclose(obj.log_start_weight(pol, None, x, None, beta=1.0), torch.full((4,), 1.5, dtype=DT))
    assert not build_objective("rtb").learns_start_value
    assert build_objective("rtb").log_start_weight(pol, None, x, None, beta=1.0) is None
    res = build_objective("residual-nabla-db", state_shape=(2,))
    assert not res.learns_start_value and res.log_start_weight(pol, None, x, None, beta=1.0) is None

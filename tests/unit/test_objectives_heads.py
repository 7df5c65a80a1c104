"""Learnable heads: shapes, conditioning, zero initialisation, errors."""

import pytest
import torch

from gfnalign.objectives import make_flow_score_head, make_log_flow_head
from gfnalign.objectives.heads import timestep_embedding


@pytest.mark.parametrize("cond", [None, "flat", "seq"])
def test_flat_heads(cond):
    N, d, D = 5, 3, 7
    x = torch.randn(N, d)
    t = torch.randint(0, 1000, (N,))
    c = None if cond is None else (torch.randn(N, D) if cond == "flat" else torch.randn(N, 4, D))
    f = make_log_flow_head((d,), cond_dim=None if cond is None else D, hidden=16)
    g = make_flow_score_head((d,), cond_dim=None if cond is None else D, hidden=16)
    assert f(x, t, c).shape == (N,) and g(x, t, c).shape == (N, d)
    assert (g(x, t, c) == 0).all() and (f(x, t, c) == 0).all()  # zero-initialised output layers
    f2 = make_log_flow_head((d,), cond_dim=D, hidden=16, zero_init=False)
    y = f2(x, t, torch.randn(N, D))
    assert y.abs().sum() > 0
    assert not torch.allclose(y, f2(x, t, torch.randn(N, D)))  # depends on cond
    assert not torch.allclose(y[:1], f2(x[:1], t[:1] + 100, None))  # depends on t


def test_flat_score_head_of_dim_one_keeps_its_shape():
    g = make_flow_score_head((1,), hidden=8)
    assert g(torch.randn(4, 1), torch.zeros(4, dtype=torch.long)).shape == (4, 1)


@pytest.mark.parametrize("cond", [None, "seq"])
def test_image_heads(cond):
    N, C, H, W, D = 2, 4, 8, 8, 6
    x = torch.randn(N, C, H, W, dtype=torch.float64)
    t = torch.tensor([999, 0])
    c = None if cond is None else torch.randn(N, 3, D)
    f = make_log_flow_head((C, H, W), cond_dim=None if cond is None else D, zero_init=False, hidden=8)
    g = make_flow_score_head((C, H, W), cond_dim=None if cond is None else D, hidden=8)
    y = f(x, t, c)
    assert y.shape == (N,) and y.dtype == torch.float64 and y.abs().sum() > 0
    s = g(x, t, c)
    assert s.shape == x.shape and (s == 0).all()
    s.sum().backward()
    assert g.out.weight.grad.abs().sum() > 0  # zero-init output still learns


def test_head_errors_and_embedding():
    with pytest.raises(ValueError, match="state_shape"):
        make_log_flow_head((4, 8))
    f = make_log_flow_head((3,), cond_dim=5, hidden=8)
    with pytest.raises(ValueError, match="expects"):
        f(torch.randn(2, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="cond"):
        f(torch.randn(2, 3), torch.zeros(2, dtype=torch.long), torch.randn(2, 4))
    with pytest.raises(ValueError, match="timestep"):
        f(torch.randn(2, 3), torch.zeros(3, dtype=torch.long))
    e = timestep_embedding(torch.tensor([0, 500, 999]), 8, 1000)
    assert e.shape == (3, 8) and torch.allclose(e[0, :4], torch.ones(4))
    # normalised by num_train_timesteps: the same fraction of the schedule embeds the same way
    assert torch.allclose(timestep_embedding(torch.tensor([50]), 8, 100), timestep_embedding(torch.tensor([500]), 8, 1000))

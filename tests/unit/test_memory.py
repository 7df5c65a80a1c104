"""Chunk sizes from a memory budget: the per-row measurement, the derivation, chunked == unchunked, and
block checkpointing (same gradients, fewer saved bytes)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gfnalign.training.memory import MemoryBudget, chunked, enable_block_checkpointing, saved_bytes


def convnet(width: int = 8) -> nn.Module:
    torch.manual_seed(0)
    blocks = nn.ModuleList([nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.SiLU()) for _ in range(3)])

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Conv2d(3, width, 3, padding=1)
            self.blocks = blocks
            self.out = nn.Conv2d(width, 1, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.inp(x)
            for b in self.blocks:
                h = b(h)
            return self.out(h).flatten(1).mean(1)

    return Net().double().requires_grad_(False)


def test_saved_bytes_counts_what_autograd_keeps_and_skips_resident_weights():
    a = torch.randn(100, dtype=torch.float64, requires_grad=True)
    b = torch.randn(100, dtype=torch.float64)
    assert saved_bytes(lambda: (a * b).sum()) == 100 * 8  # mul keeps the other factor only
    lin = nn.Linear(50, 50, bias=False).double()
    x = torch.randn(4, 50, dtype=torch.float64, requires_grad=True)
    with_weight = saved_bytes(lambda: lin(x).sum())
    assert saved_bytes(lambda: lin(x).sum(), exclude=[lin]) == with_weight - 50 * 50 * 8


def test_saved_bytes_frees_the_measured_graph_and_keeps_it_differentiable():
    """A node that saves its own output (exp, softmax, attention) must not keep its graph alive after the
    probe: a pack hook that returned the tensor itself made a reference cycle (tensor -> its node -> the saved
    tensor) that no garbage collection breaks, and every probe leaked its graph (5.5 GB at 512 px)."""
    import gc
    import weakref

    x = torch.randn(64, 64, dtype=torch.float64, requires_grad=True)
    kept: list[weakref.ref] = []

    def fn() -> torch.Tensor:
        y = torch.exp(x)  # exp saves its result
        kept.append(weakref.ref(y))
        return y.sum()

    assert saved_bytes(fn) == 64 * 64 * 8
    gc.collect()
    assert kept[0]() is None
    # the hook's tensors still serve a backward inside the probe (the objectives take VJPs in their forward)
    grads = []
    saved_bytes(lambda: grads.append(torch.autograd.grad(torch.exp(x).sum(), x)[0]))
    torch.testing.assert_close(grads[0], torch.exp(x).detach())


def test_saved_bytes_per_row_is_linear_in_rows():
    net = convnet()
    one = saved_bytes(lambda: net(torch.randn(1, 3, 16, 16, dtype=torch.float64, requires_grad=True)), [net])
    three = saved_bytes(lambda: net(torch.randn(3, 3, 16, 16, dtype=torch.float64, requires_grad=True)), [net])
    assert one > 0 and three == 3 * one


@pytest.mark.parametrize(("budget_gb", "per_row_mb", "total", "expected"), [
    (1.0, 300, 10, 3),     # ⌊1024 / 300⌋
    (1.0, 300, 2, 2),      # never more than the rows there are
    (0.1, 300, 10, 1),     # one row is over the budget: still chunks of 1
    (2.0, 1, 10_000, 2048),
])
def test_rows_are_the_budget_over_the_measured_bytes_per_row(budget_gb, per_row_mb, total, expected):
    calls = []
    budget = MemoryBudget(budget_gb)

    def measure() -> float:
        calls.append(1)
        return per_row_mb * 2**20

    assert budget.rows("pass", total, measure) == expected
    assert budget.rows("pass", total, measure) == expected
    assert len(calls) == 1  # measured once per pass
    assert budget.describe()["per_row_gb/pass"] == pytest.approx(per_row_mb / 1024)


def test_automatic_budget_is_a_share_of_free_memory_and_bad_budgets_are_rejected():
    assert 0 < MemoryBudget(None).budget_bytes
    for bad in (0, -1.0, "8GB", float("nan")):
        with pytest.raises(ValueError, match="memory.budget_gb"):
            MemoryBudget(bad)


def test_chunked_results_equal_unchunked_ones():
    net = convnet()
    x = torch.randn(7, 3, 16, 16, dtype=torch.float64)
    whole = net(x)
    for rows in (1, 2, 3, 7, 50):
        torch.testing.assert_close(chunked(net, rows, x), whole, rtol=1e-12, atol=1e-12)
    w = torch.randn(7, dtype=torch.float64)
    torch.testing.assert_close(chunked(lambda a, b, c: net(a) * b, 3, x, w, None), whole * w, rtol=1e-12, atol=1e-12)


def test_block_checkpointing_keeps_gradients_and_saves_less():
    net = convnet()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)

    def grad() -> torch.Tensor:
        xi = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(net(xi).sum(), xi)
        return g

    plain_grad = grad()
    plain_bytes = saved_bytes(lambda: net(x.clone().requires_grad_(True)), [net])
    with torch.no_grad():
        plain_out = net(x)
    assert enable_block_checkpointing(net) == 3
    assert enable_block_checkpointing(net) == 3  # idempotent
    torch.testing.assert_close(grad(), plain_grad, rtol=1e-12, atol=1e-12)
    assert saved_bytes(lambda: net(x.clone().requires_grad_(True)), [net]) < plain_bytes
    with torch.no_grad():
        torch.testing.assert_close(net(x), plain_out, rtol=0, atol=0)

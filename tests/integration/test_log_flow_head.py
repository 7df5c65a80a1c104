"""The backbone's log-flow head: the DAG authors' layout at their size, and a float32 output under bf16."""

import pytest
import torch

pytest.importorskip("diffusers")

from gfnalign.backbones.latent_heads import LogFlowHead  # noqa: E402


def test_dag_layout_has_the_authors_size_and_compact_stays_small():
    dag = LogFlowHead((4, 64, 64), 768, layout="dag")
    n_dag = sum(p.numel() for p in dag.parameters())
    # spec/dag.md §4: 6,452,993 counted by hand from the diffusers block definitions
    assert abs(n_dag - 6_452_993) / 6_452_993 < 0.01, n_dag
    compact = LogFlowHead((4, 64, 64), 768, layout="compact")
    assert sum(p.numel() for p in compact.parameters()) < 0.5e6
    with pytest.raises(ValueError, match="layout"):
        LogFlowHead((4, 8, 8), 32, layout="huge")


@pytest.mark.parametrize("layout", ["compact", "dag"])
def test_head_output_is_float32_under_bf16_autocast(layout):
    torch.manual_seed(0)
    head = LogFlowHead((4, 16, 16), 32, layout=layout)
    with torch.no_grad():
        head.out.bias.fill_(545.37)
    x, t, cond = torch.randn(3, 4, 16, 16), torch.tensor([1, 500, 999]), torch.randn(3, 5, 32)
    with torch.no_grad():
        ref = head(x, t, cond)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = head(x, t, cond)
    assert low.dtype == torch.float32
    # bf16 rounding of a ~545 output would be ±2; only the features lose precision now
    assert torch.allclose(low, ref, atol=0.05), (low - ref).abs().max()
    if layout == "compact":  # zero-initialised weight: the output is the bias exactly (bf16 would give 544)
        assert torch.allclose(low, torch.full_like(low, 545.37), rtol=0, atol=1e-4)


def _randomised(head):
    """The heads start at exactly 0 (zero-initialised output layer); give them a random one so that the
    timestep's effect on the output is visible."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in head.parameters():
            if not p.abs().sum():
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return head


@pytest.mark.parametrize("kind", ["compact", "dag", "score"])
def test_float_flow_timesteps_reach_the_embedding_unrounded_and_integer_ones_are_unchanged(kind):
    """Rectified-flow schedules give float timesteps sigma * T: two noise levels 0.3 apart must not share one
    embedding (the heads rounded them with .long() before); VP's int64 timesteps give bit-identical outputs to
    the same values as floats (the embedding casts to float32 either way)."""
    from gfnalign.backbones.latent_heads import FlowScoreHead

    torch.manual_seed(0)
    if kind == "score":
        head = FlowScoreHead((4, 8, 8), 32)
    else:
        head = LogFlowHead((4, 16, 16) if kind == "dag" else (4, 8, 8), 32, layout=kind)
    head = _randomised(head).eval()
    x, cond = torch.randn(1, *head.latent_shape), torch.randn(1, 5, 32)

    def at(t):  # one row per call: batched rows may differ in the last bits (blocked matmuls)
        with torch.no_grad():
            return head(x, t, cond)

    f64 = torch.float64
    assert not torch.equal(at(torch.tensor([500.3], dtype=f64)), at(torch.tensor([500.0], dtype=f64)))  # was equal
    assert not torch.equal(at(torch.tensor([500.6], dtype=f64)), at(torch.tensor([500])))  # was equal (truncated)
    for t in (0, 1, 500, 999):  # integer timesteps: the same bits as float ones of the same value, any float dtype
        assert torch.equal(at(torch.tensor([t])), at(torch.tensor([float(t)], dtype=f64)))
        assert torch.equal(at(torch.tensor([t])), at(torch.tensor([float(t)])))
    assert torch.equal(at(500.3), at(torch.tensor([500.3])))  # a Python float is a float32 timestep

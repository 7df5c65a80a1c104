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

"""benchmarks/gpu_flow.py in its --tiny CPU smoke mode (the full sizes need a GPU): one method per model runs
end to end and reports a step time and a memory figure."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("model", ["sd35m", "flux1"])
def test_gpu_flow_tiny_runs(model, tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location("gpu_flow", REPO / "benchmarks" / "gpu_flow.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "out.json"
    assert mod.main(["--model", model, "--device", "cpu", "--tiny", "--batches", "1", "--methods", "grpo",
                     "--steps", "2", "--train-repeats", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    (row,) = data["rows"]
    assert "error" not in row and row["s_per_update"] > 0 and row["peak_mem_gb"] > 0

"""``gfnalign eval`` / ``gfnalign sample``: corrupt, truncated, mismatched or NaN weights and bad counts are
one named line (exit 2), never a traceback, and nothing in a weights file executes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gfnalign.cli.main import main
from gfnalign.training.config import TrainConfig
from gfnalign.training.trainer import Trainer
from tests.integration._train_utils import tiny_config, tiny_pipeline

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("evalerr")
    cfg = TrainConfig.from_dict(tiny_config(tiny_pipeline(root), "dag-db", {"fraction": 0.5},
                                            training={"epochs": 1, "micro_batch": 2, "max_updates_per_epoch": 1}))
    out = root / "run"
    assert Trainer(cfg, out).train() == 0
    return out


def _copy_final(run: Path, tmp_path: Path) -> Path:
    import shutil

    dst = tmp_path / "lora"
    shutil.copytree(run / "final", dst)
    return dst


def _err(capsys) -> str:
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and not ln.startswith("Loading")]
    assert lines, "no message"
    assert not any("Traceback" in ln for ln in lines)
    return lines[-1]


def _truncate(folder: Path) -> None:
    f = folder / "pytorch_lora_weights.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _garbage(folder: Path) -> None:
    (folder / "pytorch_lora_weights.safetensors").write_bytes(b"\x00" * 64)


def _nan(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    f = folder / "pytorch_lora_weights.safetensors"
    tensors = load_file(str(f))
    first = sorted(tensors)[0]
    tensors[first] = torch.full_like(tensors[first], float("nan"))
    save_file(tensors, str(f), metadata={"format": "pt"})


def _wrong_shapes(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    f = folder / "pytorch_lora_weights.safetensors"
    tensors = {k: torch.cat([v, v]) for k, v in load_file(str(f)).items()}  # rank doubled
    save_file(tensors, str(f), metadata={"format": "pt"})


@pytest.mark.parametrize("damage,expect", [(_truncate, "not a readable safetensors"),
                                           (_garbage, "not a readable safetensors"),
                                           (_nan, "NaN/inf"),
                                           (_wrong_shapes, "do not fit")],
                         ids=["truncated", "garbage", "nan", "wrong-shapes"])
def test_sample_names_bad_lora_files(run, tmp_path, capsys, damage, expect):
    lora = _copy_final(run, tmp_path)
    damage(lora)
    code = main(["sample", "--lora", str(lora), "--prompt", "a handwritten digit 3", "--n", "1",
                 "--out", str(tmp_path / "png")])
    assert code == 2 and expect in _err(capsys)
    assert not (tmp_path / "png").exists()


def test_eval_refuses_a_crafted_checkpoint_and_mismatched_weights(run, tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('x')",))

    step = next((run / "checkpoints").glob("step_*"))
    import shutil

    evil = tmp_path / "step_evil"
    shutil.copytree(step, evil)
    torch.save({"w": Payload()}, evil / "trainable.pt")
    code = main(["eval", "--run", str(run), "--lora", str(evil), "--samples", "2", "--no-report"])
    assert code == 2 and "not a readable tensor file" in _err(capsys) and not marker.exists()
    code = main(["eval", "--run", str(run), "--samples", "2", "--no-report", "--set", "backbone.lora_rank=3"])
    assert code == 2 and "do not fit" in _err(capsys)


@pytest.mark.parametrize("argv,expect", [
    (["sample", "--n", "0"], "--n=0"),
    (["sample", "--n", "2", "--batch-size", "0"], "--batch-size=0"),
    (["sample", "--steps", "0"], "--steps=0"),
    (["sample", "--guidance", "nan"], "--guidance"),
    (["sample", "--seed", "-1"], "--seed=-1"),
    (["sample", "--prompt", ""], "--prompt"),
    (["eval", "--samples", "1"], "--samples=1"),
    (["eval", "--samples", "2", "--batch-size", "0"], "--batch-size=0"),
    (["eval", "--samples", "2", "--max-prompts", "0"], "--max-prompts=0"),
    (["eval", "--samples", "2", "--lora", "/no/such/folder"], "does not exist"),
], ids=lambda v: "-".join(v) if isinstance(v, list) else None)
def test_bad_counts_are_named(run, tmp_path, capsys, argv, expect):
    if argv[0] == "sample":
        argv = argv + ["--run", str(run), "--out", str(tmp_path / "png")] + (
            [] if "--prompt" in argv else ["--prompt", "a handwritten digit 1"])
    else:
        argv = argv + ["--run", str(run), "--no-report"]
    assert main(argv) == 2
    assert expect in _err(capsys)


def test_the_python_api_raises_the_same_named_errors(run, tmp_path):
    """gfnalign.sample / gfnalign.evaluate run the checks the commands report (the CLI is a layer over them)."""
    import gfnalign

    lora = _copy_final(run, tmp_path)
    _nan(lora)
    with pytest.raises(gfnalign.WeightsError, match="NaN/inf"):
        gfnalign.sample(lora=lora, prompts=["a handwritten digit 3"], n=1)
    _truncate(lora)
    with pytest.raises(gfnalign.WeightsError, match="not a readable safetensors"):
        gfnalign.evaluate(run, lora=lora, samples=2)
    with pytest.raises(gfnalign.WeightsError, match="do not fit"):
        gfnalign.evaluate(run, samples=2, overrides={"backbone.lora_rank": 3})
    for call, match in [(lambda: gfnalign.sample(run, n=0), "n=0"),
                        (lambda: gfnalign.sample(run, guidance=float("nan")), "guidance=nan"),
                        (lambda: gfnalign.sample(run, prompts=[" "]), "prompts=' '"),
                        (lambda: gfnalign.evaluate(run, samples=1), "samples=1 .*>= 2"),
                        (lambda: gfnalign.evaluate(run, lora=tmp_path / "nope"), "does not exist")]:
        with pytest.raises(gfnalign.ArgumentError, match=match):
            call()

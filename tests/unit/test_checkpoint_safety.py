"""Checkpoint files never execute code, RNG state round-trips as plain tensors, torn files are tolerated."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from gfnalign.training import checkpoint as ckpt


class _Payload:
    """Unpickling this object runs ``exec``: what a crafted checkpoint would do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def test_crafted_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "rng_rank0.pt"
    torch.save({"torch": torch.get_rng_state(), "extra": _Payload(str(marker))}, evil)
    with pytest.raises(ckpt.CheckpointError, match="not a readable tensor file"):
        ckpt.load_tensors(evil)
    assert not marker.exists()
    # control: the file really is malicious; an unrestricted load would have run it
    torch.load(evil, weights_only=False)
    assert marker.read_text() == "pwned"


def test_truncated_and_non_torch_files_are_named_errors(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(3)}, good)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = tmp_path / "text.pt"
    text.write_text("hello")
    for path in (cut, text, tmp_path / "missing.pt"):
        with pytest.raises(ckpt.CheckpointError, match=path.name):
            ckpt.load_tensors(path)


def test_rng_state_round_trips_through_weights_only(tmp_path):
    torch.manual_seed(3)
    random.seed(4)
    np.random.seed(5)
    random.gauss(0, 1)  # leaves a cached gaussian in python's state
    np.random.standard_normal()
    path = tmp_path / "rng.pt"
    torch.save(ckpt.rng_state(), path)
    expected = (torch.rand(4), random.random(), random.gauss(0, 1), np.random.standard_normal(3))
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    ckpt.set_rng_state(ckpt.load_tensors(path))
    got = (torch.rand(4), random.random(), random.gauss(0, 1), np.random.standard_normal(3))
    assert torch.equal(expected[0], got[0]) and expected[1:3] == got[1:3]
    assert np.array_equal(expected[3], got[3])


def test_rng_state_of_the_wrong_layout_is_a_named_error():
    with pytest.raises(ckpt.CheckpointError, match="RNG state"):
        ckpt.set_rng_state({"torch": torch.get_rng_state()})


def test_torn_last_line_is_dropped_and_a_torn_middle_line_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1}) + "\n" + json.dumps({"step": 2}) + "\n" + '{"step": 3, "lo')
    assert ckpt.read_jsonl(path) == [{"step": 1}, {"step": 2}]
    path.write_text('{"step": 1}\n{"st\n{"step": 3}\n')
    with pytest.raises(ckpt.CheckpointError, match="line 2"):
        ckpt.read_jsonl(path)


def test_json_writes_are_atomic_and_torn_json_counts_as_absent(tmp_path):
    path = tmp_path / "eval_before.json"
    ckpt.write_json(path, {"reward_mean": 1.5})
    assert ckpt.read_json(path) == {"reward_mean": 1.5}
    assert [p.name for p in tmp_path.iterdir()] == ["eval_before.json"]
    path.write_text('{"reward_mean": 1.')
    assert ckpt.read_json_or_none(path) is None
    path.write_text("[1, 2]")
    with pytest.raises(ckpt.CheckpointError, match="JSON object"):
        ckpt.read_json(path)


def test_stale_temporary_folders_are_ignored_and_removed(tmp_path):
    root = tmp_path / "checkpoints"
    (root / ".tmp-step_1").mkdir(parents=True)
    (root / ".tmp-step_1" / "trainable.pt").write_bytes(b"half")
    assert ckpt.resolve_resume(tmp_path, "latest") is None  # nothing complete: start fresh
    tmp = ckpt.begin(root, 2)
    done = ckpt.commit(root, tmp, 2, keep=2)
    (root / ".tmp-step_3").mkdir()
    assert ckpt.resolve_resume(tmp_path, "latest") == done
    assert ckpt.remove_stale(root) == [root / ".tmp-step_3"]
    assert sorted(p.name for p in root.iterdir()) == ["step_2"]

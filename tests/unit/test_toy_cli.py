"""`gfnalign toy` rejects bad mixture / reward files with an error naming the field (no training runs)."""

import json

import pytest

from gfnalign.cli.main import main

MIX = {"weights": [0.5, 0.5], "means": [[2, 0], [-2, 0]], "stds": [0.5, 0.5]}
REWARD = {"type": "linear", "a": [1.0, 0.0]}


def _run(tmp_path, capsys, mix=MIX, reward=REWARD, extra=()):
    (tmp_path / "mix.json").write_text(mix if isinstance(mix, str) else json.dumps(mix))
    (tmp_path / "reward.json").write_text(reward if isinstance(reward, str) else json.dumps(reward))
    rc = main(["toy", "--method", "dag-db", "--mixture", str(tmp_path / "mix.json"),
               "--reward", str(tmp_path / "reward.json"), "--beta", "0.5", *extra])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize(
    "mix,reward,needle",
    [
        ({**MIX, "weights": [0.5, 0.7]}, REWARD, "weights"),
        ({**MIX, "stds": [0.5]}, REWARD, "stds"),
        ({"weights": [1.0], "means": [[0, 0]]}, REWARD, "stds"),
        ({**MIX, "covs": [[[1, 0], [0, 1]]] * 2}, REWARD, "exactly one of"),
        (MIX, {"type": "cubic"}, "type"),
        (MIX, {"type": "linear", "a": [1, 2, 3]}, ".a"),
        (MIX, {"type": "quadratic", "center": [0, 0], "scale": -1}, "scale"),
        (MIX, {"type": "log_ratio"}, "'target'"),
        (MIX, {"type": "log_ratio", "target": {"weights": [1.0], "means": [[0, 0, 0]], "stds": [1.0]}}, "dimension"),
        (MIX, {"type": "log_ratio", "target": MIX}, "beta = 1"),  # _run passes --beta 0.5
        ("{not json", REWARD, "not valid JSON"),
    ],
)
def test_bad_files_name_the_field(tmp_path, capsys, mix, reward, needle):
    rc, err = _run(tmp_path, capsys, mix, reward)
    assert rc == 2
    assert "error" in err and needle in err


def test_bad_numbers_and_overrides(tmp_path, capsys):
    rc, err = _run(tmp_path, capsys, extra=("--samples", "1"))
    assert rc == 2 and "--samples" in err
    rc, err = _run(tmp_path, capsys, extra=("--set", "learning_rate=1"))
    assert rc == 2 and "learning_rate" in err
    (tmp_path / "mix.json").write_text(json.dumps(MIX))
    rc = main(["toy", "--method", "dag-db", "--mixture", str(tmp_path / "missing.json"),
               "--reward", str(tmp_path / "mix.json"), "--beta", "0.5"])
    assert rc == 2 and "file not found" in capsys.readouterr().err

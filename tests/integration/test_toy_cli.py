"""One short `gfnalign toy` run per method: the CLI trains a few updates and writes the OUT.json contract."""

import json

import pytest

from gfnalign.cli.main import main

METHODS = ["dag-db", "dag-kl", "nabla-db", "residual-nabla-db", "rtb", "ddpo", "reward-backprop"]
KEYS = {"method", "beta", "train_seconds", "mode_mass", "mode_mass_tv", "energy_distance",
        "energy_distance_floor", "reward_mean"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("toy")
    mix = {"weights": [0.25] * 4, "means": [[2, 2], [2, -2], [-2, 2], [-2, -2]], "stds": [0.5] * 4}
    (d / "mix.json").write_text(json.dumps(mix))
    (d / "reward.json").write_text(json.dumps({"type": "linear", "a": [1.0, 0.5]}))
    return d


@pytest.mark.parametrize("method", METHODS)
def test_toy_smoke(files, method, capsys):
    out = files / f"{method}.json"
    rc = main(["toy", "--method", method, "--mixture", str(files / "mix.json"), "--reward",
               str(files / "reward.json"), "--beta", "0.5", "--steps", "3", "--seed", "1",
               "--samples", "400", "--json", str(out), "--set", "batch_size=32", "--quiet"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert KEYS <= set(res)
    assert res["method"] == method and res["beta"] == 0.5 and res["updates"] == 3
    assert set(res["mode_mass"]) == {"target", "finetuned", "pretrained", "oracle"}
    assert set(res["reward_mean"]) == {"target", "finetuned", "pretrained", "oracle"}
    for key in ("target", "finetuned", "pretrained", "oracle"):
        assert len(res["mode_mass"][key]) == 4
        assert abs(sum(res["mode_mass"][key]) - 1) < 1e-9
    # the exact target of this case (prototype numbers): 0.644 / 0.237 / 0.087 / 0.032
    assert res["mode_mass"]["target"] == pytest.approx([0.644, 0.237, 0.087, 0.032], abs=0.01)
    assert not res["diverged"]
    # three small updates from the exact start cannot move far; TV must be well defined in [0, 1]
    assert 0.0 <= res["mode_mass_tv"] <= 1.0
    assert res["energy_distance_floor"] < 0.05
    # the exact tilted-ε sampler is near the target (400 samples: mass noise ~0.02 per mode)
    assert res["mode_mass_tv_oracle"] < 0.08 and res["energy_distance_oracle"] < 0.05
    assert "mode-mass TV" in capsys.readouterr().out


@pytest.mark.parametrize(("method", "sets", "prior"), [("dag-db", [], True), ("dag-db", ["objective.relative=true"], False),
                                                      ("rtb", [], False), ("residual-nabla-db", [], False)])
def test_toy_says_which_reward_each_method_gets_and_log_ratio_targets_the_mixture(files, method, sets, prior, capsys):
    target = {"weights": [0.1, 0.2, 0.3, 0.4], "means": [[2, 2], [2, -2], [-2, 2], [-2, -2]], "stds": [0.5] * 4}
    (files / "ratio.json").write_text(json.dumps({"type": "log_ratio", "target": target}))
    out = files / "ratio.out.json"
    extra = [a for s in sets for a in ("--set", s)]
    rc = main(["toy", "--method", method, "--mixture", str(files / "mix.json"), "--reward", str(files / "ratio.json"),
               "--beta", "1", "--steps", "1", "--samples", "400", "--json", str(out), "--set", "batch_size=16", *extra])
    assert rc == 0
    err = capsys.readouterr().err
    assert ("r + log p_f/β" in err) == prior and ("plain r" in err) == (not prior)
    res = json.loads(out.read_text())
    assert res["prior_in_reward"] == prior
    # the exact target is the log-ratio's mixture (masses from 2·10⁵ exact draws)
    assert res["mode_mass"]["target"] == pytest.approx([0.1, 0.2, 0.3, 0.4], abs=0.005)


@pytest.mark.parametrize("sets", [["objective.log_z=start"], ["objective.log_z=start", "start=tilted"]])
def test_toy_sd_schedule_and_tilted_start(files, sets, capsys):
    out = files / "sd.json"
    extra = [a for s in sets for a in ("--set", s)]
    rc = main(["toy", "--method", "rtb", "--mixture", str(files / "mix.json"), "--reward", str(files / "reward.json"),
               "--beta", "0.5", "--steps", "2", "--samples", "400", "--json", str(out), "--set", "batch_size=16",
               "--set", "noise_schedule=sd", "--set", "num_steps=20", *extra, "--quiet"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["config"]["noise_schedule"] == "sd" and res["config"]["start"] == ("tilted" if len(sets) == 2 else "noise")
    assert ("noise_start" in res) == (len(sets) == 2)  # the tilted run also reports the N(0, I) start
    assert not res["diverged"]


def test_toy_tilted_start_needs_a_start_value(files, capsys):
    rc = main(["toy", "--method", "residual-nabla-db", "--mixture", str(files / "mix.json"), "--reward",
               str(files / "reward.json"), "--beta", "0.5", "--steps", "1", "--set", "start=tilted"])
    assert rc == 2 and "start='tilted' needs" in capsys.readouterr().err

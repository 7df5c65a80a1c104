"""The Python API's light parts: configs from presets / dicts / files, registration, lazy top-level names."""

import subprocess
import sys

import pytest
import yaml


def test_import_gfnalign_is_light_and_names_resolve_lazily():
    code = (
        "import sys\n"
        "for banned in ('diffusers', 'peft', 'accelerate', 'transformers', 'wandb'):\n"
        "    sys.modules[banned] = None\n"
        "import gfnalign\n"
        "assert 'torch' not in sys.modules, 'import gfnalign pulled torch'\n"
        "assert callable(gfnalign.load_config) and 'gfnalign.api' in sys.modules\n"
        "cfg = gfnalign.load_config('demo')\n"
        "assert not [m for m in sys.modules if m.startswith('gfnalign.backbones')]\n"
        "print(cfg.method.name)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "dag-db"


def test_every_public_name_is_importable():
    import gfnalign

    for name in gfnalign.__all__:
        assert getattr(gfnalign, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        gfnalign.nope  # noqa: B018


def test_load_config_from_preset_dict_file_and_overrides(tmp_path):
    import gfnalign
    from gfnalign.training.presets import digits_preset

    preset = gfnalign.load_config("digits-dag-db")
    assert preset.to_dict() == gfnalign.load_config(digits_preset("dag-db")).to_dict()
    assert gfnalign.load_config("digits-dag-db.yaml").to_dict() == preset.to_dict()

    cfg = gfnalign.load_config("digits-dag-db", {"training.epochs": 3, "method.options.fraction": 0.5})
    assert (cfg.training.epochs, cfg.method.options["fraction"]) == (3, 0.5)
    assert gfnalign.load_config(cfg, ["beta.value=2"]).beta.value == 2.0
    assert cfg.beta.value == preset.beta.value  # the source is copied, never changed

    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"method": {"name": "ddpo"}, "training": {"epochs": 2}}))
    assert gfnalign.load_config(f).method.name == "ddpo"
    assert gfnalign.load_config({"seed": 5}).seed == 5
    assert gfnalign.load_config().to_dict() == gfnalign.TrainConfig().to_dict()


def test_load_config_errors_name_the_problem():
    import gfnalign

    with pytest.raises(gfnalign.ConfigError, match="neither a YAML file nor a preset name"):
        gfnalign.load_config("no-such-preset")
    with pytest.raises(gfnalign.ConfigError, match="training.epochs"):
        gfnalign.load_config("demo", {"training.epochs": 0})
    with pytest.raises(gfnalign.ConfigError, match="logging.wandb.mode"):
        gfnalign.load_config("demo", {"logging.wandb.mode": "sometimes"})


def test_register_objective_makes_the_name_valid_in_configs():
    import gfnalign
    from gfnalign.objectives.base import REGISTRY
    from gfnalign.objectives.ddpo import DDPO

    with pytest.raises(gfnalign.ConfigError, match="method.name"):
        gfnalign.load_config({"method": {"name": "my-ddpo-copy"}})

    @gfnalign.register_objective("my-ddpo-copy")
    class MyDDPO(DDPO):
        pass

    try:
        cfg = gfnalign.load_config({"method": {"name": "my-ddpo-copy", "options": {"clip_range": 0.1}}})
        assert cfg.method.name == "my-ddpo-copy"
        with pytest.raises(gfnalign.ConfigError, match="not an option"):
            gfnalign.load_config({"method": {"name": "my-ddpo-copy", "options": {"bogus": 1}}})
        with pytest.raises(ValueError, match="built-in"):
            gfnalign.register_objective("ddpo", MyDDPO)
    finally:
        REGISTRY.pop("my-ddpo-copy", None)


def test_register_reward_class_builds_by_name():
    import torch

    import gfnalign
    from gfnalign.rewards import build_reward
    from gfnalign.rewards.registry import _REGISTRY

    @gfnalign.register_reward("test-api-brightness", differentiable=True)
    class Brightness(gfnalign.Reward):
        name = "test-api-brightness"
        differentiable = True

        def __init__(self, scale: float = 1.0):
            super().__init__()
            self.scale = scale

        def score(self, images, prompts):
            return self.scale * images.mean(dim=(1, 2, 3))

    try:
        assert isinstance(Brightness(), gfnalign.Reward)  # the decorator returns the class itself
        reward = build_reward({"name": "test-api-brightness", "scale": 2.0})
        out = reward(torch.full((3, 3, 4, 4), 0.25), ["a", "b", "c"])
        assert torch.allclose(out, torch.full((3,), 0.5))
        assert gfnalign.load_config({"reward": "test-api-brightness"}).reward == "test-api-brightness"
    finally:
        _REGISTRY.pop("test-api-brightness", None)


def test_wandb_is_never_imported_unless_enabled(tmp_path):
    code = (
        "import sys\n"
        "sys.modules['wandb'] = None  # any import of it now raises ImportError\n"
        "import gfnalign\n"
        "from gfnalign.training.tracking import NullTracker, open_tracker\n"
        "import gfnalign.training.trainer\n"
        "cfg = gfnalign.load_config('demo')\n"
        f"t = open_tracker(cfg, {str(tmp_path)!r})\n"
        "assert type(t) is NullTracker, t\n"
        "off = gfnalign.load_config('demo', {'logging.wandb.project': 'p', 'logging.wandb.mode': 'disabled'})\n"
        f"assert type(open_tracker(off, {str(tmp_path)!r})) is NullTracker\n"
        "try:\n"
        "    gfnalign.load_config('demo', {'logging.wandb.project': 'p'})\n"
        "except gfnalign.ConfigError as err:\n"
        "    assert 'wandb' in str(err) and 'pip install' in str(err), err\n"
        "else:\n"
        "    raise AssertionError('a wandb project without the package must be a config error')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def _mean_score(images, prompts):
    return images.mean(dim=(1, 2, 3))


def test_reward_objects_are_recorded_by_import_path_and_rebuild_in_process():
    """train(reward=obj) records obj in config.yaml: an importable function by its path; an instance, or a
    class defined where nothing can import it (a notebook cell, an exec'd snippet), is also registered under
    that path in this process, so the recorded config validates and builds the same object here."""
    import torch

    import gfnalign
    from gfnalign.api import reward_spec_of
    from gfnalign.rewards import build_reward
    from gfnalign.rewards.registry import _REGISTRY

    assert reward_spec_of(_mean_score) == f"{__name__}:_mean_score"
    assert f"{__name__}:_mean_score" not in _REGISTRY  # importable: nothing registered

    cell: dict = {"__name__": "my_lab.notebook_cell", "gfnalign": gfnalign}
    exec("class Ink(gfnalign.Reward):\n    name = 'ink-cell'\n    differentiable = True\n"  # noqa: S102
         "    def score(self, images, prompts):\n        return images.mean(dim=(1, 2, 3))\n", cell)
    ink = cell["Ink"]()
    spec = reward_spec_of(ink)
    try:
        assert spec == "my_lab.notebook_cell:Ink"
        assert gfnalign.load_config({"reward": spec}).reward == spec  # validates although nothing imports it
        assert build_reward(spec) is ink
        out = build_reward(spec)(torch.full((2, 3, 4, 4), 0.5), ["a", "b"])
        assert torch.allclose(out, torch.full((2,), 0.5))
    finally:
        _REGISTRY.pop(spec, None)
    with pytest.raises(gfnalign.ConfigError, match="my_lab.notebook_cell"):
        gfnalign.load_config({"reward": spec})  # unregistered again: named, not silently accepted

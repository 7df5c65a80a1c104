"""Reward contract: input/output validation, registry, callables, JPEG, composite, digits-world rewards."""

from __future__ import annotations

import io
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from gfnalign.rewards import (
    CallableReward,
    MissingDependencyError,
    Reward,
    RewardOutputError,
    build_reward,
    list_rewards,
)


def _images(n=8, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g)


def _prompts(n=8):
    return [f"a handwritten digit {k % 10}" for k in range(n)]


class _Const(Reward):
    name = "const"

    def __init__(self, out):
        super().__init__()
        self.out = out

    def score(self, images, prompts):
        return self.out(images) if callable(self.out) else self.out


# -- inputs ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "images, prompts, match",
    [
        (torch.rand(2, 3, 8, 8) * 2 - 1, ["a", "b"], r"\[0,1\].*\(images \+ 1\) / 2"),
        (torch.rand(2, 3, 8, 8) * 255, ["a", "b"], r"\[0,1\].*divide by 255"),
        (torch.rand(2, 1, 8, 8), ["a", "b"], r"3 channels.*expand"),
        (torch.rand(2, 8, 8, 3), ["a", "b"], r"3 channels.*permute"),
        (torch.rand(3, 8, 8), ["a"], r"4 dims.*images\[None\]"),
        (torch.rand(2, 3, 8, 8), ["a"], r"2 images but 1 prompts"),
        (torch.full((2, 3, 8, 8), float("nan")), ["a", "b"], r"NaN"),
    ],
)
def test_bad_inputs_raise_clear_errors(images, prompts, match):
    reward = _Const(lambda x: x.mean((1, 2, 3)))
    with pytest.raises(ValueError, match=match):
        reward(images, prompts)


def test_bad_input_types():
    reward = _Const(lambda x: x.mean((1, 2, 3)))
    with pytest.raises(TypeError, match="uint8"):
        reward(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), ["a"])
    with pytest.raises(TypeError, match="single string"):
        reward(torch.zeros(1, 3, 4, 4), "a")
    with pytest.raises(TypeError, match="entry 1"):
        reward(torch.zeros(2, 3, 4, 4), ["a", 3])
    with pytest.raises(TypeError, match="torch.Tensor"):
        reward(np.zeros((1, 3, 4, 4)), ["a"])


def test_small_overshoot_is_tolerated_and_clamped():
    seen = {}

    def fn(x, p):
        seen["range"] = (float(x.min()), float(x.max()))
        return torch.zeros(x.shape[0])

    x = torch.rand(2, 3, 4, 4)
    x[0, 0, 0, 0] = 1.0005
    x[1, 0, 0, 0] = -0.0005
    CallableReward(fn)(x, ["a", "b"])
    assert seen["range"] == (0.0, 1.0)


# -- outputs --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "out, match",
    [
        (torch.tensor([1.0, float("nan")]), r"non-finite.*rows \[1\]"),
        (torch.tensor([1.0, float("inf")]), r"non-finite"),
        (torch.zeros(2, 1), r"shape must be \[N\] = \[2\].*squeeze"),
        (torch.zeros(3), r"3 scores for 2 images"),
        (torch.zeros(2, dtype=torch.float64), r"float32.*float64"),
        (torch.zeros(2, dtype=torch.int64), r"float32"),
        ([1.0, 2.0], r"torch.Tensor"),
    ],
)
def test_bad_outputs_raise_reward_output_error(out, match):
    reward = _Const(out)
    with pytest.raises(RewardOutputError, match=match) as info:
        reward(torch.rand(2, 3, 4, 4), ["a", "b"])
    assert info.value.reward_name == "const"


def test_output_on_input_device_float32_and_no_graph_when_not_differentiable():
    x = torch.rand(4, 3, 8, 8, requires_grad=True)
    out = CallableReward(lambda im, p: im.mean((1, 2, 3)))(x, ["a"] * 4)
    assert out.dtype == torch.float32 and out.shape == (4,) and out.device == x.device
    assert not out.requires_grad  # non-differentiable rewards run under no_grad
    out = CallableReward(lambda im, p: im.mean((1, 2, 3)), differentiable=True)(x, ["a"] * 4)
    out.sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, 1 / (3 * 8 * 8)))


def test_float64_input_runs_in_float32():
    seen = {}

    def fn(x, p):
        seen["dtype"] = x.dtype
        return x.mean((1, 2, 3))

    out = CallableReward(fn)(torch.rand(2, 3, 4, 4, dtype=torch.float64), ["a", "b"])
    assert seen["dtype"] == torch.float32 and out.dtype == torch.float32


def test_callable_outputs_numpy_and_lists_become_float32():
    x = torch.rand(3, 3, 4, 4)
    assert CallableReward(lambda im, p: np.arange(3, dtype=np.float64))(x, ["a"] * 3).dtype == torch.float32
    assert CallableReward(lambda im, p: [1, 2, 3])(x, ["a"] * 3).tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(RewardOutputError, match="real numbers"):
        CallableReward(lambda im, p: ["a", "b", "c"])(x, ["a"] * 3)
    with pytest.raises(RewardOutputError, match="3 images"):
        CallableReward(lambda im, p: [1.0, 2.0])(x, ["a"] * 3)


# -- registry -------------------------------------------------------------------------------------------


def test_list_rewards_covers_builtins_without_importing_models():
    names = {r.name for r in list_rewards()}
    expected = {
        "jpeg-compressibility", "jpeg-incompressibility", "aesthetic", "pickscore", "clip-score", "imagereward",
        "hpsv2", "digit-alignment", "ink", "composite", "http",
    }
    assert expected <= names
    rows = {r.name: r for r in list_rewards()}
    assert rows["aesthetic"].differentiable and rows["aesthetic"].needs_weights
    assert not rows["jpeg-compressibility"].differentiable and rows["jpeg-compressibility"].inputs == "image"
    assert rows["imagereward"].extra == "image-reward"


def test_unknown_reward_suggests_names():
    with pytest.raises(ValueError, match=r"Did you mean 'jpeg-compressibility'"):
        build_reward("jpeg-compresibility")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['qualty'\].*quality"):
        build_reward({"name": "jpeg-compressibility", "qualty": 90})
    with pytest.raises(ValueError, match="'name' key"):
        build_reward({"quality": 90})


def reward_fn_for_test(images, prompts):  # referenced as "tests.unit.test_rewards_base:reward_fn_for_test"
    return images.mean((1, 2, 3))


def test_module_function_spec_builds_a_callable_reward():
    spec = f"{__name__}:reward_fn_for_test"
    r = build_reward(spec)
    assert isinstance(r, CallableReward) and not r.differentiable
    x = torch.rand(2, 3, 4, 4, requires_grad=True)
    assert torch.allclose(r(x, ["a", "b"]), x.detach().mean((1, 2, 3)))
    r = build_reward({"name": spec, "differentiable": True})
    assert r.differentiable
    r(x, ["a", "b"]).sum().backward()
    assert x.grad is not None
    with pytest.raises(ValueError, match="no attribute"):
        build_reward(f"{__name__}:nope")
    with pytest.raises(ValueError, match="cannot import module"):
        build_reward("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="unknown option"):
        build_reward({"name": spec, "wat": 1})


def test_optional_packages_fail_only_when_requested_with_pip_hint():
    for name, module, pip_name in [("imagereward", "ImageReward", "image-reward"), ("hpsv2", "hpsv2", "hpsv2")]:
        try:
            __import__(module)
            continue  # installed here: nothing to check
        except ImportError:
            pass
        with pytest.raises(MissingDependencyError, match=rf"pip install {pip_name}"):
            build_reward({"name": name, **({"checkpoint": "x"} if name == "hpsv2" else {})})


# -- JPEG -----------------------------------------------------------------------------------------------


def _pil_jpeg_kb(img: torch.Tensor, quality: int) -> float:
    arr = (img * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return len(buf.getvalue()) / 1000.0


def test_jpeg_values_match_pil_sizes():
    x = _images(8, 32)
    x[:4] = x[:4].mean(dim=(2, 3), keepdim=True)  # flat images compress far better than noise
    inc = build_reward("jpeg-incompressibility")(x, _prompts())
    comp = build_reward("jpeg-compressibility")(x, _prompts())
    expected = torch.tensor([_pil_jpeg_kb(im, 95) for im in x])
    assert inc.dtype == torch.float32 and inc.shape == (8,)
    assert torch.allclose(inc, expected) and torch.allclose(comp, -expected)
    assert (inc[:4] < inc[4:].min()).all()
    q50 = build_reward({"name": "jpeg-incompressibility", "quality": 50})(x, _prompts())
    assert torch.allclose(q50, torch.tensor([_pil_jpeg_kb(im, 50) for im in x]))
    with pytest.raises(ValueError, match="quality"):
        build_reward({"name": "jpeg-compressibility", "quality": 101})


# -- ink and digit alignment ----------------------------------------------------------------------------


def test_ink_reward_values_and_gradient():
    x = _images(8).requires_grad_(True)
    r = build_reward("ink")
    out = r(x, _prompts())
    assert torch.allclose(out, x.detach().mean((1, 2, 3)), atol=1e-6)
    out.sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, 1 / x[0].numel()))
    r = build_reward({"name": "ink", "target": 0.25, "scale": 0.5})
    flat = torch.full((2, 3, 4, 4), 0.25)
    flat[1] = 0.75
    assert torch.allclose(r(flat, ["", ""]), torch.tensor([0.0, -1.0]))
    dark = build_reward({"name": "ink", "polarity": "dark"})
    assert torch.allclose(dark(flat, ["", ""]), torch.tensor([0.75, 0.25]))
    with pytest.raises(ValueError, match="target"):
        build_reward({"name": "ink", "target": 2.0})


class _TinyClassifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(16 * 16, 10)

    def forward(self, images):
        return self.lin(images.mean(1).flatten(1))


@pytest.fixture
def fake_digits_world(monkeypatch):
    """Stand-in for gfnalign.backbones.digits with the same interface (prompt_to_digit, load_digit_classifier)."""
    mod = types.ModuleType("gfnalign.backbones.digits")
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

    def prompt_to_digit(prompt):
        found = {k for k, n in enumerate(names) if n in prompt.split()} | {int(c) for c in prompt if c.isdigit()}
        if len(found) != 1:
            raise ValueError(f"prompt {prompt!r} names no single digit")
        return found.pop()

    mod.prompt_to_digit = prompt_to_digit
    mod.load_digit_classifier = lambda path=None: _TinyClassifier()
    mod.DIGIT_PROMPTS = tuple(f"a handwritten digit {n}" for n in names)
    monkeypatch.setitem(sys.modules, "gfnalign.backbones.digits", mod)
    return mod


def test_digit_alignment_is_log_prob_of_prompted_digit(fake_digits_world):
    r = build_reward("digit-alignment")
    assert r.differentiable
    x = _images(8).requires_grad_(True)
    prompts = ["a handwritten digit seven", "a handwritten digit 3"] * 4
    out = r(x, prompts)
    logp = torch.log_softmax(r.classifier(x.detach()), -1)
    assert torch.allclose(out, logp[torch.arange(8), torch.tensor([7, 3] * 4)], atol=1e-6)
    assert (out <= 0).all()
    out.sum().backward()
    assert x.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in r.classifier.parameters())
    with pytest.raises(ValueError, match=r"prompts\[1\]"):
        r(x[:2].detach(), ["digit seven", "a cat"])


def test_digit_alignment_with_the_real_world_module():
    digits = pytest.importorskip("gfnalign.backbones.digits")
    if not hasattr(digits, "DigitClassifier"):
        pytest.skip("backbones.digits has no DigitClassifier yet")
    clf = digits.DigitClassifier()
    r = build_reward({"name": "digit-alignment", "classifier": clf})
    out = r(_images(8), [digits.DIGIT_PROMPTS[k % 10] for k in range(8)])
    assert out.shape == (8,) and out.dtype == torch.float32 and (out <= 0).all()


# -- composite ------------------------------------------------------------------------------------------


def test_composite_weighted_sum_and_components(fake_digits_world):
    spec = {
        "name": "composite",
        "components": [
            {"reward": "ink", "weight": 2.0},
            {"reward": {"name": "ink", "target": 0.3}, "weight": -1.0, "label": "ink_target"},
            {"reward": "digit-alignment", "weight": 0.5},
        ],
    }
    r = build_reward(spec)
    assert r.differentiable and r.labels == ["ink", "ink_target", "digit-alignment"]
    x = _images(8).requires_grad_(True)
    out = r(x, _prompts())
    c = r.last_components
    assert set(c) == {"ink", "ink_target", "digit-alignment"}
    assert torch.allclose(out, 2 * c["ink"] - c["ink_target"] + 0.5 * c["digit-alignment"], atol=1e-6)
    out.sum().backward()
    assert x.grad.abs().sum() > 0

    mixed = build_reward({"name": "composite", "components": {"ink": 1.0, "jpeg-compressibility": 0.1}})
    assert not mixed.differentiable
    out = mixed(x, _prompts())
    assert not out.requires_grad
    assert torch.allclose(out, mixed.last_components["ink"] + 0.1 * mixed.last_components["jpeg-compressibility"])


def test_composite_propagates_component_output_errors():
    bad = CallableReward(lambda x, p: torch.full((x.shape[0],), float("nan")), name="bad")
    r = build_reward({"name": "composite", "components": [{"reward": "ink"}, {"reward": bad, "weight": 1.0}]})
    with pytest.raises(RewardOutputError, match="'bad'"):
        r(_images(2), ["a", "b"])
    with pytest.raises(ValueError, match="non-empty list"):
        build_reward({"name": "composite", "components": []})
    with pytest.raises(ValueError, match="unknown keys"):
        build_reward({"name": "composite", "components": [{"reward": "ink", "wieght": 1}]})


def test_every_cheap_builtin_scores_a_batch_of_8(fake_digits_world):
    x = _images(8)
    for name in ["jpeg-compressibility", "jpeg-incompressibility", "ink", "digit-alignment"]:
        out = build_reward(name)(x, _prompts())
        assert out.shape == (8,) and out.dtype == torch.float32 and torch.isfinite(out).all(), name


# -- devices --------------------------------------------------------------------------------------------


def test_device_handling():
    class Net(Reward):
        name = "net"
        differentiable = True

        def __init__(self, device=None):
            super().__init__(device)
            self.lin = torch.nn.Linear(3, 1).double()  # deliberately float64: the reward runs in float32
            self.freeze()

        def score(self, images, prompts):
            assert images.device == self.lin.weight.device and self.lin.weight.dtype == torch.float32
            return self.lin(images.mean((2, 3))).squeeze(-1)

    r = Net()
    assert r.device is None  # follows the inputs
    out = r(_images(2), ["a", "b"])
    assert out.dtype == torch.float32 and r.lin.weight.dtype == torch.float32
    r = Net(device="cpu")
    assert r.device == torch.device("cpu") and r.to("cpu") is r
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            Net(device="cuda")


def test_register_custom_reward_factory():
    from gfnalign.rewards import register_reward
    from gfnalign.rewards.registry import _REGISTRY

    class Brightness(Reward):
        name = "test-brightness"
        differentiable = True

        def __init__(self, *, gain: float = 1.0, device=None):
            super().__init__(device)
            self.gain = gain

        def score(self, images, prompts):
            return self.gain * images.mean((1, 2, 3))

    register_reward("test-brightness", Brightness, differentiable=True)
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_reward("test-brightness", Brightness, differentiable=True)
        r = build_reward({"name": "test-brightness", "gain": 2.0})
        x = _images(2)
        assert torch.allclose(r(x, ["a", "b"]), 2 * x.mean((1, 2, 3)))
        assert "test-brightness" in {i.name for i in list_rewards()}
    finally:
        _REGISTRY.pop("test-brightness", None)


def test_importing_rewards_stays_light():
    import subprocess

    code = (
        "import sys, gfnalign.rewards as r; r.list_rewards(); r.load_prompts('animals');"
        "heavy = [m for m in ('transformers', 'diffusers', 'PIL', 'ImageReward', 'hpsv2') if m in sys.modules];"
        "assert not heavy, heavy"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr

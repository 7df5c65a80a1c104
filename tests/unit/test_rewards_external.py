"""ImageReward / HPSv2 wrappers against stand-in packages with the same interface (the real ones are never
installed or downloaded here): checks the glue — preprocessing, tokenisation, standardisation, gradients."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch import nn

from gfnalign.rewards import build_reward
from gfnalign.rewards.external import hps_preprocess


def _images(n=8, size=16):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))


class _Tok:
    """Stand-in tokenizer: one id per character, padded/truncated to max_length."""

    def __call__(self, prompts, padding="max_length", truncation=True, max_length=8, return_tensors="pt"):
        ids = torch.zeros(len(prompts), max_length, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            codes = [ord(c) % 50 + 1 for c in p][:max_length]
            ids[i, : len(codes)] = torch.tensor(codes, dtype=torch.long)
            mask[i, : len(codes)] = 1
        return {"input_ids": ids, "attention_mask": mask}


class _FakeBlip(nn.Module):
    def __init__(self):
        super().__init__()
        self.tokenizer = _Tok()
        self.patch = nn.Conv2d(3, 8, 56, stride=56)  # 224 -> 4x4 patches
        self.emb = nn.Embedding(64, 8)

    def visual_encoder(self, pixels):
        assert pixels.shape[1:] == (3, 224, 224)
        return self.patch(pixels).flatten(2).transpose(1, 2)  # [N, 16, 8]

    def text_encoder(self, ids, attention_mask, encoder_hidden_states, encoder_attention_mask, return_dict):
        h = self.emb(ids) + encoder_hidden_states.mean(1, keepdim=True)
        return types.SimpleNamespace(last_hidden_state=h)


class _FakeImageReward(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blip = _FakeBlip()
        self.mlp = nn.Linear(8, 1)
        self.mean, self.std = 0.16717362830052426, 1.0333394966054072


@pytest.fixture
def fake_imagereward(monkeypatch):
    mod = types.ModuleType("ImageReward")
    mod.load = lambda name="ImageReward-v1.0", device="cpu", download_root=None: _FakeImageReward()
    monkeypatch.setitem(sys.modules, "ImageReward", mod)
    return mod


def test_imagereward_glue(fake_imagereward):
    r = build_reward({"name": "imagereward", "max_length": 8})
    x = _images().requires_grad_(True)
    prompts = ["a cat"] * 8
    out = r(x, prompts)
    assert out.shape == (8,) and out.dtype == torch.float32
    out.sum().backward()
    assert x.grad.abs().sum() > 0
    m = r.model
    with torch.no_grad():
        from gfnalign.rewards.clip import clip_preprocess

        emb = m.blip.visual_encoder(clip_preprocess(x.detach(), 224))
        tok = m.blip.tokenizer(prompts, max_length=8)
        h = m.blip.text_encoder(tok["input_ids"], tok["attention_mask"], emb, None, True).last_hidden_state[:, 0]
        expected = (m.mlp(h).squeeze(-1) - m.mean) / m.std
    assert torch.allclose(out.detach(), expected, atol=1e-5)


class _FakeOpenClip(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.img = nn.Linear(3 * 224 * 224, 16)
        self.txt = nn.Embedding(64, 16)

    def encode_image(self, pixels, normalize=False):
        f = self.img(pixels.flatten(1))
        return nn.functional.normalize(f, dim=-1) if normalize else f

    def encode_text(self, tokens, normalize=False):
        f = self.txt(tokens).mean(1)
        return nn.functional.normalize(f, dim=-1) if normalize else f


@pytest.fixture
def fake_hpsv2(monkeypatch, tmp_path):
    root = types.ModuleType("hpsv2")
    src = types.ModuleType("hpsv2.src")
    oc = types.ModuleType("hpsv2.src.open_clip")
    oc.create_model_and_transforms = lambda *a, **k: (_FakeOpenClip(), None, None)
    oc.get_tokenizer = lambda name: (lambda prompts: _Tok()(prompts, max_length=8)["input_ids"])
    for name, mod in [("hpsv2", root), ("hpsv2.src", src), ("hpsv2.src.open_clip", oc)]:
        monkeypatch.setitem(sys.modules, name, mod)
    ckpt = tmp_path / "hps.pt"
    torch.save({"state_dict": _FakeOpenClip().state_dict()}, ckpt)
    return ckpt


def test_hpsv2_glue(fake_hpsv2):
    r = build_reward({"name": "hpsv2", "checkpoint": str(fake_hpsv2)})
    x = _images().requires_grad_(True)
    out = r(x, ["a dog"] * 8)
    assert out.shape == (8,) and out.dtype == torch.float32 and (out.abs() <= 1 + 1e-5).all()
    out.sum().backward()
    assert x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="version"):
        build_reward({"name": "hpsv2", "version": "v3", "checkpoint": str(fake_hpsv2)})
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        build_reward({"name": "hpsv2", "checkpoint": "nope.pt"})


def test_hps_preprocess_pads_to_square():
    x = torch.ones(1, 3, 10, 20)
    y = hps_preprocess(x, 224)
    assert y.shape == (1, 3, 224, 224)
    # rows outside the resized 112-pixel band are zero-padded (zero pixels, then normalised)
    from gfnalign.rewards.clip import CLIP_MEAN, CLIP_STD

    pad_value = torch.tensor([-m / s for m, s in zip(CLIP_MEAN, CLIP_STD)])
    assert torch.allclose(y[0, :, 0, 0], pad_value, atol=1e-5)
    assert torch.allclose(y[0, :, 112, 112], (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD), atol=1e-4)

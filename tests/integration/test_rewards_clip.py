"""CLIP rewards on tiny random-initialised CLIP models (same architecture family, no downloads)."""

from __future__ import annotations

import json

import pytest
import torch

from gfnalign.rewards import build_reward
from gfnalign.rewards.clip import (
    CLIP_MEAN,
    CLIP_STD,
    AestheticHead,
    clip_preprocess,
    load_aesthetic_head,
)

transformers = pytest.importorskip("transformers")


def _tiny_tokenizer():
    """A character-level CLIP BPE tokenizer built in memory (no files, no merges)."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz0123456789.,":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    return transformers.CLIPTokenizer(vocab=vocab, merges=[], model_max_length=32)


def _tiny_clip(projection_dim=768, image_size=32, seed=0):
    tok = _tiny_tokenizer()
    config = transformers.CLIPConfig(
        text_config=dict(
            vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
            max_position_embeddings=32, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
            image_size=image_size, patch_size=8,
        ),
        projection_dim=projection_dim,
    )
    torch.manual_seed(seed)
    return transformers.CLIPModel(config).eval(), tok


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A tiny CLIPModel + tokenizer + preprocessor_config.json saved like a hub folder."""
    model, tok = _tiny_clip()
    d = tmp_path_factory.mktemp("tiny_clip")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    (d / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "crop_size": 32})
    )
    return d


def _images(n=8, size=16, seed=1):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_clip_preprocess_shapes_and_identity_at_native_size():
    x = _images(2, 32)
    y = clip_preprocess(x, 32)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    assert torch.allclose(y * std + mean, x, atol=1e-6)  # no resize at the native size
    wide = torch.rand(1, 3, 20, 40)
    assert clip_preprocess(wide, 32).shape == (1, 3, 32, 32)  # shortest side -> 32, centre crop
    big = torch.rand(1, 3, 300, 224)
    assert clip_preprocess(big, 224).shape == (1, 3, 224, 224)


def _check_scores(out, n=8):
    assert out.shape == (n,) and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_aesthetic_from_folder_matches_manual_forward_and_has_gradients(tiny_clip_dir):
    head = AestheticHead()
    torch.nn.init.normal_(head.layers[0].weight, std=0.05)
    r = build_reward({"name": "aesthetic", "clip_model": str(tiny_clip_dir), "head": head})
    assert r.differentiable and r.image_size == 32
    x = _images().requires_grad_(True)
    out = r(x, [""] * 8)
    _check_scores(out)
    # manual: preprocess, vision tower, projection, L2 norm, five linear layers
    with torch.no_grad():
        full, _ = _tiny_clip()
        pix = clip_preprocess(x.detach(), 32)
        emb = full.visual_projection(full.vision_model(pixel_values=pix).pooler_output)
        emb = emb / emb.norm(dim=-1, keepdim=True)
        h = emb
        for i in (0, 2, 4, 6, 7):
            h = h @ head.layers[i].weight.T + head.layers[i].bias
    assert torch.allclose(out.detach(), h.squeeze(-1), atol=1e-5)
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in r.clip.parameters())


def test_aesthetic_head_real_file(shared_data, tmp_path):
    path = shared_data / "laion_aesthetic_head_vit_l14_linearMSE.pth"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    head = load_aesthetic_head(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert sorted(state) == sorted(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))
    emb = torch.nn.functional.normalize(torch.randn(4, 768, generator=torch.Generator().manual_seed(0)), dim=-1)
    h = emb
    for i in (0, 2, 4, 6, 7):
        h = h @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    head.eval()
    assert torch.allclose(head(emb), h, atol=1e-5)
    # the full reward with the real head on a tiny CLIP whose projection has the ViT-L/14 width (768)
    model, _ = _tiny_clip(projection_dim=768)
    r = build_reward({"name": "aesthetic", "clip_model": model, "head_path": str(path)})
    _check_scores(r(_images(), [""] * 8))


def test_aesthetic_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("GFNALIGN_AESTHETIC_HEAD", raising=False)
    with pytest.raises(ValueError, match="head_path is required"):
        build_reward("aesthetic")
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        build_reward({"name": "aesthetic", "head_path": str(missing)})
    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(1, 768)}, bad)
    with pytest.raises(ValueError, match="do not match the LAION head"):
        load_aesthetic_head(bad)
    model, _ = _tiny_clip(projection_dim=64)
    with pytest.raises(ValueError, match="768"):
        build_reward({"name": "aesthetic", "clip_model": model, "head": AestheticHead()})
    with pytest.raises(FileNotFoundError, match="no such local path"):
        build_reward({"name": "aesthetic", "clip_model": str(tmp_path / "a" / "b"), "head": AestheticHead()})


@pytest.mark.parametrize("name", ["pickscore", "clip-score"])
def test_similarity_rewards_from_folder(tiny_clip_dir, name):
    opts = {"model": str(tiny_clip_dir)}
    if name == "pickscore":
        opts["processor"] = str(tiny_clip_dir)
    r = build_reward({"name": name, **opts})
    assert r.differentiable and r.inputs == "image+prompt"
    x = _images().requires_grad_(True)
    prompts = ["a cat", "a dog"] * 4
    out = r(x, prompts)
    _check_scores(out)
    out.sum().backward()
    assert x.grad.abs().sum() > 0
    # the value is scale * cos(image, text), computed by hand
    model = r.model
    with torch.no_grad():
        tok = r.tokenizer(prompts, padding=True, return_tensors="pt")
        t = model.text_projection(model.text_model(**tok).pooler_output)
        i = model.visual_projection(model.vision_model(pixel_values=clip_preprocess(x.detach(), 32)).pooler_output)
        cos = torch.nn.functional.cosine_similarity(i, t, dim=-1)
        scale = model.logit_scale.exp() if name == "pickscore" else 100.0
    assert torch.allclose(out.detach(), scale * cos, atol=1e-4)
    # the text-embedding cache gives the same answer for repeated prompts
    assert torch.allclose(r(x.detach(), prompts), out.detach(), atol=1e-6)


def test_clip_score_with_model_objects_and_missing_hub_model():
    model, tok = _tiny_clip(projection_dim=16)
    r = build_reward({"name": "clip-score", "model": model, "tokenizer": tok, "scale": 1.0})
    out = r(_images(), ["a cat"] * 8)
    _check_scores(out)
    assert out.abs().max() <= 1.0 + 1e-5
    with pytest.raises(OSError, match="no-such-org/no-such-clip"):
        build_reward({"name": "clip-score", "model": "no-such-org/no-such-clip"})


def test_clip_preprocess_matches_transformers_processor():
    """Our torch preprocessing vs transformers' CLIP processor (PIL bicubic on uint8) on a real photo."""
    np = pytest.importorskip("numpy")
    datasets = pytest.importorskip("sklearn.datasets")
    processor_cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    photo = datasets.load_sample_images().images[0]  # 427 x 640 x 3 uint8
    for arr in (photo, np.ascontiguousarray(photo.transpose(1, 0, 2))):  # landscape and portrait
        ref = torch.as_tensor(np.asarray(processor_cls()(images=[arr], return_tensors="np")["pixel_values"]))
        ours = clip_preprocess(torch.from_numpy(arr.copy()).permute(2, 0, 1)[None].float() / 255, 224)
        diff = (ref - ours).abs()
        # normalised units (1/255 of a pixel ≈ 0.015 here): uint8 rounding and resampler details only
        assert ref.shape == ours.shape == (1, 3, 224, 224)
        assert diff.mean() < 0.01 and diff.max() < 0.1

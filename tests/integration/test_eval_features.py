"""Feature extractors: CLIP from a local folder (tiny random CLIP), the digits classifier, pixels, errors."""

import pytest
import torch

from gfnalign.evaluation.features import DigitFeatures, PixelFeatures, build_features
from gfnalign.evaluation.metrics import clip_score


def test_clip_features_from_local_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTokenizer, CLIPVisionConfig

    text = CLIPTextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                          pad_token_id=1)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=8)).save_pretrained(tmp_path)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab[ch + "</w>"] = len(vocab)
        vocab[ch] = len(vocab)
    vocab["ab"] = len(vocab)
    CLIPTokenizer(vocab=vocab, merges=[("a", "b")], model_max_length=16).save_pretrained(tmp_path)
    assert transformers is not None

    fx = build_features(f"clip:{tmp_path}")
    images = torch.rand(3, 3, 20, 20)
    f = fx(images)
    assert f.shape == (3, 8) and fx.metric == "cosine"
    assert torch.allclose(f.norm(dim=1), torch.ones(3), atol=1e-5)
    t = fx.text_features(["a cat", "a dog"])
    assert t.shape == (2, 8)
    s = clip_score(f[:2], t)
    assert s.shape == (2,) and bool(((s >= 0) & (s <= 100)).all())


def test_pixel_and_digit_features():
    f = PixelFeatures(4)(torch.rand(5, 3, 16, 16))
    assert f.shape == (5, 16)
    with pytest.raises(ValueError, match="images must be"):
        PixelFeatures()(torch.rand(5, 16, 16))
    with pytest.raises(ValueError, match="pixels:S"):
        build_features("pixels:x")
    try:
        fx = DigitFeatures()
    except FileNotFoundError:
        pytest.skip("shipped digit classifier not built in this checkout")
    g = fx(torch.rand(4, 3, 16, 16))
    assert g.shape[0] == 4 and g.dim() == 2 and fx.metric == "l2"

"""The tiny digits world: prompts, the shipped digit classifier and loaders for the shipped weights.

The world is a real diffusers ``StableDiffusionPipeline`` with tiny configs (16×16 RGB images, 4×8×8
latents, a frozen random-init tiny CLIP text encoder with an offline-built BPE tokenizer), pretrained by
:mod:`gfnalign.backbones.digits_pretrain` on scikit-learn's bundled handwritten digits. Its weights ship in
``gfnalign/assets/digits/pipeline`` (plain diffusers can load that folder) and a small CNN classifier trained
on the same data ships in ``gfnalign/assets/digits/classifier`` (``model.safetensors`` + ``config.json``).

Images everywhere are ``[N, 3, H, W]`` float in ``[0, 1]``; digits are bright ink on a dark background
(the sklearn convention), replicated over the three channels.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ASSET_DIR = Path(__file__).resolve().parents[1] / "assets" / "digits"
PIPELINE_DIR = ASSET_DIR / "pipeline"
CLASSIFIER_DIR = ASSET_DIR / "classifier"
IMAGE_SIZE = 16

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
#: Phrasings used in pretraining; the first one is canonical (``DIGIT_PROMPTS``).
DIGIT_TEMPLATES = (
    "a handwritten digit {name}",
    "a handwritten digit {k}",
    "the number {name} written by hand",
    "a picture of the digit {name}",
)
#: The canonical prompt of each digit, index = digit.
DIGIT_PROMPTS = tuple(DIGIT_TEMPLATES[0].format(name=n, k=k) for k, n in enumerate(DIGIT_NAMES))
#: Every word the offline tokenizer knows as a single token.
DIGIT_VOCABULARY = tuple(
    sorted({w for tpl in DIGIT_TEMPLATES for w in tpl.replace("{name}", "").replace("{k}", "").split()} | set(DIGIT_NAMES))
)


def digit_prompt(k: int, template: int = 0) -> str:
    """The prompt for digit ``k`` (0-9) in phrasing ``template`` (index into ``DIGIT_TEMPLATES``)."""
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= 9:
        raise ValueError(f"digit k={k!r} must be an int in 0..9")
    if not 0 <= template < len(DIGIT_TEMPLATES):
        raise ValueError(f"template={template} must be in 0..{len(DIGIT_TEMPLATES) - 1} (see DIGIT_TEMPLATES)")
    return DIGIT_TEMPLATES[template].format(name=DIGIT_NAMES[k], k=k)


def all_digit_prompts() -> list[tuple[str, int]]:
    """Every (prompt, digit) pair of every phrasing, as used in pretraining."""
    return [(digit_prompt(k, j), k) for j in range(len(DIGIT_TEMPLATES)) for k in range(10)]


_WORD_TO_DIGIT = {**{n: k for k, n in enumerate(DIGIT_NAMES)}, **{str(k): k for k in range(10)}}


def prompt_to_digit(prompt: str) -> int:
    """The digit a prompt asks for: the single digit word ("seven") or numeral ("7") it contains.

    Raises ``ValueError`` when the prompt names no digit or several different ones.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    found = {_WORD_TO_DIGIT[w] for w in re.findall(r"[a-z]+|\d", prompt.lower()) if w in _WORD_TO_DIGIT}
    if len(found) != 1:
        what = "no digit" if not found else f"several digits {sorted(found)}"
        raise ValueError(
            f"prompt {prompt!r} names {what}; digits-world prompts name exactly one digit, "
            f"e.g. {DIGIT_PROMPTS[7]!r}"
        )
    return found.pop()


# -- data -------------------------------------------------------------------------------------------


def load_digits_images(image_size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled 8×8 digits, upsampled bilinearly: ``([1797, 3, S, S] in [0, 1], labels [1797])``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - sklearn is in requirements
        raise ImportError("the digits data needs scikit-learn: pip install 'gfnalign[digits]'") from e
    ds = load_digits()
    x = torch.tensor(ds.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return x.clamp(0, 1).expand(-1, 3, -1, -1).contiguous(), torch.tensor(ds.target, dtype=torch.int64)


# -- the classifier ---------------------------------------------------------------------------------


class DigitClassifier(nn.Module):
    """A small CNN on 16×16 grey digits. Differentiable; inputs ``[N, 3, H, W]`` (or ``[N, 1, H, W]``) in [0, 1].

    Other sizes are resized bilinearly to ``image_size`` first; colour is averaged to grey.
    ``features`` is the penultimate layer (``[N, hidden]``), used for diversity / prior-drift metrics.
    """

    def __init__(self, image_size: int = IMAGE_SIZE, channels: tuple[int, int] = (32, 64), hidden: int = 128):
        super().__init__()
        if image_size % 4:
            raise ValueError(f"image_size={image_size} must be a multiple of 4 (two 2× poolings)")
        self.config = {"image_size": int(image_size), "channels": [int(c) for c in channels], "hidden": int(hidden)}
        c1, c2 = channels
        self.body = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c1, c1, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(c2 * (image_size // 4) ** 2, hidden),
            nn.ReLU(),
        )
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(hidden, 10)

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] not in (1, 3):
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be a float tensor [N, 3, H, W] (or [N, 1, H, W]) in [0, 1], got {shape}")
        if not images.is_floating_point():
            raise ValueError(f"images must be float in [0, 1], got dtype {images.dtype}; divide uint8 images by 255")
        p = next(self.parameters())
        x = images.to(device=p.device, dtype=p.dtype).mean(dim=1, keepdim=True)
        s = self.config["image_size"]
        if x.shape[-2:] != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=x.shape[-1] > s)
        return x

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate activations ``[N, hidden]``."""
        return self.body(self._prepare(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, 10]``."""
        return self.head(self.dropout(self.features(images)))

    def log_probs(self, images: torch.Tensor) -> torch.Tensor:
        """Log class probabilities ``[N, 10]``."""
        return torch.log_softmax(self.forward(images), dim=-1)

    # -- persistence ------------------------------------------------------------------------------
    def save(self, directory: str | Path, extra: dict[str, Any] | None = None) -> None:
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps({**self.config, **(extra or {})}, indent=2) + "\n")


def load_digit_classifier(
    path: str | Path | None = None, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> DigitClassifier:
    """Load the shipped classifier (or one saved with :meth:`DigitClassifier.save` at ``path``), in eval mode."""
    from safetensors.torch import load_file

    d = Path(path) if path is not None else CLASSIFIER_DIR
    weights, cfg_file = d / "model.safetensors", d / "config.json"
    for f in (weights, cfg_file):
        if not f.is_file():
            raise FileNotFoundError(
                f"digit classifier file not found: {f}; run `python scripts/pretrain_digits.py` to create the "
                "shipped digits assets, or pass path= to a folder holding model.safetensors and config.json"
            )
    cfg = json.loads(cfg_file.read_text())
    model = DigitClassifier(image_size=cfg["image_size"], channels=tuple(cfg["channels"]), hidden=cfg["hidden"])
    model.load_state_dict(load_file(str(weights)))
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_digits_backbone(path: str | Path | None = None, **kwargs: Any):
    """The shipped digits pipeline as a :class:`~gfnalign.backbones.sd.StableDiffusionBackbone`.

    Defaults for the digits world: 20 inference steps, guidance 1.0 (where the pretrained model leaves
    headroom for alignment; guidance 3 makes it accurate), LoRA rank 4 on the attention projections, float32.
    Every keyword of :meth:`StableDiffusionBackbone.from_pretrained` can be overridden.
    """
    from gfnalign.backbones.sd import StableDiffusionBackbone

    d = Path(path) if path is not None else PIPELINE_DIR
    if not (d / "model_index.json").is_file():
        raise FileNotFoundError(
            f"digits pipeline not found at {d} (no model_index.json); run `python scripts/pretrain_digits.py` "
            "or pass path= to a folder written by StableDiffusionPipeline.save_pretrained"
        )
    opts: dict[str, Any] = {"num_inference_steps": 20, "guidance_scale": 1.0, "lora_rank": 4}
    opts.update(kwargs)
    return StableDiffusionBackbone.from_pretrained(d, **opts)

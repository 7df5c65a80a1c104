"""JPEG (in)compressibility (DDPO / DAG): the size of the image encoded as JPEG, in kB (1 kB = 1000 bytes).

The image is quantised to uint8 (``round(255 x)``) and encoded by PIL at ``quality`` (95 as in the papers).
``jpeg-incompressibility`` = size in kB, ``jpeg-compressibility`` = −size in kB. Black-box: no gradient.
"""

from __future__ import annotations

import io

import torch

from gfnalign.rewards.base import Reward


def to_uint8_hwc(images: torch.Tensor) -> torch.Tensor:
    """[N,3,H,W] float in [0,1] -> [N,H,W,3] uint8 on the CPU (round to nearest)."""
    return (images.detach() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().contiguous()


def jpeg_sizes_bytes(images: torch.Tensor, quality: int = 95) -> list[int]:
    """Encoded JPEG size in bytes of each image of ``[N,3,H,W]`` in [0,1]."""
    from PIL import Image

    sizes = []
    for arr in to_uint8_hwc(images).numpy():
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell())
    return sizes


class JpegSize(Reward):
    """± JPEG size in kB; ``sign=+1`` incompressibility, ``sign=-1`` compressibility."""

    differentiable = False
    inputs = "image"

    def __init__(self, *, quality: int = 95, sign: int = 1, name: str | None = None, device=None):
        super().__init__(device="cpu")
        if not isinstance(quality, int) or not 1 <= quality <= 100:
            raise ValueError(f"jpeg reward: quality must be an int in 1..100 (papers use 95), got {quality!r}")
        if sign not in (1, -1):
            raise ValueError(f"jpeg reward: sign must be +1 or -1, got {sign!r}")
        self.quality = quality
        self.sign = sign
        self.name = name or ("jpeg-incompressibility" if sign > 0 else "jpeg-compressibility")

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        kb = torch.tensor(jpeg_sizes_bytes(images, self.quality), dtype=torch.float32) / 1000.0
        return self.sign * kb


def jpeg_compressibility(*, quality: int = 95, device=None) -> JpegSize:
    return JpegSize(quality=quality, sign=-1, device=device)


def jpeg_incompressibility(*, quality: int = 95, device=None) -> JpegSize:
    return JpegSize(quality=quality, sign=1, device=device)

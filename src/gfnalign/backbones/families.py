"""Which backbone class serves a diffusers pipeline folder: selected by ``backbone.kind`` or detected.

``backbone.kind: sd`` means "a diffusers UNet text-to-image pipeline": the family is read from the folder's
``model_index.json`` (``_class_name``), so an SDXL folder gets the SDXL backbone; a hub id (no local file
to read) is treated as SD 1.x/2.x. ``backbone.kind: sdxl`` / ``sd3`` / ``flux`` ask for that family explicitly
(needed for hub ids) and reject a local folder that declares another pipeline class. Reading the JSON imports nothing heavy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: backbone kind -> (module, class)
FAMILIES: dict[str, tuple[str, str]] = {
    "sd": ("gfnalign.backbones.sd", "StableDiffusionBackbone"),
    "sdxl": ("gfnalign.backbones.sdxl", "StableDiffusionXLBackbone"),
    "sd3": ("gfnalign.backbones.sd3", "SD3Backbone"),
    "flux": ("gfnalign.backbones.flux", "FluxBackbone"),
}
#: diffusers pipeline class name (model_index.json's ``_class_name``) -> backbone kind
PIPELINE_CLASSES: dict[str, str] = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
}


def detect_family(path: str | Path | None) -> str | None:
    """The backbone kind a local pipeline folder declares, or ``None`` (hub id, no or unknown model_index.json)."""
    if path is None:
        return None
    index = Path(path).expanduser() / "model_index.json"
    if not index.is_file():
        return None
    try:
        name = str(json.loads(index.read_text()).get("_class_name", ""))
    except (OSError, ValueError):
        return None
    return PIPELINE_CLASSES.get(name)


def resolve_family(kind: str, path: str | Path | None) -> str:
    """The family (a key of :data:`FAMILIES`) that serves ``backbone.kind`` and ``backbone.path``; raises
    ``ValueError`` naming the fix when an explicit kind contradicts the folder."""
    if kind not in FAMILIES:
        raise ValueError(f"backbone.kind={kind!r} names no pipeline family; use one of {sorted(FAMILIES)}")
    detected = detect_family(path)
    family = kind
    if kind == "sd" and detected is not None:
        family = detected
    elif detected is not None and detected != kind:
        raise ValueError(
            f"backbone.kind={kind!r} but {Path(str(path)) / 'model_index.json'} declares a {detected!r} pipeline; "
            f"set backbone.kind: {detected} (or sd to detect it)"
        )
    return family


def backbone_class(kind: str, path: str | Path | None) -> Any:
    """The backbone class for ``backbone.kind`` (``sd`` / ``sdxl`` / ``sd3`` / ``flux``) and ``backbone.path``."""
    import importlib

    module, name = FAMILIES[resolve_family(kind, path)]
    return getattr(importlib.import_module(module), name)

"""The saved LoRA's bytes do not depend on the order safetensors happened to write its metadata keys in."""

import json
import struct

import torch


def _with_metadata_order(path, keys):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    meta = header.pop("__metadata__")
    text = json.dumps({"__metadata__": {k: meta[k] for k in keys}, **header}, separators=(",", ":")).encode()
    path.write_bytes(raw[:8] + text + b" " * (n - len(text)) + raw[8 + n :])


def test_metadata_order_is_canonical(tmp_path):
    from safetensors.torch import load_file, save_file

    from gfnalign.backbones.latent_base import _sort_safetensors_metadata

    tensors = {"b.weight": torch.arange(6.0).reshape(2, 3), "a.weight": torch.ones(4)}
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    for p in (a, b):
        save_file(tensors, str(p), metadata={"format": "pt", "lora_adapter_metadata": "{}"})
    _with_metadata_order(a, ["format", "lora_adapter_metadata"])
    _with_metadata_order(b, ["lora_adapter_metadata", "format"])
    assert a.read_bytes() != b.read_bytes()
    for p in (a, b):
        _sort_safetensors_metadata(p)
    assert a.read_bytes() == b.read_bytes()
    loaded = load_file(str(a))
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())

"""esper-lite helpers: state_dicts to kasmina's safetensors and back, models from task presets.

    import torch
    from kasmina_client import Client
    from kasmina_client import esper

    with Client() as c:
        esper.create_from_preset(c, "run1", "cifar_baseline", slots=["r0c1", "r1c1"])
        c.load_weights("run1", esper.state_dict_to_safetensors(model.state_dict()))

An esper ``MorphogeneticModel.state_dict()`` holds tensors and, for each registered slot,
``seed_slots.<id>._extra_state`` (a dict). In kasmina's safetensors blob the tensors are the
tensors and each ``_extra_state`` is a JSON string under the same key in ``__metadata__``
(docs/weights.md). Tensors may be torch tensors or numpy arrays; torch is never imported here.
"""

from __future__ import annotations

import json
import struct
from typing import Any, Dict, Iterable, Mapping, Optional

import numpy as np

__all__ = [
    "PRESETS",
    "create_from_preset",
    "preset_host",
    "state_dict_to_safetensors",
    "safetensors_to_state_dict",
    "check_not_torch_save",
    "TorchSaveFileError",
]

# esper's task presets: src/esper/runtime/tasks.py at esper-lite 2016337e (each _<name>_spec's
# _make_model: CNNHost(...) / TransformerHost(...)); tests/rpc/test_python_esper.py checks these
# numbers against that file. Every preset's host takes num_classes=10 (CNN) and esper's
# defaults for what the preset leaves out; TaskSpec.create_model defaults permissive_gates=True.
PRESETS: Dict[str, Dict[str, Any]] = {
    "cifar_baseline": {"cnn": {"num_classes": 10, "base_channels": 8}},
    "cifar_scale": {"cnn": {"num_classes": 10, "base_channels": 8, "n_blocks": 5,
                            "pool_layers": 5}},
    "cifar_impaired": {"cnn": {"num_classes": 10, "base_channels": 1, "n_blocks": 3,
                               "kernel_size": 1}},
    "cifar_minimal": {"cnn": {"num_classes": 10, "base_channels": 2, "n_blocks": 3,
                              "kernel_size": 1, "pool_layers": 0}},
    "cifar_multichannel": {"cnn": {"num_classes": 10, "base_channels": 8, "n_blocks": 3}},
    "cifar_deep_multichannel": {"cnn": {"num_classes": 10, "base_channels": 8, "n_blocks": 5,
                                        "pool_layers": 5}},
    "cifar_deep_impaired": {"cnn": {"num_classes": 10, "base_channels": 2, "n_blocks": 5,
                                    "kernel_size": 1, "pool_layers": 5}},
    "tinystories": {"transformer": {"vocab_size": 50257, "n_embd": 384, "n_head": 6,
                                    "n_layer": 6, "block_size": 256, "dropout": 0.1}},
}


def preset_host(preset: str) -> Dict[str, Dict[str, Any]]:
    """{"cnn": {...}} or {"transformer": {...}}: the preset's host spec (a copy)."""
    key = preset.lower()
    if key not in PRESETS:
        raise ValueError(f"preset {preset!r} is not one of {', '.join(sorted(PRESETS))}")
    out = {k: dict(v) for k, v in PRESETS[key].items()}
    if "cnn" in out:  # esper's CNNHost defaults, sent explicitly (0 would mean "default")
        c = out["cnn"]
        c.setdefault("n_blocks", 3)
        c.setdefault("kernel_size", 3)
        c.setdefault("in_channels", 3)
        c.setdefault("pool_layers", c["n_blocks"])
    return out


def create_from_preset(client, model_id: str, preset: str, slots: Iterable[str],
                       permissive_gates: bool = True, **kwargs):
    """Creates model_id with esper's preset host (TaskSpec.create_model(slots=...)).
    slots is required, as in esper; permissive_gates defaults to True, as in esper. Other
    keyword arguments go to Client.create_model (device, dtype, init_seed, ...)."""
    slots = list(slots or ())
    if not slots:
        raise ValueError("slots is required and cannot be empty (as in esper's create_model)")
    return client.create_model(model_id, slots=slots, permissive_gates=permissive_gates,
                               **preset_host(preset), **kwargs)


# ---------------------------------------------------------------------------------------------
# safetensors

class TorchSaveFileError(ValueError):
    """The bytes are a torch.save file (zip or pickle), not safetensors."""


_TORCH_HINT = ("this looks like a PyTorch torch.save file (zip/pickle), not safetensors; convert "
               "it with kasmina_client.esper.state_dict_to_safetensors(torch.load(path))")


def check_not_torch_save(blob: bytes) -> None:
    """Raises TorchSaveFileError when blob is a torch.save file: it starts as a zip archive
    (PK\\x03\\x04, torch >= 1.6) or a pickle (protocol byte 0x80, the legacy format) and its
    first 8 bytes read as a header length over safetensors' 100,000,000-byte limit (the
    daemon's test, too)."""
    head = bytes(blob[:8])
    if len(head) < 8:
        return
    (n,) = struct.unpack("<Q", head)
    if n > 100_000_000 and (head[:4] == b"PK\x03\x04" or head[0] == 0x80):
        raise TorchSaveFileError(_TORCH_HINT)


_ST_DTYPE = {
    np.dtype("float32"): "F32", np.dtype("float16"): "F16", np.dtype("float64"): "F64",
    np.dtype("int64"): "I64", np.dtype("int32"): "I32", np.dtype("int16"): "I16",
    np.dtype("int8"): "I8", np.dtype("uint8"): "U8", np.dtype("bool"): "BOOL",
}
_NP_OF_ST = {v: k for k, v in _ST_DTYPE.items()}


def _to_numpy(name: str, t: Any) -> np.ndarray:
    if hasattr(t, "detach"):  # a torch tensor, without importing torch
        t = t.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            raise TypeError(f"{name}: bfloat16 tensors are not supported here; .float() them")
        t = t.numpy()
    a = np.array(t, copy=False, order="C")  # keeps 0-d tensors 0-d (num_batches_tracked)
    if a.dtype.newbyteorder("<") not in _ST_DTYPE and a.dtype not in _ST_DTYPE:
        raise TypeError(f"{name}: dtype {a.dtype} has no safetensors name here")
    return a


def state_dict_to_safetensors(sd: Mapping[str, Any],
                              metadata: Optional[Mapping[str, str]] = None) -> bytes:
    """An esper state_dict (torch tensors or numpy arrays; each seed_slots.<id>._extra_state a
    dict, or already a JSON string) to a safetensors blob for Client.load_weights: tensors in
    the dict's order, each _extra_state as JSON in __metadata__. metadata adds string pairs."""
    meta: Dict[str, str] = {str(k): str(v) for k, v in (metadata or {}).items()}
    header: Dict[str, Any] = {}
    chunks = []
    off = 0
    for name, v in sd.items():
        if name.endswith("._extra_state"):
            meta[name] = v if isinstance(v, str) else json.dumps(v, allow_nan=False)
            continue
        a = _to_numpy(name, v)
        data = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": _ST_DTYPE[np.dtype(a.dtype.name)], "shape": list(a.shape),
                        "data_offsets": [off, off + len(data)]}
        chunks.append(data)
        off += len(data)
    if meta:
        header = {"__metadata__": meta, **header}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)  # the data section starts 8-aligned
    return struct.pack("<Q", len(h)) + h + b"".join(chunks)


def safetensors_to_state_dict(blob: bytes, torch_tensors: bool = False) -> Dict[str, Any]:
    """A safetensors blob (Client.export_weights) back to a state_dict: numpy arrays (torch
    tensors with torch_tensors=True), each __metadata__ seed_slots.<id>._extra_state parsed
    back to its dict. Raises TorchSaveFileError for a torch.save file, ValueError when the
    blob is not safetensors."""
    blob = bytes(blob)
    check_not_torch_save(blob)
    if len(blob) < 8:
        raise ValueError(f"not safetensors: {len(blob)} bytes, too short for the header length")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > len(blob) - 8:
        raise ValueError(f"not safetensors: header length {n} exceeds the {len(blob) - 8} bytes "
                         "that follow it")
    header = json.loads(blob[8:8 + n])
    data = memoryview(blob)[8 + n:]
    out: Dict[str, Any] = {}
    meta = header.pop("__metadata__", None) or {}
    for name, e in header.items():
        b, end = e["data_offsets"]
        a = np.frombuffer(data[b:end], dtype=_NP_OF_ST[e["dtype"]]).reshape(e["shape"]).copy()
        if torch_tensors:
            import torch

            a = torch.from_numpy(a)
        out[name] = a
    for k, v in meta.items():
        if k.endswith("._extra_state"):
            out[k] = json.loads(v)
    return out

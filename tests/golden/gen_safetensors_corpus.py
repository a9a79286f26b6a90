#!/usr/bin/python3
"""Generates the safetensors test corpus in tests/unit/data/safetensors/.

    /usr/bin/python3 tests/golden/gen_safetensors_corpus.py

Two kinds of file:

- python_written.safetensors: a valid file written here, independently of the C writer, the way
  the reference Python writer lays it out (tensors sorted by dtype alignment, then name; the JSON
  header padded with spaces to a multiple of 8). Values come from torch / numpy, so the C reader is
  checked against an independent encoder (tests/unit/test_safetensors.c knows the values).
- bad_*.safetensors: one malformed file per rule the reader enforces. The expected error code of
  each is listed in the table in tests/unit/test_safetensors.c, which also fails when a bad_* file
  here is missing from its table.

The output is deterministic; re-running it must leave git clean.
"""
import json
import os
import struct
import sys

import numpy as np
import torch

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "unit", "data", "safetensors")

ALIGN = {"I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2}


def pack(header: bytes, data: bytes = b"", hlen=None) -> bytes:
    """8-byte little-endian length (header's own unless hlen is given), header, data."""
    return struct.pack("<Q", len(header) if hlen is None else hlen) + header + data


def write(name: str, blob: bytes) -> None:
    with open(os.path.join(OUT, name), "wb") as f:
        f.write(blob)


def tensor_bytes(t: torch.Tensor) -> bytes:
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().astype("<i2").tobytes()
    arr = t.contiguous().numpy()
    return arr.astype(arr.dtype.newbyteorder("<")).tobytes()


DTYPE_NAME = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
}


def python_writer(tensors: dict, metadata: dict) -> bytes:
    """An independent safetensors encoder (same layout rules as the reference)."""
    order = sorted(tensors, key=lambda k: (-ALIGN[DTYPE_NAME[tensors[k].dtype]], k))
    header = {"__metadata__": metadata}
    blobs, off = [], 0
    for k in order:
        t = tensors[k]
        b = tensor_bytes(t)
        header[k] = {"dtype": DTYPE_NAME[t.dtype], "shape": list(t.shape),
                     "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - (8 + len(h)) % 8) % 8)
    return pack(h, b"".join(blobs))


def gen_python_written() -> None:
    tensors = {
        "w.f32": torch.arange(6, dtype=torch.float32).reshape(2, 3) * 0.5 - 1.0,
        "w.f16": torch.from_numpy(np.array([1.0, -2.5, 0.25, 65504.0], dtype=np.float16)),
        "w.bf16": torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=torch.bfloat16),
        "idx.i64": torch.tensor([-1, 0, (1 << 40) + 5], dtype=torch.int64),
        "idx.i32": torch.tensor([-7, 0, 123456, 2147483647], dtype=torch.int32).reshape(2, 1, 2),
        "scalar": torch.tensor(3.25, dtype=torch.float32),
        "empty": torch.zeros(0, 3, dtype=torch.float32),
    }
    meta = {"format": "pt", "note": "written by gen_safetensors_corpus.py"}
    write("python_written.safetensors", python_writer(tensors, meta))


def t(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def j(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def gen_bad() -> None:
    d8 = bytes(range(8))
    ok = j({"a": t()})
    bad = {
        # framing
        "bad_empty_file": b"",
        "bad_short_prefix": b"\x10\x00\x00",
        "bad_header_len_beyond_file": pack(ok, d8, hlen=1000),
        "bad_header_len_huge": pack(ok, d8, hlen=0xFFFFFFFFFFFFFFFF),
        "bad_header_too_large": pack(ok + b" " * 64, d8, hlen=100_000_001),
        "bad_header_len_zero": pack(b"", ok + d8),
        "bad_header_leading_space": pack(b" " + ok, d8),
        # JSON
        "bad_json_syntax": pack(b'{"a":{"dtype":"F32",'),
        "bad_json_trailing_garbage": pack(ok + b" x", d8),
        "bad_json_nul_padding": pack(ok + b"\0\0\0", d8),
        "bad_json_invalid_utf8": pack(j({"a": t()}).replace(b'"a"', b'"a\xff"'), d8),
        "bad_json_nul_in_name": pack(b'{"a\\u0000b":' + j(t()) + b"}", d8),
        "bad_header_not_object": pack(b"[" + ok + b"]", d8),
        "bad_duplicate_names": pack(b'{"a":' + j(t()) + b',"a":' + j(t(offsets=(8, 16))) + b"}",
                                    d8 + d8),
        # metadata
        "bad_metadata_not_object": pack(j({"__metadata__": "x", "a": t()}), d8),
        "bad_metadata_non_string": pack(j({"__metadata__": {"k": 1}, "a": t()}), d8),
        "bad_metadata_nested": pack(j({"__metadata__": {"k": {"x": "y"}}, "a": t()}), d8),
        "bad_metadata_duplicate_keys": pack(b'{"__metadata__":{"k":"1","k":"2"},"a":'
                                            + j(t()) + b"}", d8),
        # entries
        "bad_empty_name": pack(j({"": t()}), d8),
        "bad_entry_not_object": pack(j({"a": [1, 2]}), d8),
        "bad_unknown_field": pack(j({"a": dict(t(), foo=1)}), d8),
        "bad_missing_dtype": pack(j({"a": {"shape": [2], "data_offsets": [0, 8]}}), d8),
        "bad_missing_shape": pack(j({"a": {"dtype": "F32", "data_offsets": [0, 8]}}), d8),
        "bad_missing_offsets": pack(j({"a": {"dtype": "F32", "shape": [2]}}), d8),
        # dtype
        "bad_dtype_not_string": pack(j({"a": dict(t(), dtype=0)}), d8),
        "bad_dtype_unknown": pack(j({"a": t("X99")}), d8),
        "bad_dtype_f64": pack(j({"a": t("F64", (1,))}), d8),
        "bad_dtype_lowercase": pack(j({"a": t("f32")}), d8),
        # shape
        "bad_shape_not_array": pack(j({"a": dict(t(), shape=2)}), d8),
        "bad_shape_negative_dim": pack(j({"a": t(shape=(-1, 2))}), d8),
        "bad_shape_real_dim": pack(j({"a": t(shape=(2.0,))}), d8),
        "bad_shape_string_dim": pack(j({"a": t(shape=("2",))}), d8),
        "bad_shape_bool_dim": pack(j({"a": t(shape=(True, 2))}), d8),
        "bad_shape_too_many_dims": pack(j({"a": t(shape=(1, 1, 1, 1, 1, 2, 1))}), d8),
        "bad_shape_dim_beyond_int64": pack(j({"a": t(shape=(1 << 64,))}), d8),
        "bad_shape_numel_overflow": pack(j({"a": t(shape=(1 << 32, 1 << 32))}), d8),
        "bad_shape_bytes_overflow": pack(j({"a": t(shape=(1 << 62,))}), d8),
        "bad_shape_size_mismatch": pack(j({"conv.weight": t(shape=(3, 4), offsets=(0, 40))}),
                                        bytes(40)),
        # offsets
        "bad_offsets_not_array": pack(j({"a": dict(t(), data_offsets=8)}), d8),
        "bad_offsets_one_element": pack(j({"a": t(offsets=(8,))}), d8),
        "bad_offsets_three_elements": pack(j({"a": t(offsets=(0, 8, 8))}), d8),
        "bad_offsets_negative": pack(j({"a": t(offsets=(-4, 4))}), d8),
        "bad_offsets_real": pack(j({"a": t(offsets=(0.0, 8.0))}), d8),
        "bad_offsets_reversed": pack(j({"a": t(offsets=(8, 0))}), d8),
        "bad_offsets_out_of_range": pack(j({"a": t(shape=(100,), offsets=(0, 400))}), d8),
        "bad_offsets_beyond_int64": pack(j({"a": t(offsets=(0, (1 << 64) - 1))}), d8),
        "bad_offsets_overlap": pack(j({"a": t(), "b": t(offsets=(4, 12))}), bytes(12)),
        "bad_offsets_duplicate": pack(j({"a": t(), "b": t()}), d8),
        "bad_offsets_empty_inside": pack(j({"a": t(), "e": t(shape=(0,), offsets=(4, 4))}), d8),
        "bad_offsets_gap": pack(j({"a": t(), "b": t(offsets=(12, 20))}), bytes(20)),
        "bad_offsets_gap_at_start": pack(j({"a": t(offsets=(4, 12))}), bytes(12)),
        "bad_trailing_bytes": pack(ok, d8 + d8),
        "bad_data_without_tensors": pack(b"{}", d8),
    }
    for name, blob in bad.items():
        write(name + ".safetensors", blob)


def main() -> int:
    os.makedirs(OUT, exist_ok=True)
    for f in os.listdir(OUT):
        if f.endswith(".safetensors"):
            os.remove(os.path.join(OUT, f))
    gen_python_written()
    gen_bad()
    return 0


if __name__ == "__main__":
    sys.exit(main())

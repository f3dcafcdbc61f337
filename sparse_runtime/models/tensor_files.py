"""Reading safetensors checkpoints: one ``model.safetensors`` or shards listed by an index.

Tensors are read one at a time with plain file reads into freshly allocated memory (no mmap), so a loader
holds only the tensors it has placed plus the one it is reading, and resident memory does not also count the
file's pages. Every fault (truncated or garbled file, missing shard, bad index, a header entry that does not
add up) is one line naming the file and the tensor.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path

import torch

from ..errors import CheckpointError

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
MAX_HEADER = 100 << 20  # safetensors' own limit
MMAP_MIN = 1 << 16  # tensors from this size on are read into their own mapping (see _fresh)

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def _fresh(nbytes: int) -> torch.Tensor:
    """``nbytes`` of new memory. A large tensor that a loader keeps gets its own anonymous mapping: in the
    malloc heap, kept tensors interleaved with the loader's freed temporaries strand the pages between them
    (SmolLM2-135M loaded 1.5x its tensor bytes that way, 1.07x with mappings; benchmarks/memory.py)."""
    if nbytes < MMAP_MIN:
        return torch.empty(nbytes, dtype=torch.uint8)
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=torch.uint8)


class TensorFile:
    """One safetensors file: its header checked against the file's size, its tensors read on demand."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
                raw = f.read(n) if n is not None and 0 < n <= min(MAX_HEADER, size - 8) else None
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read ({e.strerror or e})") from None
        if raw is None or len(raw) != n:
            raise CheckpointError(f"{self.path}: not a safetensors file (truncated or corrupt header)")
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(f"{self.path}: not a safetensors file (garbled header)") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: not a safetensors file (header is not a JSON object)")
        meta = header.pop("__metadata__", None) or {}
        self.metadata = meta if isinstance(meta, dict) else {}
        self._start = 8 + n
        self._entries = {k: self._entry(k, v, size - self._start) for k, v in header.items()}

    def _entry(self, name: str, e, data_bytes: int) -> tuple[torch.dtype, tuple[int, ...], int, int]:
        where = f"{self.path}: tensor {name}"
        if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= e.keys():
            raise CheckpointError(f"{where}: header entry lacks dtype/shape/data_offsets")
        dtype = DTYPES.get(e["dtype"])
        if dtype is None:
            raise CheckpointError(f"{where}: unsupported safetensors dtype {e['dtype']!r}")
        shape, offsets = e["shape"], e["data_offsets"]
        if (not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape)
                or not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) for o in offsets) or not 0 <= offsets[0] <= offsets[1]):
            raise CheckpointError(f"{where}: bad shape {shape!r} or data_offsets {offsets!r} in the header")
        numel = 1
        for s in shape:
            numel *= s
        begin, end = offsets
        if end - begin != numel * dtype.itemsize:
            raise CheckpointError(f"{where}: header gives {end - begin} bytes for {e['dtype']} {shape}")
        if end > data_bytes:
            raise CheckpointError(f"{where}: data ends at byte {end} but the file holds {data_bytes} "
                                  "(truncated)")
        return dtype, tuple(shape), begin, end

    def keys(self) -> list[str]:
        return list(self._entries)

    def dtype(self, name: str) -> torch.dtype:
        return self._entries[name][0]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def read(self, name: str) -> torch.Tensor:
        """The tensor ``name``, in fresh CPU memory (its own anonymous mapping when large)."""
        dtype, shape, begin, end = self._entries[name]
        buf = _fresh(end - begin)
        try:
            with open(self.path, "rb") as f:
                f.seek(self._start + begin)
                got = f.readinto(memoryview(buf.numpy())) if end > begin else 0
        except OSError as e:
            raise CheckpointError(f"{self.path}: tensor {name}: cannot read ({e.strerror or e})") from None
        if got != end - begin:
            raise CheckpointError(f"{self.path}: tensor {name}: file ended early (truncated)")
        return buf.view(dtype).reshape(shape)


class TensorFiles:
    """Tensor name -> its file, over one file or the shards an index lists."""

    def __init__(self, folder):
        folder = Path(folder)
        index = folder / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                    raise TypeError("weight_map is not an object of file names")
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
            bad = sorted({v for v in weight_map.values() if os.path.basename(v) != v})
            if bad:
                raise CheckpointError(f"{index}: shard names must be files in the folder, got {bad[:3]}")
            absent = sorted({v for v in weight_map.values() if not (folder / v).is_file()})
            if absent:
                raise CheckpointError(f"{index}: shards it lists are missing: {absent}")
            shards = {v: TensorFile(folder / v) for v in sorted(set(weight_map.values()))}
            self.files = {}
            for k, v in weight_map.items():
                if k not in shards[v]._entries:
                    raise CheckpointError(f"{folder / v}: tensor {k}, listed for it in {INDEX}, is not in the file")
                self.files[k] = shards[v]
        elif (folder / WEIGHTS).is_file():
            single = TensorFile(folder / WEIGHTS)
            self.files = {k: single for k in single.keys()}
        else:
            raise CheckpointError(f"{folder}: {WEIGHTS} is missing (and no {INDEX})")

    def keys(self) -> list[str]:
        return list(self.files)

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def where(self, name: str) -> str:
        return f"{self.files[name].path}: tensor {name}"

    def dtype(self, name: str) -> torch.dtype:
        return self.files[name].dtype(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.files[name].shape(name)

    def read(self, name: str) -> torch.Tensor:
        return self.files[name].read(name)


class TensorDict:
    """Tensors already in memory (one tensor-parallel rank's slices) behind the :class:`TensorFiles` interface,
    so they are checked and placed exactly as a file's would be."""

    def __init__(self, tensors: dict[str, torch.Tensor], where: dict[str, str]):
        self.tensors, self._where = tensors, where

    def keys(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def where(self, name: str) -> str:
        return self._where[name]

    def dtype(self, name: str) -> torch.dtype:
        return self.tensors[name].dtype

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def read(self, name: str) -> torch.Tensor:
        return self.tensors[name]

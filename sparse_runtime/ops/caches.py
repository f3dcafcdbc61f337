"""What the kernel wrappers and the dispatcher share: M buckets and the decode limit, a capped LRU, and measured results cached in
JSON files under one folder (``$SPARSE_RUNTIME_CACHE``, default ``~/.cache/sparse_runtime``; converted GGUF
models live there too), one section per GPU and library versions."""
from __future__ import annotations

import json
import os
import tempfile
from collections import OrderedDict
from pathlib import Path

CACHE_ENV = "SPARSE_RUNTIME_CACHE"
# M up to here is decode: Triton's split-K decode schedule (16-row tiles), the mma.sp kernel (two n-tiles of 8
# tokens; csrc/mmasp.cu checks it) and the dispatcher's decode buckets
DECODE_MAX_M = 16


def m_bucket(m: int) -> int:
    """The power of two >= m (at least 1): the granularity of algorithm searches and dispatch decisions."""
    return 1 << (int(m) - 1).bit_length() if m > 1 else 1  # no max(): eager launches call this per forward


def device_key(device_name: str, versions: dict) -> str:
    """Which cache section applies: results from another GPU or library version are not reused."""
    return device_name + "|" + ",".join(f"{k}={v}" for k, v in sorted(versions.items()))


class LRU:
    """A capped mapping; the least recently used entry goes first."""

    def __init__(self, cap: int):
        self.cap = max(1, cap)
        self._d: OrderedDict = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key):
        v = self._d.get(key)
        if v is None:
            self.misses += 1
            return None
        self.hits += 1
        self._d.move_to_end(key)
        return v

    def put(self, key, value) -> None:
        self._d[key] = value
        self._d.move_to_end(key)
        while len(self._d) > self.cap:
            self._d.popitem(last=False)

    def clear(self) -> None:
        self._d.clear()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._d)

    def __contains__(self, key) -> bool:
        return key in self._d


CACHE_FORMAT = 1


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "sparse_runtime")


def load_cache_file(path: Path) -> dict:
    """``{device_key: {entry_key: value}}`` from ``path``; empty when missing, unreadable or another format."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or not isinstance(data.get("devices"), dict):
        return {}
    return data["devices"]


def save_cache_file(path: Path, section: str, entries: dict) -> None:
    """Merge ``entries`` into ``section`` of the file and write it atomically (concurrent writers lose
    nothing worse than each other's newest entries)."""
    path = Path(path)
    devices = load_cache_file(path)
    devices.setdefault(section, {}).update(entries)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump({"format": CACHE_FORMAT, "devices": devices}, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


class DiskCache:
    """An in-memory dict of one device section, backed by a JSON file (written on every new entry)."""

    def __init__(self, filename: str):
        self.filename = filename
        self._section: str | None = None
        self._mem: dict = {}

    @property
    def path(self) -> Path:
        return cache_dir() / self.filename

    def bind(self, section: str) -> None:
        if section != self._section:
            self._section = section
            disk = {} if _no_disk() else load_cache_file(self.path).get(section, {})
            self._mem = dict(disk)

    def get(self, key: str):
        return self._mem.get(key)

    def put(self, key: str, value) -> None:
        self._mem[key] = value
        if not _no_disk():
            try:
                save_cache_file(self.path, self._section, {key: value})
            except OSError:
                pass  # a read-only home must not break inference; the memory cache still holds it

    def clear(self) -> None:
        self._mem.clear()


def _no_disk() -> bool:
    return os.environ.get("SPARSE_RUNTIME_NO_DISK_CACHE", "") not in ("", "0")

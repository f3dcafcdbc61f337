"""What a sparse checkpoint's ``config.json`` says to transformers, so that plain transformers never loads it wrong.

Its linears are stored compressed; read as a plain Llama (say), the model would get random linears with only a
warning. So ``config.json`` names a model type transformers does not know (``sparse_runtime``), keeps the real one
beside it (``sparse_runtime_model_type``), and maps ``AutoConfig`` to a module shipped in the folder. In a process
that never imported sparse_runtime, ``from_pretrained`` refuses (transformers asks for ``trust_remote_code``);
with ``trust_remote_code=True`` the shipped module imports sparse_runtime, whose quantizer
(``hf_quantizer``) loads the model exactly as :func:`sparse_runtime.load_pretrained` does.
``import sparse_runtime`` registers the model type, so there ``AutoConfig`` reads the real config directly.
"""
from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoConfig, PreTrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

MODEL_TYPE = "sparse_runtime"
BASE_MODEL_TYPE = "sparse_runtime_model_type"
AUTO_MODULE = "sparse_runtime_checkpoint"
AUTO_MODULE_TEXT = '''"""This folder is a sparse_runtime checkpoint: its linears are stored compressed, which plain transformers
cannot read. Load it with ``sparse_runtime.load_pretrained(path)``, or with
``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``, which runs this module: it imports
sparse_runtime (pip install sparse_runtime), and sparse_runtime.load_pretrained builds the model."""
from sparse_runtime.models.hf_config import SparseRuntimeConfig  # noqa: F401
'''


class SparseRuntimeConfig(PreTrainedConfig):
    """Reads a marked ``config.json`` as the config of the model it really is (``LlamaConfig``, ...)."""

    model_type = MODEL_TYPE

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        base = unmarked(config_dict)
        return CONFIG_MAPPING[base["model_type"]].from_dict(base, **kwargs)


def unmarked(config_dict: dict) -> dict:
    """A marked config dict as transformers wrote it (an unmarked one unchanged)."""
    if config_dict.get("model_type") != MODEL_TYPE:
        return config_dict
    base = {k: v for k, v in config_dict.items() if k not in ("auto_map", BASE_MODEL_TYPE)}
    base["model_type"] = config_dict.get(BASE_MODEL_TYPE)
    if base["model_type"] not in CONFIG_MAPPING:
        raise ValueError(f"a {MODEL_TYPE} config names the model type {base['model_type']!r}, which this "
                         "transformers does not know")
    return base


def mark(folder: Path, quantization_config: dict) -> None:
    """Mark the ``config.json`` transformers wrote into ``folder`` and ship the module its ``auto_map`` names."""
    f = Path(folder) / "config.json"
    data = json.loads(f.read_text())
    data.update({"quantization_config": quantization_config, BASE_MODEL_TYPE: data["model_type"],
                 "model_type": MODEL_TYPE, "auto_map": {"AutoConfig": f"{AUTO_MODULE}.SparseRuntimeConfig"}})
    f.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    (Path(folder) / f"{AUTO_MODULE}.py").write_text(AUTO_MODULE_TEXT)


def register() -> None:
    """Idempotent: ``AutoConfig`` reads marked configs as their real model's."""
    AutoConfig.register(MODEL_TYPE, SparseRuntimeConfig, exist_ok=True)

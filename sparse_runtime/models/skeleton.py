"""Loading without a dense copy: the model's skeleton with its parameters on the meta device, and stored
tensors placed into it one at a time, at their final device and dtype.

``no_init_weights`` alone skips random initialisation but still allocates every parameter; here a parameter
costs nothing until its tensor arrives, so a load peaks at the loaded model plus the tensor in flight. Buffers
are built for real (they are small, and the non-persistent ones, such as rotary frequencies, are computed at
construction and never stored).
"""
from __future__ import annotations

import contextlib

import torch
import transformers
from torch import nn

try:
    from transformers.initialization import no_init_weights
except ImportError:  # older transformers
    from transformers.modeling_utils import no_init_weights

from ..errors import CheckpointError
from ..format.codec import FLOAT_DTYPES


def model_class(config):
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return transformers.AutoModelForCausalLM


@contextlib.contextmanager
def _parameters_on_meta():
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def build_skeleton(config, dtype) -> nn.Module:
    """The model its config describes, in ``dtype``, every parameter on the meta device."""
    cls = model_class(config)
    with no_init_weights(), _parameters_on_meta():
        if cls.__name__.startswith("Auto"):
            return cls.from_config(config, dtype=dtype)
        model = cls(config)
    return model.to(dtype)


def replace_placeholder(model: nn.Module, key: str, t: torch.Tensor, device, dtype: torch.dtype | None) -> None:
    """Put stored tensor ``t`` where state-dict key ``key`` lives: on ``device``, floating tensors in ``dtype``
    (default: the skeleton's), replacing the meta placeholder without copying it. Quantization codes (fp8 is
    floating to torch) keep their dtype."""
    owner, _, attr = key.rpartition(".")
    mod = model.get_submodule(owner)
    old = getattr(mod, attr)
    if t.dtype in FLOAT_DTYPES and old.dtype in FLOAT_DTYPES:
        t = t.to(device=device, dtype=dtype or old.dtype)
    else:
        t = t.to(device=device)
    if attr in mod._parameters:
        mod._parameters[attr] = nn.Parameter(t, requires_grad=old.requires_grad)
    else:
        mod._buffers[attr] = t


def refuse_placeholders(model: nn.Module, where) -> None:
    """Refuse a model that still holds a meta placeholder: a tensor its checkpoint never supplied."""
    empty = [k for k, t in model.state_dict(keep_vars=True).items() if t is not None and t.is_meta]
    if empty:
        raise CheckpointError(f"{where}: tensors missing from the checkpoint: {empty[:5]}"
                              f"{'...' if len(empty) > 5 else ''}")


def shared_keys(model: nn.Module) -> set[str]:
    """State-dict keys whose tensor is the very object of an earlier key (weights tied in the skeleton)."""
    seen, dups = set(), set()
    for name, t in model.state_dict(keep_vars=True).items():
        if t is not None and id(t) in seen:
            dups.add(name)
        elif t is not None:
            seen.add(id(t))
    return dups


def check_tensor(where: str, shape, dtype: torch.dtype, want: torch.Tensor, exact: bool) -> None:
    """A stored tensor's header against the model's tensor: same shape; same dtype, or both floating for plain
    tensors (a sparse layer's values must be the dtype its config entry names)."""
    if tuple(shape) != tuple(want.shape):
        raise CheckpointError(f"{where}: shape {list(shape)}, the model needs {list(want.shape)}")
    if dtype != want.dtype and (exact or not (dtype.is_floating_point and want.is_floating_point())):
        raise CheckpointError(f"{where}: dtype {str(dtype).removeprefix('torch.')}, the model needs "
                              f"{str(want.dtype).removeprefix('torch.')}")


def check_finite(where: str, t: torch.Tensor, chunk: int = 1 << 16) -> torch.Tensor:
    """``t``, after checking it holds no NaN/Inf. In chunks: the check's mask stays a small heap block that the
    next chunk reuses (a mask the tensor's size, freed among kept tensors, strands heap pages). Quantization
    codes are the codec's to check (``SparseWeight.validate``)."""
    if t.dtype in FLOAT_DTYPES:
        flat = t.reshape(-1)
        for i in range(0, flat.numel(), chunk):
            if not torch.isfinite(flat[i:i + chunk]).all():
                raise CheckpointError(f"{where}: NaN/Inf values")
    return t

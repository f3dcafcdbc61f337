"""The ``cusparselt`` backend: our cuSPARSELt extension with cached plans and searched algorithms.

The fastest 2:4 path for large M (prefill). See :mod:`sparse_runtime.ops.cusparselt`."""
import torch

from ..ops import cusparselt
from ..format.rotation import apply_rotation
from . import Backend, register

DTYPES = (torch.float16, torch.bfloat16)


def unsupported_24(layer, dtypes=DTYPES) -> str | None:
    """Why a 2:4 tensor-core backend cannot take ``layer`` (shared with the ``torch`` backend)."""
    if layer.pattern != "2:4":
        return f"pattern {layer.pattern} is not 2:4"
    if layer.weight_values.dtype not in dtypes:
        return f"dtype {layer.weight_values.dtype} is not fp16/bf16"
    return None


def flatten(layer, x: torch.Tensor) -> torch.Tensor:
    """``x [..., K]`` -> ``[M, K]`` with the layer's rotation applied."""
    if layer.rotation is not None:
        x = apply_rotation(x, layer.rotation)
    return x.reshape(-1, x.shape[-1])


class CusparseLtBackend(Backend):
    name = "cusparselt"
    priority = 20
    auto_devices = ("cuda",)

    def unavailable(self, device):
        return cusparselt.unavailable(device)

    def unsupported(self, layer):
        return unsupported_24(layer)

    def prepare(self, layer):
        return cusparselt.CusparseLtWeight.from_canonical(layer.weight_values, layer.weight_meta,
                                                          layer.in_features, layer.bias)

    def forward(self, layer, state, x):
        y = cusparselt.linear_op(flatten(layer, x), state)
        return y.reshape(*x.shape[:-1], layer.out_features)


register(CusparseLtBackend())

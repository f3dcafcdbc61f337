"""The ``cusparselt`` backend: our cuSPARSELt extension with cached plans and searched algorithms.

The fastest 2:4 path for large M (prefill). See :mod:`sparse_runtime.ops.cusparselt`."""
import torch

from ..ops import cusparselt
from ..format.codec import FLOAT_DTYPES
from ..format.rotation import apply_rotation
from . import Backend, Capabilities, register


def flatten(layer, x: torch.Tensor) -> torch.Tensor:
    """``x [..., K]`` -> ``[M, K]`` with the layer's rotation applied."""
    if layer.rotation is not None:
        x = apply_rotation(x, layer.rotation)
    return x.reshape(-1, x.shape[-1])


class CusparseLtBackend(Backend):
    name = "cusparselt"
    priority = 20
    # the library's dtypes that a canonical weight can have (it also takes int8, which the format does not store)
    capabilities = Capabilities(dtypes=tuple(d for d in cusparselt.DTYPES if d in FLOAT_DTYPES), patterns=("2:4",),
                                devices=("cuda",), auto_devices=("cuda",))

    def unavailable(self, device):
        return super().unavailable(device) or cusparselt.unavailable(device)

    def prepare(self, layer):
        return cusparselt.CusparseLtWeight.from_canonical(layer.weight_values, layer.weight_meta,
                                                          layer.in_features, layer.bias)

    def forward(self, layer, state, x):
        y = cusparselt.linear_op(flatten(layer, x), state)
        return y.reshape(*x.shape[:-1], layer.out_features)


register(CusparseLtBackend())

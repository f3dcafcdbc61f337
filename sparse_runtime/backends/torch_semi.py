"""The ``torch`` backend: PyTorch's own cuSPARSELt path (``torch._cslt_compress`` /
``torch._cslt_sparse_mm``, what ``to_sparse_semi_structured`` runs), the baseline users know.

The module is not named after the backend: a ``backends/torch.py`` would replace the torch library in the
``backends`` package's namespace once imported.

It rebuilds the cuSPARSELt plan on every call; the ``cusparselt`` backend exists to avoid that. The matmul is
a ``torch.library`` custom op with a fake implementation, so ``torch.compile`` and CUDA graphs see through it.
"""
import torch
import torch.nn.functional as F

from ..ops.cusparselt import padded_shape
from ..ops.devices import cuda_unavailable
from . import Backend, register
from .cusparselt import CusparseLtBackend, flatten


@torch.library.custom_op("sparse_runtime::torch_semi_linear", mutates_args=(), device_types="cuda")
def torch_semi_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, n: int, npad: int,
                      kpad: int) -> torch.Tensor:
    """``x [M, K] @ W^T + bias`` with ``packed = torch._cslt_compress(W padded to [npad, kpad])``."""
    m, k = x.shape
    mpad = padded_shape(m, n, k, x.dtype)[0]  # cuSPARSELt needs M padded too
    if (mpad, kpad) != (m, k):
        x = F.pad(x, (0, kpad - k, 0, mpad - m))
    # x.t() is column-major, which _cslt_sparse_mm takes as a transposed operand without a copy.
    y = torch._cslt_sparse_mm(packed, x.t(), bias, transpose_result=True)
    return y[:m, :n].clone() if (mpad, npad) != (m, n) else y


@torch_semi_linear.register_fake
def _(x, packed, bias, n, npad, kpad):
    return x.new_empty(x.shape[0], n)


class TorchSemiBackend(Backend):
    name = "torch"
    priority = 10
    capabilities = CusparseLtBackend.capabilities  # the same library

    def unavailable(self, device):
        if not hasattr(torch, "_cslt_sparse_mm"):
            return f"torch {torch.__version__} has no torch._cslt_sparse_mm"
        why = super().unavailable(device) or cuda_unavailable(device, "PyTorch's cuSPARSELt path")
        cslt = getattr(torch.backends, "cusparselt", None)
        if why is None and cslt is not None and not cslt.is_available():
            return f"torch {torch.__version__} was built without cuSPARSELt"
        return why

    def prepare(self, layer):
        n, k = layer.out_features, layer.in_features
        _, npad, kpad = padded_shape(1, n, k, layer.dtype)
        w = F.pad(layer.dense_weight(), (0, kpad - k, 0, npad - n))
        bias = None if layer.bias is None else F.pad(layer.bias.detach(), (0, npad - n))
        return torch._cslt_compress(w), bias, npad, kpad

    def forward(self, layer, state, x):
        packed, bias, npad, kpad = state
        y = torch_semi_linear(flatten(layer, x), packed, bias, layer.out_features, npad, kpad)
        return y.reshape(*x.shape[:-1], layer.out_features)


register(TorchSemiBackend())

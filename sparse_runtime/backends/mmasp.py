"""The ``mmasp`` backend: the CUDA decode kernel on the sparse tensor cores (``mma.sp``), for M <= 16.

Never picked by ``auto`` on its own (it cannot run prefill): the ``dispatch`` backend times it as a candidate
for the M buckets up to 16 and runs it where it is fastest. By name it runs any layer it supports and refuses
M > 16 per call. See :mod:`sparse_runtime.ops.mmasp` and ``csrc/decode24.cu``."""
from ..ops import mmasp
from ..errors import ShapeError
from ..ops.mmasp_layout import MAX_M, unsupported_shape
from . import Backend, register
from .cusparselt import flatten, unsupported_24


class MmaspBackend(Backend):
    name = "mmasp"
    priority = 25
    auto_devices = ()  # decode only: reached through dispatch
    max_m = MAX_M

    def unavailable(self, device):
        return mmasp.unavailable(device)

    def unsupported(self, layer):
        return unsupported_24(layer) or unsupported_shape(layer.out_features, layer.in_features)

    def prepare(self, layer):
        return mmasp.MmaspWeight.from_canonical(layer.weight_values, layer.weight_meta, layer.in_features, layer.bias)

    def forward(self, layer, state, x):
        x2 = flatten(layer, x)
        if x2.shape[0] > MAX_M:
            raise ShapeError(f"backend 'mmasp' runs decode batches (M <= {MAX_M} rows), got M={x2.shape[0]}; "
                             "use 'dispatch' (backend='auto') to pick per M")
        return mmasp.linear(x2, state).reshape(*x.shape[:-1], layer.out_features)


register(MmaspBackend())

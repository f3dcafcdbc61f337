"""The ``mmasp`` backend: the CUDA decode kernel on the sparse tensor cores (``mma.sp``), for M <= 16.

Never picked by ``auto`` on its own (it cannot run prefill): the ``dispatch`` backend times it as a candidate
for the M buckets up to its ``max_m`` and runs it where it is fastest. By name it runs any layer it supports and
refuses larger M per call. See :mod:`sparse_runtime.ops.mmasp` and ``csrc/mmasp.cu``."""
from ..ops import mmasp
from ..errors import ShapeError
from ..ops.mmasp_layout import DECODE_MAX_M, unsupported_shape
from . import Backend, Capabilities, register
from .cusparselt import flatten


class MmaspBackend(Backend):
    name = "mmasp"
    priority = 25
    # decode only: never picked by auto, reached through dispatch
    capabilities = Capabilities(dtypes=mmasp.DTYPES, patterns=("2:4",), devices=("cuda",), max_m=DECODE_MAX_M)

    def unavailable(self, device):
        return super().unavailable(device) or mmasp.unavailable(device)

    def unsupported(self, layer, m=None):
        return super().unsupported(layer, m) or unsupported_shape(layer.out_features, layer.in_features)

    def prepare(self, layer):
        return mmasp.MmaspWeight.from_canonical(layer.weight_values, layer.weight_meta, layer.in_features, layer.bias)

    def forward(self, layer, state, x):
        x2 = flatten(layer, x)
        why = self.capabilities.refusal(m=x2.shape[0])
        if why:
            raise ShapeError(f"backend 'mmasp' {why}; use 'dispatch' (backend='auto') to pick per M")
        return mmasp.linear(x2, state).reshape(*x.shape[:-1], layer.out_features)


register(MmaspBackend())

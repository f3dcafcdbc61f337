"""The ``cpu`` backend: 2:4 layers on the CPU kernels of :mod:`sparse_runtime.ops.cpu24`.

What ``auto`` runs on the CPU for 2:4 fp32/bf16 layers, their values full-precision or int8/int4 codes,
wherever the extension is built: decode (up to 16 rows) streams the compressed weight once, 17/32 of the dense
fp32 bytes (int8 codes: 5/32, int4: 3/32 plus the scales), dequantizing in registers. Beyond 16 rows the kernel can keep streaming,
run a sparse GEMM on the kept values, or decompress cache-sized panels for torch's GEMM; which is faster depends on
the shape and the CPU, so the
first call of each (shape, dtype, M bucket) times both and later calls run the faster (per process). It holds
only the compressed weight, never a dense copy. Other patterns, dtypes and fp8 values, and a CPU without the
extension, fall back to ``decompressed`` (``sparse-runtime info`` says why)."""
import statistics
import time

import torch

from ..format.rotation import apply_rotation
from ..ops import cpu24
from ..ops.caches import DECODE_MAX_M, m_bucket
from . import Backend, Capabilities, register

_CHOSEN: dict = {}  # (N, K, dtype, quant, M bucket) -> the faster path beyond decode, measured once per process


def choose_path(layer, bias, x2, timer=time.perf_counter, repeats: int = 3) -> str:
    """The faster of :data:`cpu24.PATHS` for this call's shape (median of ``repeats`` timed calls each, after a
    warm-up), remembered for its M bucket."""
    key = (layer.out_features, layer.in_features, x2.dtype, layer.quant, m_bucket(x2.shape[0]))
    if key not in _CHOSEN:
        times = {}
        for path in cpu24.PATHS:
            run = lambda: cpu24.linear(x2, layer.weight_values, layer.weight_meta, bias, path=path,  # noqa: E731
                                       scales=layer.weight_scales)
            run()
            samples = []
            for _ in range(repeats):
                t0 = timer()
                run()
                samples.append(timer() - t0)
            times[path] = statistics.median(samples)
        _CHOSEN[key] = min(times, key=times.get)
    return _CHOSEN[key]


class CpuBackend(Backend):
    name = "cpu"
    priority = 10  # above decompressed (5): the CPU default wherever it runs the layer
    capabilities = Capabilities(dtypes=cpu24.DTYPES, patterns=("2:4",), devices=("cpu",), auto_devices=("cpu",),
                                quant=tuple(cpu24.QUANT_CODES))

    def unavailable(self, device):
        return super().unavailable(device) or cpu24.unavailable_reason()

    def unsupported(self, layer, m=None):
        why = super().unsupported(layer, m)
        if why is None and layer.in_features % cpu24.K_MULTIPLE:
            why = f"in_features={layer.in_features} is not a multiple of {cpu24.K_MULTIPLE}"
        return why

    def prepare(self, layer):
        # the kernel computes no gradients: its bias is a detached view (it shares the parameter's storage)
        return None if layer.bias is None else layer.bias.detach()

    def forward(self, layer, bias, x):
        if layer.rotation is not None:
            x = apply_rotation(x, layer.rotation)
        path = ""
        if x.numel() > DECODE_MAX_M * x.shape[-1] and not torch.compiler.is_compiling():
            path = choose_path(layer, bias, x.reshape(-1, x.shape[-1]))
        return cpu24.linear(x, layer.weight_values, layer.weight_meta, bias, path=path, scales=layer.weight_scales)


register(CpuBackend())

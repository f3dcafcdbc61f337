"""The ``cpu`` backend: 2:4 layers on the CPU kernels of :mod:`sparse_runtime.ops.cpu24`.

What ``auto`` runs on the CPU for 2:4 fp32/bf16 layers wherever the extension is built: decode (up to 16 rows)
streams the compressed weight once, 17/32 of the dense fp32 bytes; prefill decompresses cache-sized panels for
torch's GEMM. It holds only the compressed weight, never a dense copy. Other patterns and dtypes, and a CPU
without the extension, fall back to ``decompressed`` (``sparse-runtime info`` says why)."""
from ..format.rotation import apply_rotation
from ..ops import cpu24
from . import Backend, Capabilities, register


class CpuBackend(Backend):
    name = "cpu"
    priority = 10  # above decompressed (5): the CPU default wherever it runs the layer
    capabilities = Capabilities(dtypes=cpu24.DTYPES, patterns=("2:4",), devices=("cpu",), auto_devices=("cpu",))

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
        return cpu24.linear(x, layer.weight_values, layer.weight_meta, bias)


register(CpuBackend())

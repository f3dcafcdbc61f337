"""The ``triton`` backend: the 2:4 Triton kernels of :mod:`sparse_runtime.ops.triton_ops`.

Runs on CUDA (Ampere or newer), and on the CPU under ``TRITON_INTERPRET=1`` so
tests can name it there. A block-diagonal rotation is fused into the kernel's
prologue; a full ``[K, K]`` rotation is applied first (``x @ R``) because the
fused prologue re-reads ``R`` once per N block (see ``kernels/sparse24.py``).

Quantized layers (int8, int4, fp8 codes) run on the same kernel, which dequantizes in registers; int4 groups
must be a power of two of columns (``triton_ops.group_refusal``)."""
import importlib.util

import torch

from ..ops import triton_ops
from ..ops.devices import cuda_unavailable
from ..format.quant import SCHEMES
from ..format.rotation import apply_rotation
from . import Backend, Capabilities, register

# Set True if measurements show the fused full-R prologue winning at the shapes you run.
FUSE_FULL_ROTATION = False


class TritonBackend(Backend):
    name = "triton"
    priority = 30
    # the CPU only under TRITON_INTERPRET=1 (tests), so not in the table
    capabilities = Capabilities(dtypes=triton_ops.DTYPES, patterns=("2:4",), devices=("cuda",), auto_devices=("cuda",),
                                quant=SCHEMES)

    def unavailable(self, device):
        device = torch.device(device)
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
        if device.type == "cpu" and triton_ops.interpreting():
            return None
        return super().unavailable(device) or cuda_unavailable(device, "Triton (without TRITON_INTERPRET=1)")

    def unsupported(self, layer, m=None):
        why = super().unsupported(layer, m)
        if why is None and (layer.in_features == 0 or layer.out_features == 0):
            return f"shape {layer.out_features}x{layer.in_features} not supported (an empty weight)"
        if why is None and layer.quant is not None:
            return triton_ops.group_refusal(layer.in_features, layer.quant.groups(layer.in_features))
        return why

    def prepare(self, layer):
        return triton_ops.Sparse24Layer(layer.weight_values, layer.weight_meta, layer.weight_scales)

    def forward(self, layer, state, x):
        rot = layer.rotation
        if rot is not None and not (rot.dim() == 3 or FUSE_FULL_ROTATION):
            x, rot = apply_rotation(x, rot), None
        return state(x, layer.bias, rot)


register(TritonBackend())

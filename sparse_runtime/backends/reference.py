"""The reference backend: decompress to dense on every call, then ``F.linear``.

Runs everywhere and takes every pattern, dtype and quantization scheme (it dequantizes the values). It keeps only the compressed
weight resident, and its output is bit-for-bit that of the masked dense layer."""
import torch.nn.functional as F

from ..format.quant import SCHEMES
from ..format.rotation import apply_rotation
from . import Backend, Capabilities, register


class ReferenceBackend(Backend):
    name = "reference"
    priority = 0
    autocasts = True
    capabilities = Capabilities(auto_devices=("cpu", "cuda", "mps", "xpu"), quant=SCHEMES)

    def forward(self, layer, state, x):
        if layer.rotation is not None:
            x = apply_rotation(x, layer.rotation)
        return F.linear(x, layer.dense_weight(), layer.bias)


register(ReferenceBackend())

"""The ``decompressed`` backend: decompress once, keep the dense weight, ``F.linear``.

What ``auto`` runs on the CPU, where no sparse kernel beats a dense one: it runs at dense speed
(``reference`` decompresses on every call, about 2x slower in generation), at the cost of holding the dense
weight beside the compressed one. The weight is built at the first forward, not at ``prepare``, so
sparsifying and saving a model never materialises it. Outputs are bit-identical to ``reference``. Quantized
values are dequantized into that dense weight once."""
import torch.nn.functional as F

from ..format.quant import SCHEMES
from ..format.rotation import apply_rotation
from . import Backend, Capabilities, register


class DecompressedBackend(Backend):
    name = "decompressed"
    priority = 5  # above reference: the CPU default
    autocasts = True
    capabilities = Capabilities(auto_devices=("cpu",), quant=SCHEMES)

    def prepare(self, layer):
        return {}  # filled at the first forward; a device/dtype move or new weights rebuild it

    def forward(self, layer, state, x):
        weight = state.get("weight")
        if weight is None:
            weight = state["weight"] = layer.dense_weight()
        if layer.rotation is not None:
            x = apply_rotation(x, layer.rotation)
        return F.linear(x, weight, layer.bias)


register(DecompressedBackend())

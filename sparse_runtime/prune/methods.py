"""The pruning methods by name, as the drivers run them (:class:`~.statistics.Method`), and the dense quantizer
that runs on the same drivers as the quantized prunes' baseline."""
from __future__ import annotations

from .gptq import GPTQ
from .magnitude import MAGNITUDE
from .sparsegpt import SPARSEGPT
from .wanda import WANDA

METHODS = {m.name: m for m in (MAGNITUDE, WANDA, SPARSEGPT)}  # they prune: their scores also steer rotations
QUANTIZERS = {GPTQ.name: GPTQ}  # quantize densely (PruneConfig.quantize), prune nothing
ALL_METHODS = METHODS | QUANTIZERS  # what PruneConfig.method names
NEEDS_CALIBRATION = frozenset(name for name, m in METHODS.items() if m.statistics is not None)

"""The pruning methods by name, as the drivers run them (:class:`~.statistics.Method`)."""
from __future__ import annotations

from .magnitude import MAGNITUDE
from .sparsegpt import SPARSEGPT
from .wanda import WANDA

METHODS = {m.name: m for m in (MAGNITUDE, WANDA, SPARSEGPT)}
NEEDS_CALIBRATION = frozenset(name for name, m in METHODS.items() if m.statistics is not None)

"""What a prune returns: the keep masks (and, quantized, the scales) and a record of the run."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..format.codec import parse_pattern
from ..format.masks import PackedMasks
from ..format.quant import QuantScheme


@dataclass
class PruneResult:
    method: str
    pattern: str
    sparsity: float
    masks: PackedMasks = field(default_factory=PackedMasks)  # bitmaps: whole-model masks stay small
    skipped: list[tuple[str, str]] = field(default_factory=list)
    errors: dict[str, float] = field(default_factory=dict)  # name -> ||WX - W_hat X||_F / ||WX||_F
    nsamples: int = 0
    seqlen: int = 0
    seconds: float = 0.0
    peak_device_bytes: int | None = None
    rotation: dict | None = None  # objective, steps, blocks and per-layer objective values when rotated
    patterns: dict[str, str] = field(default_factory=dict)  # name -> pattern it was pruned to (mixed N:M differ)
    allocation: dict | None = None  # the per-block rates (:class:`~.allocation.Allocation`) when not uniform
    quant: QuantScheme | None = None  # the scheme every pruned weight is on the grid of (None: full precision)
    scales: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [out, groups], weight dtype, on the CPU

    def record(self, name: str, pruned, pattern: str) -> None:
        """Keep what a method did to linear ``name`` (a :class:`~.statistics.Pruned`), pruned to ``pattern``."""
        if pruned.keep is not None:
            self.masks[name] = pruned.keep
            self.patterns[name] = pattern
        if pruned.scales is not None:
            self.scales[name] = pruned.scales.cpu()

    def to_dict(self) -> dict:
        kept = sum(int(m.sum()) for m in self.masks.values())
        total = sum(m.numel() for m in self.masks.values())
        return {
            "method": self.method, "pattern": self.pattern,
            "sparsity": None if parse_pattern(self.pattern) else self.sparsity,
            "pruned_layers": len(self.masks), "achieved_sparsity": 1 - kept / total if total else 0.0,
            "skipped": [{"name": n, "reason": r} for n, r in self.skipped],
            "reconstruction_error": self.errors, "nsamples": self.nsamples, "seqlen": self.seqlen,
            "seconds": round(self.seconds, 2), "peak_device_bytes": self.peak_device_bytes,
            "allocation": self.allocation, "quantization": None if self.quant is None else self.quant.to_dict(),
            "rotation": None if self.rotation is None else
            {k: v for k, v in self.rotation.items() if k != "layers"} | {"layers": [
                {k: v for k, v in r.items() if k != "history"} for r in self.rotation["layers"]]},
        }

    @classmethod
    def start(cls, config, skipped, nsamples: int = 0, seqlen: int = 0) -> PruneResult:
        """An empty result for ``config`` (a :class:`~.config.PruneConfig`)."""
        return cls(config.method, config.pattern, config.sparsity, skipped=skipped, nsamples=nsamples, seqlen=seqlen,
                   allocation=None if config.allocation is None else config.allocation.to_dict(), quant=config.quant)

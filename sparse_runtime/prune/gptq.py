"""GPTQ (Frantar et al. 2023): dense weights rounded to a quantization grid column by column, each column's
rounding error spread over the later ones through the inverse Hessian. The dense baseline of a quantized prune:
SparseGPT's sweep (:func:`~.sparsegpt.sparsegpt_solve`) with nothing pruned, on the same scheme and Hessian."""
from __future__ import annotations

import torch

from .sparsegpt import sparsegpt_solve
from .statistics import Hessian, Method, Pruned


def quantize_linear(linear, stats: Hessian, pattern: str, sparsity: float, config, prior=None) -> Pruned:
    """Fake-quantize ``linear``'s weight with ``config.quant`` (pattern, sparsity and ``prior`` unused: nothing is
    pruned, and :class:`~.config.PruneConfig` refuses a prior for gptq). Weights already zero stay zero: a pruned
    model keeps its masks (``PruneConfig.quantize_after``)."""
    solved = sparsegpt_solve(linear.weight, stats.H, blocksize=config.blocksize, damp=config.damp,
                             quant=config.quant, keep=linear.weight != 0, scale_search=config.scale_search)
    linear.weight.copy_(solved.weight)
    return Pruned(None, solved.scales)


GPTQ = Method("gptq", Hessian, quantize_linear)

"""ATP's beta search: prune at each beta of the paper's grid and keep the lowest perplexity on a held-out text.

The reference code scores on the WikiText-2 test split it then reports. Here the score is a validation text
of C4 documents disjoint from the calibration windows (:func:`~.calibration.validation_windows`), so the
reported WikiText-2 number is never tuned on.

What every trial shares, computed once: the calibration windows and the tokenised validation windows (the
caller's), the first decoder block's captured inputs and every block's forward keyword arguments
(:func:`~.statistics.capture_inputs`), the block sizes, and the dense weights, held in memory and copied back
after each trial instead of reloading the model.

The statistics of a block after the first depend on the pruned blocks before it, so on beta. With
``statistics="dense"`` (the default) the trials share the DENSE model's statistics instead, gathered in one
pass: a Wanda trial is then a mask per linear plus the validation perplexity, not a layer-by-layer prune,
and the chosen beta is pruned once more layer by layer (the model is left as a plain ``prune`` at that beta
would leave it). ``statistics="sequential"`` prunes every trial layer by layer (the paper's protocol, ~6x
slower per trial on SmolLM2-135M)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..data.perplexity import perplexity
from ..models.architecture import find_decoder_layers
from . import prune
from .allocation import ATP_STEP, Allocation, allocate, atp_betas
from .config import PruneConfig
from .dense_statistics import collect_statistics, prune_from_statistics
from .methods import NEEDS_CALIBRATION
from .result import PruneResult
from .statistics import capture_inputs

REUSED = ("calibration windows", "tokenised validation windows", "first-block inputs and per-block forward kwargs",
          "dense weights (restored in memory, no reload)", "block sizes")
STATISTICS = ("dense", "sequential")


@dataclass
class BetaSearch:
    allocation: Allocation  # the best beta's
    result: PruneResult  # the best trial's; the model is left pruned with it
    trials: list[dict] = field(default_factory=list)  # beta, validation perplexity, seconds
    seconds: float = 0.0

    statistics: str = "dense"

    def to_dict(self) -> dict:
        reused = list(REUSED) + (["per-linear statistics of the dense model (one pass)"]
                                 if self.statistics == "dense" else [])
        return {"best_beta": self.allocation.params["beta"], "trials": self.trials, "seconds": round(self.seconds, 1),
                "statistics": self.statistics, "reused": reused}


@torch.no_grad()
def search_beta(model, config: PruneConfig, calib: torch.Tensor | None, val: torch.Tensor, *, step: float = ATP_STEP,
                betas=None, patience: int | None = None, log=None, statistics: str = "dense") -> BetaSearch:
    """Prune ``model`` as ``config`` says (its ``sparsity`` is the target mean, for N:M ``1 - N/M``) with ATP at
    every beta of the grid (``betas``, default ``step, 2 step, ...`` up to the legal limit) and leave it pruned
    with the beta whose perplexity on ``val`` ([n, seqlen] token ids, BOS already in place) is lowest.
    ``patience`` stops after that many trials in a row worse than the best (the curve is usually unimodal in
    beta); None runs the whole grid. ``log(str)`` gets one line per trial. ``statistics``: "dense" (trials share
    the dense model's statistics) or "sequential" (see the module doc)."""

    if statistics not in STATISTICS:
        raise ValueError(f"statistics must be one of {', '.join(STATISTICS)}, got {statistics!r}")
    t0 = time.perf_counter()
    layers, path = find_decoder_layers(model)
    device = config.torch_device()
    grid = list(betas) if betas is not None else atp_betas(config.sparsity, len(layers), step)
    store = torch.device("cpu") if config.offload else device
    inputs = None if calib is None else capture_inputs(model, layers, path, calib, device, store)
    dense = {k: v.clone() for k, v in layers.state_dict().items()}
    eval_device = next(model.parameters()).device
    shared = None
    if config.method not in NEEDS_CALIBRATION:
        statistics = "sequential"  # no statistics to share: every trial is a plain prune
    elif statistics == "dense":
        shared = collect_statistics(model, calib, config.replace(record_errors=False), inputs)
    best, trials, worse = None, [], 0
    for beta in grid:
        t = time.perf_counter()
        alloc = allocate(model, "atp", config.sparsity, pattern=config.pattern, beta=beta, targets=config.targets,
                         ignore=config.ignore)
        if shared is not None:
            res = prune_from_statistics(model, config.replace(allocation=alloc, record_errors=False), shared)
        else:
            res = prune(model, config, calib=calib, inputs=inputs, allocation=alloc)
        ppl = perplexity(model, val.reshape(-1), seqlen=val.shape[1], device=eval_device, progress=False).ppl
        trials.append({"beta": beta, "validation_ppl": round(ppl, 4), "seconds": round(time.perf_counter() - t, 1)})
        if log:
            log(f"atp beta {beta:.4f}: validation perplexity {ppl:.3f} ({trials[-1]['seconds']:.0f} s)")
        if best is None or ppl < best[0]:
            weights = None if shared else {k: v.clone() for k, v in layers.state_dict().items()}
            best, worse = (ppl, alloc, res, weights), 0
        else:
            worse += 1
        layers.load_state_dict(dense)
        if patience is not None and worse >= patience:
            break
    _, alloc, res, weights = best
    if shared is not None:  # trials ranked betas on dense statistics; the result is the real layer-by-layer prune
        del shared
        res = prune(model, config, calib=calib, inputs=inputs, allocation=alloc)
    else:
        layers.load_state_dict(weights)
    search = BetaSearch(alloc, res, trials, time.perf_counter() - t0, statistics)
    alloc.params["search"] = {"step": step, "patience": patience, "validation_windows": list(val.shape),
                              **{k: v for k, v in search.to_dict().items() if k != "best_beta"}}
    res.allocation = alloc.to_dict()
    return search

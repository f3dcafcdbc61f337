"""ATP's beta search: prune at each beta of the paper's grid and keep the lowest perplexity on a held-out text.

The reference code scores on the WikiText-2 test split it then reports. Here the score is a validation text
of C4 documents disjoint from the calibration windows (:func:`~.calibration.validation_windows`), so the
reported WikiText-2 number is never tuned on.

What every trial shares, computed once: the calibration windows and the tokenised validation windows (the
caller's), the first decoder block's captured inputs and every block's forward keyword arguments
(:func:`~.layerwise.capture_inputs`), the block sizes, and the dense weights, held in memory and copied back
after each trial instead of reloading the model. Not shared: the statistics of blocks after the first,
which depend on the pruned blocks before them and so on beta."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .allocation import ATP_STEP, Allocation, allocate, atp_betas
from .layerwise import PruneResult, capture_inputs, find_decoder_layers

REUSED = ("calibration windows", "tokenised validation windows", "first-block inputs and per-block forward kwargs",
          "dense weights (restored in memory, no reload)", "block sizes")


@dataclass
class BetaSearch:
    allocation: Allocation  # the best beta's
    result: PruneResult  # the best trial's; the model is left pruned with it
    trials: list[dict] = field(default_factory=list)  # beta, validation perplexity, seconds
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"best_beta": self.allocation.params["beta"], "trials": self.trials, "seconds": round(self.seconds, 1),
                "reused": list(REUSED)}


@torch.no_grad()
def search_beta(model, method: str, sparsity: float, calib: torch.Tensor | None, val: torch.Tensor, *,
                pattern: str = "unstructured", step: float = ATP_STEP, betas=None, patience: int | None = None,
                device=None, targets=None, ignore=("lm_head",), progress: bool = False, log=None,
                **options) -> BetaSearch:
    """Prune ``model`` with ATP at every beta of the grid (``betas``, default ``step, 2 step, ...`` up to the
    legal limit) and leave it pruned with the beta whose perplexity on ``val`` ([n, seqlen] token ids, BOS
    already in place) is lowest. ``patience`` stops after that many trials in a row worse than the best (the
    curve is usually unimodal in beta); None runs the whole grid. ``log(str)`` gets one line per trial."""
    from ..eval import perplexity
    from . import prune

    t0 = time.perf_counter()
    layers, path = find_decoder_layers(model)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    grid = list(betas) if betas is not None else atp_betas(sparsity, len(layers), step)
    store = torch.device("cpu") if options.get("offload") else device
    inputs = None if calib is None else capture_inputs(model, layers, path, calib, device, store)
    dense = {k: v.clone() for k, v in layers.state_dict().items()}
    eval_device = next(model.parameters()).device
    best, trials, worse = None, [], 0
    for beta in grid:
        t = time.perf_counter()
        alloc = allocate(model, "atp", sparsity, pattern=pattern, beta=beta, targets=targets, ignore=ignore)
        res = prune(model, method, pattern, sparsity, calib=calib, allocation=alloc, inputs=inputs, device=device,
                    targets=targets, ignore=ignore, progress=progress, **options)
        ppl = perplexity(model, val.reshape(-1), seqlen=val.shape[1], device=eval_device, progress=False).ppl
        trials.append({"beta": beta, "validation_ppl": round(ppl, 4), "seconds": round(time.perf_counter() - t, 1)})
        if log:
            log(f"atp beta {beta:.4f}: validation perplexity {ppl:.3f} ({trials[-1]['seconds']:.0f} s)")
        if best is None or ppl < best[0]:
            best, worse = (ppl, alloc, res, {k: v.clone() for k, v in layers.state_dict().items()}), 0
        else:
            worse += 1
        layers.load_state_dict(dense)
        if patience is not None and worse >= patience:
            break
    _, alloc, res, weights = best
    layers.load_state_dict(weights)
    search = BetaSearch(alloc, res, trials, time.perf_counter() - t0)
    alloc.params["search"] = {"step": step, "patience": patience, "validation_windows": list(val.shape),
                              **{k: v for k, v in search.to_dict().items() if k != "best_beta"}}
    res.allocation = alloc.to_dict()
    return search

"""Pruning from statistics gathered once: the searches' driver (and magnitude's, which needs none).

A search prunes the same model many times (ATP's betas, a plan's depth weights). With :func:`collect_statistics`
every linear's statistics come from ONE pass of the dense model (each layer's statistics and outputs from the same
forward: half the forwards of a sequential prune, for every linear the pattern can take whatever ``targets`` says,
so later trials may target others); :func:`prune_from_statistics` then prunes each chosen linear from them at its
block's rate with no forward at all. The statistics of a block after the first are the DENSE model's, not the
pruned-so-far model's a sequential prune (:mod:`.sequential`) would see."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..models.architecture import decoder_linears, find_decoder_layers
from .allocation import block_of, check_blocks
from .config import PruneConfig
from .methods import ALL_METHODS
from .quantize import check_groups
from .result import PruneResult
from .rotate import rotate_by_weights
from .statistics import capture_inputs, collect_dense, forward_session, peak_bytes


@dataclass
class DenseStatistics:
    """Every collected linear's statistics (linears that share an input share one object), and how they were
    gathered."""
    method: str
    stats: dict[str, object]
    nsamples: int
    seqlen: int
    seconds: float = 0.0
    peak_device_bytes: int | None = None


def _check_reusable(config: PruneConfig) -> None:
    if config.rotate is not None or config.record_errors:
        raise ValueError("the dense model's statistics (a search's shared statistics) cannot be combined with "
                         "rotate or record_errors")


@torch.no_grad()
def collect_statistics(model, calib: torch.Tensor, config: PruneConfig, inputs=None) -> DenseStatistics:
    """``config.method``'s statistics of every decoder linear ``config.pattern`` can take (less ``ignore``), from
    one layer-by-layer pass of the dense model on ``calib`` [N, L]; the model is not changed. ``inputs`` reuses
    first-block inputs from :func:`~.statistics.capture_inputs`."""
    method = ALL_METHODS[config.method]
    if method.statistics is None:
        raise ValueError(f"{config.method} prunes from the weights alone: it has no statistics to collect")
    _check_reusable(config)
    layers, path = find_decoder_layers(model)
    linears = decoder_linears(model, config.pattern, None, config.ignore)[0]
    device = config.torch_device()
    store = torch.device("cpu") if config.offload else device
    collected = DenseStatistics(config.method, {}, *calib.shape)
    t0 = time.perf_counter()
    with forward_session(model, device):
        inps, kwargs = inputs or capture_inputs(model, layers, path, calib, device, store)
        bar = tqdm(layers, desc=f"{config.method} statistics", unit="layer", disable=not config.progress)
        for i, layer in enumerate(bar):
            names = {n: m for n, m in linears.items() if n.startswith(f"{path}.{i}.")}
            home = next(layer.parameters()).device
            layer.to(device)
            inps = collect_dense(layer, names, method.statistics, inps, kwargs[i], device, store, collected.stats)
            layer.to(home)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    collected.seconds = time.perf_counter() - t0
    collected.peak_device_bytes = peak_bytes(device)
    return collected


@torch.no_grad()
def prune_from_statistics(model, config: PruneConfig, statistics: DenseStatistics | None = None) -> PruneResult:
    """Prune ``model`` in place: every linear ``config`` chooses, at its decoder block's rate, from
    ``statistics`` (:func:`collect_statistics`, same method, pattern and ignore), or for magnitude from the
    weights alone (``config.rotate`` then first learns and folds rotations from the weights); no forward."""
    method = ALL_METHODS[config.method]
    layers, path = find_decoder_layers(model)
    chosen, skipped = decoder_linears(model, config.pattern, config.targets, config.ignore)
    check_blocks(config.allocation, layers)
    check_groups(config.quant, chosen)
    t0 = time.perf_counter()
    if method.statistics is None:
        if statistics is not None:
            raise ValueError(f"{config.method} prunes from the weights alone: it takes no statistics")
        result = PruneResult.start(config, skipped)
        if config.rotate is not None:
            result.rotation = rotate_by_weights(model, config.pattern, config.sparsity, config.rotate, config.progress)
    else:
        if statistics is None or statistics.method != config.method:
            raise ValueError(f"{config.method} prunes from its own calibration statistics: collect them with "
                             f"collect_statistics (given: {None if statistics is None else statistics.method})")
        _check_reusable(config)
        result = PruneResult.start(config, skipped, statistics.nsamples, statistics.seqlen)
    for name, linear in chosen.items():
        pattern, sparsity = config.block(block_of(name, path))
        if sparsity == 0:
            continue
        if statistics is not None and name not in statistics.stats:
            raise ValueError(f"the dense statistics have none for {name}; collect them with the same pattern and "
                             "ignore")
        stats = None if statistics is None else statistics.stats[name]
        prior = None if config.prior is None else config.prior.get(name)
        result.record(name, method.prune_linear(linear, stats, pattern, sparsity, config, prior), pattern)
    result.seconds = time.perf_counter() - t0
    return result

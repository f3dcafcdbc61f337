"""Layer-wise sparsity allocation: one sparsity per decoder block whose parameter-weighted mean is the target S.

Strategies (facts in ``shared/docs/methods.md``):

* ``uniform``: every block at S.
* ``atp`` (Huang et al., ICML 2025): an arithmetic progression over depth,
  ``s_i = S - beta (L-1)/2 + beta (i-1)``, legal for ``0 < beta <= min(2S, 2(1-S)) / (L-1)``.
* ``owl`` (Yin et al., 2024): blocks with a larger outlier ratio ``LOD = 100 mean(A > M mean(A))``,
  ``A = |W| ||X||`` over the block's linears on the dense model, are pruned less; rates span
  ``[S - lambda, S + lambda]``.
* ``alphapruning`` (Lu et al., 2024): the Hill power-law exponent of each weight's eigenvalue spectrum,
  averaged per block, mapped to ``[1 - eps, 1 + eps]`` and scaled to mean S; heavier tails (smaller alpha)
  are pruned less.

Every strategy ends with the parameter-weighted mean exactly S (ATP and OWL by a common shift, which keeps
their spacing; AlphaPruning by its own scaling); a rate outside [0, 1) is an :class:`AllocationError`. For
N:M patterns each block gets an N of the same M (ATP's mixed N:8), rounded so the kept fraction stays as
close to ``1 - S`` as whole N allow."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..errors import SparseRuntimeError
from ..format.codec import parse_pattern
from ..models.architecture import decoder_linears, find_decoder_layers
from .statistics import InputNorms, capture_inputs, run_layer
from .wanda import scores as wanda_scores

STRATEGIES = ("uniform", "atp", "owl", "alphapruning")
ATP_STEP = 0.002  # the ATP paper's beta grid
OWL_LAMBDA, OWL_M = 0.08, 5.0
ALPHA_EPS = 0.2  # AlphaPruning's epsilon for Wanda / SparseGPT at 70%


class AllocationError(SparseRuntimeError, ValueError):
    """An illegal allocation parameter, or rates that leave [0, 1)."""


@dataclass
class Allocation:
    """Per-block sparsities for a target mean ``sparsity`` under ``pattern`` ('unstructured' or 'N:M')."""

    strategy: str
    sparsity: float
    rates: list[float]
    pattern: str = "unstructured"
    sizes: list[int] | None = None  # prunable parameters per block (the weights of the mean)
    params: dict = field(default_factory=dict)  # beta, lambda, M, eps, block scores, search trials

    def block(self, i: int) -> tuple[str, float]:
        """``(pattern, sparsity)`` decoder block ``i`` is pruned with."""
        return self.patterns[i], self.block_sparsity[i]

    @property
    def patterns(self) -> list[str]:
        nm = parse_pattern(self.pattern)
        if nm is None:
            return ["unstructured"] * len(self.rates)
        return [f"{n}:{nm[1]}" for n in self.block_n]

    @property
    def block_n(self) -> list[int]:
        """N:M only: kept entries per group of M for each block (largest-remainder rounding of (1 - s_i) M)."""
        nm = parse_pattern(self.pattern)
        if nm is None:
            raise AllocationError("block_n is defined for N:M patterns only")
        return round_keep([(1 - s) * nm[1] for s in self.rates], self.sizes or [1] * len(self.rates), nm[1])

    @property
    def block_sparsity(self) -> list[float]:
        nm = parse_pattern(self.pattern)
        return list(self.rates) if nm is None else [1 - n / nm[1] for n in self.block_n]

    def mean(self) -> float:
        """Parameter-weighted mean of what the blocks are pruned at (for N:M after rounding N)."""
        return weighted_mean(self.block_sparsity, self.sizes)

    def to_dict(self) -> dict:
        return {"strategy": self.strategy, "target_sparsity": self.sparsity, "pattern": self.pattern,
                "rates": [round(r, 6) for r in self.rates], "block_patterns": self.patterns,
                "block_sparsity": [round(r, 6) for r in self.block_sparsity], "mean_sparsity": round(self.mean(), 6),
                "block_params": self.sizes, **self.params}

    def table(self) -> str:
        """A small text table: block, pattern, sparsity."""
        rows = [f"{'block':>5}  {'pattern':>12}  {'sparsity':>8}"]
        rows += [f"{i:>5}  {p:>12}  {s:>8.4f}" for i, (p, s) in enumerate(zip(self.patterns, self.block_sparsity))]
        extra = f", beta {self.params['beta']:.4f}" if self.params.get("beta") is not None else ""
        rows.append(f"{self.strategy}{extra}: parameter-weighted mean {self.mean():.4f} (target {self.sparsity})")
        return "\n".join(rows)


def block_of(name: str, path: str) -> int | None:
    """The decoder block a linear named ``name`` sits in (``path``: the decoder layers'); None outside them."""
    return int(name[len(path) + 1:].split(".", 1)[0]) if name.startswith(path + ".") else None


def check_blocks(allocation: Allocation | None, layers) -> None:
    if allocation is not None and len(allocation.rates) != len(layers):
        raise AllocationError(f"the allocation has {len(allocation.rates)} block rates, the model {len(layers)} "
                              "blocks")


def weighted_mean(rates: Sequence[float], sizes: Sequence[int] | None = None) -> float:
    sizes = sizes or [1] * len(rates)
    return sum(r * n for r, n in zip(rates, sizes)) / sum(sizes)


def check_rates(rates: Sequence[float], strategy: str) -> None:
    for i, r in enumerate(rates):
        if not -1e-12 <= r < 1.0 - 1e-9:  # float slack: a rate that is 1 up to rounding is 1
            raise AllocationError(f"{strategy}: block {i} gets sparsity {r:.4f}, outside [0, 1); lower the spread "
                                  "(beta, lambda, eps) or move the target sparsity away from the limit")


def check_target(sparsity: float) -> None:
    if not 0.0 < sparsity < 1.0:
        raise AllocationError(f"target sparsity must be in (0, 1), got {sparsity}")


def recentre(rates: Sequence[float], sizes: Sequence[int] | None, sparsity: float) -> list[float]:
    """Shift every rate by one constant so the parameter-weighted mean is exactly ``sparsity``."""
    shift = sparsity - weighted_mean(rates, sizes)
    return [0.0 if abs(r + shift) < 1e-12 else r + shift for r in rates]  # an exact 0 stays 0 (a dense block)


def round_keep(keep: Sequence[float], sizes: Sequence[int], m: int) -> list[int]:
    """Whole N per block from fractional kept counts: floor, then hand out the units the floors lost to the
    blocks with the largest remainders (weighted by size), each N kept in [1, m - 1]."""
    ns = [min(m - 1, max(1, math.floor(k + 1e-9))) for k in keep]
    total = sum(k * s for k, s in zip(keep, sizes))
    order = sorted(range(len(keep)), key=lambda i: keep[i] - ns[i], reverse=True)
    for i in order:
        have = sum(n * s for n, s in zip(ns, sizes))
        if have + sizes[i] / 2 > total + 1e-9 or ns[i] >= m - 1 or keep[i] - ns[i] <= 0:
            continue
        ns[i] += 1
    return ns


def uniform_rates(sparsity: float, blocks: int) -> list[float]:
    check_target(sparsity)
    return [sparsity] * blocks


def atp_beta_max(sparsity: float, blocks: int) -> float:
    """The largest legal ATP beta, ``min(2S/(L-1), 2(1-S)/(L-1))``."""
    if blocks < 2:
        raise AllocationError(f"ATP needs at least 2 decoder blocks, got {blocks}")
    return min(2 * sparsity, 2 * (1 - sparsity)) / (blocks - 1)


def atp_rates(sparsity: float, blocks: int, beta: float) -> list[float]:
    """``s_i = S - beta (L-1)/2 + beta i`` for blocks i = 0..L-1 (the paper's 1-indexed formula)."""
    check_target(sparsity)
    limit = atp_beta_max(sparsity, blocks)
    if not 0 < beta <= limit * (1 + 1e-9):
        raise AllocationError(f"illegal ATP beta {beta}: need 0 < beta <= min(2S/(L-1), 2(1-S)/(L-1)) = {limit:.6f} "
                              f"for S={sparsity}, L={blocks}")
    first = sparsity - beta * (blocks - 1) / 2
    rates = [first + beta * i for i in range(blocks)]
    check_rates(rates, f"atp (beta {beta})")
    return rates


def atp_betas(sparsity: float, blocks: int, step: float = ATP_STEP) -> list[float]:
    """The paper's search grid: step, 2 step, ... while every block's rate stays in [0, 1)."""
    if not step > 0:
        raise AllocationError(f"beta step must be > 0, got {step}")
    limit = atp_beta_max(sparsity, blocks)
    betas, k = [], 1
    while k * step <= limit * (1 + 1e-9):
        beta = round(k * step, 9)
        if sparsity + beta * (blocks - 1) / 2 < 1 - 1e-9:  # at the bound itself the deepest block would be 100%
            betas.append(beta)
        k += 1
    if not betas:
        raise AllocationError(f"no ATP beta on a grid of {step} is legal for S={sparsity}, L={blocks} "
                              f"(limit {limit:.6f}); use a smaller --beta-step")
    return betas


def outlier_ratio(scores: torch.Tensor, m: float = OWL_M) -> float:
    """OWL's layer-wise outlier distribution: the percentage of scores above ``m`` times their mean."""
    scores = scores.float()
    return 100.0 * (scores > m * scores.mean()).float().mean().item()


def owl_rates(lods: Sequence[float], sparsity: float, lam: float = OWL_LAMBDA,
              sizes: Sequence[int] | None = None) -> list[float]:
    """Blocks' outlier ratios -> rates in [S - lambda, S + lambda] (before centring); more outliers, fewer pruned."""
    check_target(sparsity)
    if not 0 <= lam < 1:
        raise AllocationError(f"OWL lambda must be in [0, 1), got {lam}")
    lo, hi = min(lods), max(lods)
    if hi == lo:
        return uniform_rates(sparsity, len(lods))
    keep = [(d - lo) / (hi - lo) * 2 * lam for d in lods]
    centre = sum(keep) / len(keep)
    rates = recentre([1 - (k - centre + 1 - sparsity) for k in keep], sizes, sparsity)
    check_rates(rates, "owl")
    return rates


def hill_alpha(weight: torch.Tensor, bins: int = 100) -> float:
    """The Hill estimate of the power-law exponent of ``W^T W``'s eigenvalues (squared singular values).

    x_min is the candidate eigenvalue in [0.95, 1.5] x the peak of the log10 histogram that minimises the
    Kolmogorov-Smirnov distance between the tail and the fitted law (AlphaPruning's ``alpha_peak``)."""
    eig = torch.linalg.svdvals(weight.detach().double()).pow(2).sort().values
    eig = eig[eig > 0]
    logs = eig.log10()
    hist = torch.histc(logs, bins=bins, min=logs.min().item(), max=logs.max().item())
    width = (logs.max() - logs.min()).item() / bins
    peak = 10 ** (logs.min().item() + (hist.argmax().item() + 0.5) * width)
    candidates = [i for i, x in enumerate(eig.tolist()) if 0.95 * peak <= x <= 1.5 * peak and i < len(eig) - 1]
    if not candidates:  # a degenerate spectrum: fit the whole of it
        candidates = [0]
    best = (math.inf, 0.0)
    for i in candidates:
        tail = eig[i:]
        n = tail.numel()
        alpha = 1 + n / (tail / tail[0]).log().sum().item() if n > 1 else math.inf
        if not math.isfinite(alpha):
            continue
        empirical = torch.arange(n, dtype=torch.float64) / n
        fitted = 1 - (tail / tail[0]).pow(1 - alpha)
        dist = (empirical - fitted).abs().max().item()
        best = min(best, (dist, alpha))
    if not math.isfinite(best[0]):
        raise AllocationError(f"no power-law fit for a weight of shape {tuple(weight.shape)}")
    return best[1]


def alphapruning_rates(alphas: Sequence[float], sparsity: float, eps: float = ALPHA_EPS,
                       sizes: Sequence[int] | None = None) -> list[float]:
    """``r_i = (alpha_i - min) / (max - min) 2 eps + (1 - eps)``, then ``s_i = r_i S sum(n) / sum(n r)``."""
    check_target(sparsity)
    if not 0 <= eps < 1:
        raise AllocationError(f"AlphaPruning eps must be in [0, 1), got {eps}")
    sizes = sizes or [1] * len(alphas)
    lo, hi = min(alphas), max(alphas)
    if hi == lo:
        return uniform_rates(sparsity, len(alphas))
    r = [(a - lo) / (hi - lo) * 2 * eps + (1 - eps) for a in alphas]
    scale = sparsity * sum(sizes) / sum(n * x for n, x in zip(sizes, r))
    rates = [x * scale for x in r]
    check_rates(rates, "alphapruning")
    return rates


def block_linears(model, pattern: str = "unstructured", targets=None, ignore=("lm_head",)) -> list[dict]:
    """The linears :func:`~sparse_runtime.models.architecture.decoder_linears` would prune, grouped by decoder block (one dict per block)."""

    layers, path = find_decoder_layers(model)
    chosen, _ = decoder_linears(model, pattern, targets, ignore)
    blocks = [{} for _ in layers]
    for name, mod in chosen.items():
        blocks[block_of(name, path)][name] = mod
    return blocks


@torch.no_grad()
def owl_lods(model, blocks: list[dict], calib: torch.Tensor, device, m: float = OWL_M, inputs=None) -> list[float]:
    """Each block's outlier ratio on the DENSE model: its inputs come from the unpruned blocks before it.
    ``inputs`` (from :func:`~.statistics.capture_inputs`) reuses already captured first-block inputs."""

    layers, path = find_decoder_layers(model)
    device = torch.device(device)
    inps, kwargs = inputs or capture_inputs(model, layers, path, calib, device, device)
    lods = []
    for i, layer in enumerate(layers):
        home = next(layer.parameters()).device
        layer.to(device)
        stats = {n: InputNorms(mod.in_features, device) for n, mod in blocks[i].items()}
        handles = [mod.register_forward_hook(lambda mod, a, out, s=stats[n]: s.add(a[0]))
                   for n, mod in blocks[i].items()]
        try:
            outs = run_layer(layer, inps, kwargs[i], device, device)
        finally:
            for h in handles:
                h.remove()
        if blocks[i]:
            scores = torch.cat([wanda_scores(mod.weight.float(), stats[n].sq).flatten()
                                for n, mod in blocks[i].items()])
            lods.append(outlier_ratio(scores, m))
        else:
            lods.append(0.0)
        layer.to(home)
        inps = outs
    return lods


def allocate(model, strategy: str, sparsity: float, *, pattern: str = "unstructured", calib=None,
             beta: float | None = None, lam: float = OWL_LAMBDA, m: float = OWL_M, eps: float = ALPHA_EPS,
             targets=None, ignore=("lm_head",), device="cpu", inputs=None) -> Allocation:
    """Per-block rates for ``model`` by ``strategy``. ``sparsity`` is the target mean (for N:M patterns, the
    mean fraction pruned, e.g. 0.5 for a 4:8-average mix); ``owl`` needs ``calib`` token ids; ``atp`` needs
    ``beta`` (search it with :func:`~.atp_search.search_beta`)."""
    if strategy not in STRATEGIES:
        raise AllocationError(f"unknown allocation {strategy!r}; choose from {', '.join(STRATEGIES)}")
    check_target(sparsity)
    blocks = block_linears(model, pattern, targets, ignore)
    sizes = [sum(mod.weight.numel() for mod in b.values()) for b in blocks]
    if 0 in sizes:
        empty = sizes.index(0)
        raise AllocationError(f"decoder block {empty} has no linear to prune; layer-wise allocation needs every block")
    L, params = len(blocks), {}
    if strategy == "uniform":
        rates = uniform_rates(sparsity, L)
    elif strategy == "atp":
        if beta is None:
            raise AllocationError("atp needs a beta (--beta B) or a search (--beta-search)")
        rates = recentre(atp_rates(sparsity, L, beta), sizes, sparsity)
        params = {"beta": beta, "beta_max": atp_beta_max(sparsity, L)}
    elif strategy == "owl":
        if calib is None:
            raise AllocationError("owl needs calibration token ids: its outlier ratios come from |W| * ||X||")
        lods = owl_lods(model, blocks, calib, device, m, inputs)
        rates = owl_rates(lods, sparsity, lam, sizes)
        params = {"lambda": lam, "M": m, "outlier_ratio": [round(d, 4) for d in lods]}
    else:
        alphas = [sum(hill_alpha(mod.weight) for mod in b.values()) / len(b) for b in blocks]
        rates = alphapruning_rates(alphas, sparsity, eps, sizes)
        params = {"eps": eps, "alpha": [round(a, 4) for a in alphas]}
    check_rates(rates, strategy)
    return Allocation(strategy, sparsity, rates, pattern, sizes, params)


def plot_rates(allocations: Sequence[Allocation], path, title: str = "") -> None:
    """Sparsity vs depth, one line per allocation, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for a in allocations:
        label = a.strategy + (f" (beta {a.params['beta']:.3f})" if a.params.get("beta") is not None else "")
        ax.plot(range(len(a.rates)), a.block_sparsity, marker="o", ms=3, label=label)
    ax.set_xlabel("decoder block")
    ax.set_ylabel("sparsity")
    ax.set_title(title or f"target mean sparsity {allocations[0].sparsity} ({allocations[0].pattern})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

"""Deployment plan: which linears run 2:4 and which stay dense, for a target share of 2:4 weights or a
target decode speedup.

The 2:4 kernels run at exactly 50% sparsity, so a layer-wise allocation becomes a yes/no choice per linear.

* **Cost** (decode is memory-bound): a dense linear moves its ``N K`` weights per token, a 2:4 one 9/16 of
  that (half the values plus 2-bit in-group indices, fp16). The predicted model speedup is the bytes of every
  linear a decode step reads (the decoder's and ``lm_head``) dense, over the same under the plan. No GPU has
  measured a per-shape kernel table for this project yet (``benchmarks/results`` has none), so the byte
  model is all there is.
* **Damage**: each linear's measured 2:4 reconstruction error ``e = ||WX - W_hat X|| / ||WX||`` (from
  pruning the whole model 2:4 with ``record_errors``), squared, times a depth factor
  ``exp(depth_weight (L - 1 - i) / (L - 1))`` for block i: an early block's error passes through more blocks
  after it (ATP's principle that sparsity should rise with depth).
* **Choice**: greedy, the lowest damage per byte saved first, until the target is met. How much depth counts
  is measured, not assumed: :func:`search_depth_weight` builds the plan at each weight of a grid (0 = the
  errors alone, 128 = nearly pure depth order: adjacent blocks of a 30-block model differ by e^4.4), prunes
  each 2:4 from the dense model's statistics and keeps the lowest perplexity on held-out validation windows
  (never the evaluation text).

Naive plans for comparison (:func:`naive`): everything 2:4, the first blocks dense (linears 2:4 from the deepest
block up), and a random order; each filled to the same target, or for the comparison at equal predicted
speedup, to as much of it as one more linear would not pass."""
from __future__ import annotations

import json
import math
import os
import random
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..data.perplexity import perplexity
from ..errors import SparseRuntimeError
from ..models.architecture import find_decoder_layers
from .allocation import block_of
from .config import PruneConfig
from .dense_statistics import collect_statistics, prune_from_statistics

BYTES_24 = 9 / 16  # a 2:4 fp16 weight's bytes over the dense weight's
PLAN_FORMAT = "sparse_runtime.plan"
NAIVE = ("all", "first_dense", "random")
DEPTH_WEIGHTS = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)


class PlanError(SparseRuntimeError, ValueError):
    """An unreachable target, or a plan file that does not fit the model."""


@dataclass
class LinearCost:
    name: str
    block: int
    params: int  # N * K
    error: float  # relative 2:4 reconstruction error


@dataclass
class DeploymentPlan:
    strategy: str
    sparse: list[str]  # run 2:4
    dense: list[str]  # stay dense
    fraction: float  # share of the plan's linear weights that are 2:4
    speedup: float  # predicted decode speedup over the dense model (byte model)
    target: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"format": PLAN_FORMAT, "version": 1, "pattern": "2:4", **asdict(self)}

    def save(self, path) -> Path:
        """Write the plan as JSON atomically (temp file, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path) -> DeploymentPlan:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"plan file {path} not found")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise PlanError(f"{path}: not JSON ({e})") from None
        if not isinstance(d, dict) or d.get("format") != PLAN_FORMAT:
            raise PlanError(f"{path}: not a {PLAN_FORMAT} file (write one with `sparse-runtime plan`)")
        for key in ("strategy", "sparse", "dense", "fraction", "speedup"):
            if key not in d:
                raise PlanError(f"{path}: missing {key!r}")
        if not isinstance(d["sparse"], list) or not all(isinstance(n, str) for n in d["sparse"]) or not d["sparse"]:
            raise PlanError(f"{path}: 'sparse' must be a non-empty list of linear names")
        return cls(**{k: d[k] for k in ("strategy", "sparse", "dense", "fraction", "speedup")},
                   target=d.get("target", {}), info=d.get("info", {}))

    def check_model(self, model: nn.Module) -> None:
        """Every name the plan runs 2:4 must be an ``nn.Linear`` of ``model``."""
        modules = dict(model.named_modules())
        for name in self.sparse:
            if not isinstance(modules.get(name), nn.Linear):
                raise PlanError(f"the plan names {name!r}, which is not a linear layer of this model")

    def table(self, costs: list[LinearCost]) -> str:
        """Per block, which linears run 2:4 (short names), and the totals."""
        sparse = set(self.sparse)
        blocks: dict[int, list[str]] = {}
        for c in costs:
            blocks.setdefault(c.block, []).append(c.name.rsplit(".", 1)[-1] + ("" if c.name in sparse else "*"))
        rows = [f"{'block':>5}  linears (* = dense)"] + [f"{b:>5}  {' '.join(n)}" for b, n in sorted(blocks.items())]
        rows.append(f"{self.strategy}: {len(self.sparse)} of {len(costs)} linears 2:4, {self.fraction:.1%} of the "
                    f"weights; predicted decode speedup {self.speedup:.3f}x (byte model)")
        return "\n".join(rows)


def linear_costs(model: nn.Module, errors: dict[str, float]) -> tuple[list[LinearCost], int]:
    """``(costs of the measured linears, parameters of every other linear a decode step reads)``."""
    _, path = find_decoder_layers(model)
    costs, other = [], 0
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        if name in errors:
            costs.append(LinearCost(name, block_of(name, path), mod.weight.numel(), errors[name]))
        else:
            other += mod.weight.numel()
    if not costs:
        raise PlanError("no measured linear: plan needs reconstruction errors for the decoder's linears")
    return costs, other


def predicted_speedup(costs: list[LinearCost], sparse: set[str], other: int = 0) -> float:
    """Dense bytes over the plan's bytes (a 2:4 linear's are ``BYTES_24`` of its dense ones)."""
    dense = sum(c.params for c in costs) + other
    planned = other + sum(c.params * (BYTES_24 if c.name in sparse else 1.0) for c in costs)
    return dense / planned


def _fill(costs, order, fraction, speedup, other, strategy, target, info=None,
          not_above=False) -> DeploymentPlan:
    """Take linears in ``order`` as 2:4 until the target fraction (of weights) or speedup is met; with
    ``not_above`` stop instead before the linear that would pass the target speedup."""
    total = sum(c.params for c in costs)
    sparse, kept = set(), 0
    for c in order:
        if (fraction is not None and kept >= fraction * total - 1e-9) or (
                speedup is not None and predicted_speedup(costs, sparse, other) >= speedup - 1e-12):
            break
        if not_above and speedup is not None and predicted_speedup(costs, sparse | {c.name}, other) > speedup:
            break
        sparse.add(c.name)
        kept += c.params
    return DeploymentPlan(strategy, [c.name for c in costs if c.name in sparse],
                          [c.name for c in costs if c.name not in sparse], kept / total,
                          predicted_speedup(costs, sparse, other), target, info or {})


def _check_target(costs, fraction, speedup, other) -> dict:
    if (fraction is None) == (speedup is None):
        raise PlanError("give exactly one target: a fraction of linear weights at 2:4, or a decode speedup")
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise PlanError(f"target fraction must be in (0, 1], got {fraction}")
        return {"fraction": fraction}
    best = predicted_speedup(costs, {c.name for c in costs}, other)
    if not 1 < speedup <= best + 1e-12:
        raise PlanError(f"target speedup {speedup} is out of reach: the byte model allows (1, {best:.4f}] for this "
                        "model (every decoder linear 2:4, lm_head dense)")
    return {"speedup": speedup}


def choose(costs: list[LinearCost], *, fraction: float | None = None, speedup: float | None = None, other: int = 0,
           depth_weight: float = 1.0) -> DeploymentPlan:
    """The plan: linears by squared error x depth weight per byte saved, lowest first, until the target."""
    target = _check_target(costs, fraction, speedup, other)
    last = max(c.block for c in costs)

    def damage(c):
        depth = math.exp(depth_weight * (last - c.block) / max(last, 1))
        return c.error ** 2 * depth / (c.params * (1 - BYTES_24))

    return _fill(costs, sorted(costs, key=damage), fraction, speedup, other, "error_depth", target,
                 {"depth_weight": depth_weight, "cost_model": "decode bytes: 2:4 = 9/16 of dense"})


def naive(costs: list[LinearCost], strategy: str, *, fraction: float | None = None, speedup: float | None = None,
          other: int = 0, seed: int = 0, not_above: bool = False) -> DeploymentPlan:
    """A baseline plan: ``all`` 2:4, ``first_dense`` (linears 2:4 from the deepest block up, in model order
    within a block, so the first blocks stay dense) or ``random`` (a seeded random order), filled to the same
    target (``all`` ignores it). ``not_above`` keeps a speedup target as a ceiling (within one linear), so a
    plan compared against it never has the lower predicted speedup."""
    if strategy not in NAIVE:
        raise PlanError(f"unknown naive plan {strategy!r}; choose from {', '.join(NAIVE)}")
    if strategy == "all":
        return _fill(costs, costs, 1.0, None, other, "all", {"fraction": 1.0})
    target = _check_target(costs, fraction, speedup, other)
    if strategy == "first_dense":
        order = sorted(costs, key=lambda c: -c.block)  # stable: model order within a block
    else:
        order = list(costs)
        random.Random(seed).shuffle(order)
    return _fill(costs, order, fraction, speedup, other, strategy, target,
                 {"seed": seed} if strategy == "random" else {}, not_above)


@torch.no_grad()
def search_depth_weight(model: nn.Module, costs: list[LinearCost], calib: torch.Tensor, val: torch.Tensor, *,
                        fraction: float | None = None, speedup: float | None = None, other: int = 0,
                        method: str = "wanda", weights=DEPTH_WEIGHTS, device=None, log=None) -> DeploymentPlan:
    """The :func:`choose` plan at each depth weight, each pruned 2:4 by ``method`` from the dense model's
    statistics (gathered once) and scored by perplexity on ``val`` ([n, seqlen] held-out token ids); the
    lowest wins and carries its trials in ``info["search"]``. ``model`` must be dense and is left dense."""

    layers, _ = find_decoder_layers(model)
    dense = {k: v.clone() for k, v in layers.state_dict().items()}
    config = PruneConfig(method, "2:4", device=device, progress=False)
    stats, trials, scored, best = None, [], {}, None
    for w in weights:
        plan = choose(costs, fraction=fraction, speedup=speedup, other=other, depth_weight=w)
        key = tuple(plan.sparse)
        if key not in scored:  # neighbouring weights often give the same plan
            if stats is None:  # gathered once, only if some plan is scored
                stats = collect_statistics(model, calib, config)
            prune_from_statistics(model, config.replace(targets=plan.sparse), stats)
            scored[key] = perplexity(model, val.reshape(-1), seqlen=val.shape[1], progress=False).ppl
            layers.load_state_dict(dense)
        trials.append({"depth_weight": w, "validation_ppl": round(scored[key], 4), "speedup": round(plan.speedup, 4)})
        if log:
            log(f"plan depth weight {w:g}: validation perplexity {scored[key]:.3f}")
        if best is None or scored[key] < best[0]:
            best = (scored[key], plan)
    plan = best[1]
    plan.info["search"] = {"trials": trials, "statistics": "dense", "method": method,
                           "validation_windows": list(val.shape)}
    return plan

"""A gradual schedule run end to end on a model in memory: per step, prune (the last step's masks as the prior, so
a pruned weight stays pruned), swap the pruned linears for SparseLinear, recover for the step's share of the
tokens with the mask frozen, and turn the SparseLinear layers back into nn.Linear holding their dense weight
(zeros where pruned) for the next step's prune to read."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..models.architecture import decoder_linears
from ..nn.linear import SparseLinear
from ..nn.sparsify import SparsifyReport, sparsify
from ..prune import PruneConfig, PruneResult, prune
from ..recover import RecoverConfig, RecoverResult, recover_model
from ..recover.windows import Windows
from .schedule import phase_steps, step_configs


@dataclass
class GradualResult:
    prune: PruneResult  # the last step's: the final masks
    report: SparsifyReport  # the last step's swap to SparseLinear
    steps: list[dict] = field(default_factory=list)  # per step: pattern, sparsity, seconds, its recovery

    @property
    def recoveries(self) -> list[RecoverResult]:
        return [s["recovery"] for s in self.steps]

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.recoveries)

    @property
    def seconds(self) -> float:
        """Pruning and training time, evaluations excluded."""
        return sum(s["prune_seconds"] + s["recovery"].seconds for s in self.steps)

    def curve(self) -> list[dict]:
        """Every evaluation of every phase, ``tokens`` and ``seconds`` counted from the first step (pruning time
        included), each with the pruning step it followed."""
        out, tokens, seconds = [], 0, 0.0
        for i, s in enumerate(self.steps, 1):
            seconds += s["prune_seconds"]
            rec = s["recovery"]
            out += [{**e, "prune_step": i, "tokens": tokens + e["tokens"], "seconds": seconds + e["seconds"]}
                    for e in rec.evals]
            tokens, seconds = tokens + rec.tokens, seconds + rec.seconds
        return out

    def schedule(self) -> dict:
        return {"steps": len(self.steps), "sparsities": [s["sparsity"] for s in self.steps],
                "patterns": [s["pattern"] for s in self.steps]}

    def summary(self) -> dict:
        """What the written checkpoint records of its recovery: the last phase's record, over all the phases."""
        curve = self.curve()
        return {**self.recoveries[-1].summary(), "tokens": self.tokens,
                "steps": sum(r.steps for r in self.recoveries), "seconds": round(self.seconds, 1),
                "held_out_ppl": {"first_step": curve[0]["ppl"], "after": curve[-1]["ppl"]} if curve else None,
                "schedule": self.schedule()}

    def to_dict(self) -> dict:
        return {"schedule": self.schedule(), "tokens": self.tokens, "seconds": self.seconds, "curve": self.curve(),
                "steps": [{**s, "recovery": s["recovery"].to_dict()} for s in self.steps]}


def prune_gradually(model, teacher, config: PruneConfig, recovery: RecoverConfig, windows: Windows, steps: int,
                    calib=None, backend: str = "auto", log=None, evaluate=None) -> GradualResult:
    """Prune ``model`` (dense, in place) to ``config``'s pattern in ``steps`` steps (:func:`.step_configs`), each
    followed by a phase of ``recovery`` (its ``tokens`` shared out over the phases, :func:`.phase_steps`; each
    phase trains on the next of the windows one run of ``recovery`` would read) toward ``teacher``, the dense model
    (a separate copy; None for ``ce``). The model ends with SparseLinear layers at the target pattern. ``calib``
    as :func:`~sparse_runtime.prune.prune`; ``log`` and ``evaluate`` as
    :func:`~sparse_runtime.recover.recover_model`."""
    configs = step_configs(config, steps)
    shares = phase_steps(recovery, steps)
    if teacher is not None and teacher is model:
        raise ValueError("the teacher must be a separate copy of the dense model: the student is pruned in place")
    names = list(decoder_linears(model, config.pattern, config.targets, config.ignore)[0])
    per_step = recovery.batch * recovery.seqlen
    masks, done, records = None, 0, []
    for i, (step, share) in enumerate(zip(configs, shares)):
        if i:
            _densify(model, names)
        t0 = time.perf_counter()
        result = prune(model, step.replace(targets=names, prior=masks), calib=calib)
        seconds = time.perf_counter() - t0
        masks = result.masks
        report = sparsify(model, masks=masks, pattern=step.pattern, backend=backend, progress=False)
        rec = recover_model(model, teacher, _phase(windows, done, share, recovery),
                            recovery.replace(tokens=share * per_step), log, evaluate)
        done += share
        records.append({"step": i + 1, "pattern": step.pattern, "sparsity": step.sparsity,
                        "achieved_sparsity": result.to_dict()["achieved_sparsity"], "prune_seconds": seconds,
                        "recovery": rec})
    return GradualResult(result, report, records)


def _phase(windows: Windows, first: int, count: int, recovery: RecoverConfig) -> Windows:
    """The training windows of optimizer steps ``first .. first + count - 1`` of one run over ``windows``."""
    rows = torch.cat([windows.rows(s, recovery.batch, recovery.seed) for s in range(first, first + count)])
    return dataclasses.replace(windows, train=windows.train[rows])


@torch.no_grad()
def _densify(model: nn.Module, names) -> None:
    """Each SparseLinear of ``names`` back to an nn.Linear holding its dense weight (zeros where pruned)."""
    for name in names:
        layer = model.get_submodule(name)
        if not isinstance(layer, SparseLinear):
            raise TypeError(f"{name} is a {type(layer).__name__}, not the SparseLinear the last step made")
        values = layer.weight_values
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                           device=values.device, dtype=layer.dtype)
        linear.weight.copy_(layer.dense_weight())
        if layer.bias is not None:
            linear.bias.copy_(layer.bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, linear)

"""What each step of a gradual schedule prunes to, and how its recovery budget is shared.

An unstructured target of sparsity ``s`` follows Zhu & Gupta's cubic schedule from 0: step ``i`` of ``K`` prunes
to ``s (1 - (1 - i/K)^3)``, the early steps large while the weights are redundant, the last small. An N:M target
(``s = 1 - N/M``) takes the same sparsities for steps 1..K-1, unstructured but steered toward N:M (each group's N
best weights are protected, so no group of M loses more than M - N), and the exact N:M pattern at step K. Plain
unstructured steps would prune 3 weights of some groups of 4 on the way to 2:4, and the 2:4 step would then have to
bring one back; the protection keeps every step a superset of the last while leaving each step free to prune
wherever the scores are lowest. A chain of N:M patterns (3:4, then 2:4) is nested too, but has only M - N
sparsities on the way (one intermediate step for 2:4)."""
from __future__ import annotations

from ..format.codec import parse_pattern
from ..prune import PruneConfig
from ..recover import RecoverConfig


def check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"a schedule takes a number of pruning steps >= 1, not {steps!r}")
    return steps


def sparsities(target: float, steps: int) -> list[float]:
    """The sparsity each of ``steps`` steps prunes to, rising to ``target`` (the last is ``target`` exactly)."""
    check_steps(steps)
    return [target * (1 - (1 - i / steps) ** 3) for i in range(1, steps + 1)]


def step_configs(config: PruneConfig, steps: int) -> list[PruneConfig]:
    """The prune of each step toward ``config`` (its pattern and sparsity the target; the last step is ``config``
    itself). Each later step gets the masks of the one before as its ``prior`` when it runs."""
    if config.rotate is not None or config.allocation is not None:
        raise ValueError("a gradual schedule prunes every block alike in fixed coordinates: it takes no rotation "
                         "and no allocation")
    if config.prior is not None or config.toward is not None:
        raise ValueError("a gradual schedule sets prior and toward itself, step by step")
    if config.quant is not None:
        raise ValueError("a gradual schedule recovers in full precision after every step, the last included, which "
                         "moves the kept weights off a quantization grid: prune with quantize in one shot, without "
                         "recovery")
    nm = parse_pattern(config.pattern)
    target = 1 - nm[0] / nm[1] if nm else config.sparsity
    out = []
    for i, s in enumerate(sparsities(target, steps), 1):
        if i == steps:
            out.append(config)
        elif nm:
            out.append(config.replace(pattern="unstructured", sparsity=s, toward=config.pattern))
        else:
            out.append(config.replace(sparsity=s))
    return out


def phase_steps(recovery: RecoverConfig, steps: int) -> list[int]:
    """The optimizer steps of each of ``steps`` recovery phases: ``recovery``'s budget shared out as evenly as
    whole steps allow (the phases together train exactly the tokens one run of ``recovery`` would)."""
    check_steps(steps)
    if recovery.loss == "block":
        raise ValueError("block reconstruction spends its budget per decoder layer: a gradual schedule's phases "
                         "train the whole model (kd, squarehead or ce)")
    if recovery.state or recovery.resume or recovery.stop_after:
        raise ValueError("a gradual schedule runs its recovery phases in one session: no state, resume or "
                         "stop_after")
    total = recovery.steps
    if total < steps:
        raise ValueError(f"{recovery.tokens} recovery tokens make {total} optimizer step(s) of "
                         f"{recovery.batch * recovery.seqlen} tokens; {steps} pruning steps need at least one each")
    return [total // steps + (i < total % steps) for i in range(steps)]

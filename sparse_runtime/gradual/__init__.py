"""Gradual pruning with recovery (issue 33): K steps, each pruning to a higher sparsity on a schedule
(:mod:`.schedule`) and then fine-tuning the kept weights toward the dense teacher with the mask frozen, a weight
once pruned never coming back, the last step at the target pattern (:mod:`.run`). With K = 1 it is one-shot
pruning followed by recovery, the baseline it is compared with at equal tokens. Imports prune and recover, which
import neither it nor each other; only the command line imports it."""
from .run import GradualResult, prune_gradually
from .schedule import phase_steps, sparsities, step_configs

__all__ = ["GradualResult", "phase_steps", "prune_gradually", "sparsities", "step_configs"]

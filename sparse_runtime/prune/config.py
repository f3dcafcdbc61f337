"""What a prune is asked to do: :class:`PruneConfig` (method, pattern, sparsity, which linears, where, and the
methods' and rotations' options), validated once when it is built, before any model is touched."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ..format.codec import parse_pattern
from ..format.quant import SCHEMES, QuantScheme
from .allocation import Allocation
from .methods import ALL_METHODS, METHODS, NEEDS_CALIBRATION, QUANTIZERS
from .sparsegpt import check_blocksize, check_refit

OBJECTIVES = ("entropy", "nm")
PER = ("row", "matrix")
SWEEPS = ("sparsegpt", "gptq")  # the methods that run SparseGPT's column sweep: column blocks, true-sequential


def check_sparsity(pattern: str, sparsity: float) -> None:
    parse_pattern(pattern)
    try:
        inside = not isinstance(sparsity, bool) and 0.0 < sparsity < 1.0
    except TypeError:
        inside = False
    if not inside:
        raise ValueError(f"sparsity must be in (0, 1), got {sparsity}")


@dataclass
class RotateOptions:
    objective: str = "nm"
    steps: int = 100
    blocks: int = 1  # diagonal blocks of Q1; 1 = a full d x d rotation
    lr: float = 0.01
    clip: float = 1.0
    damp: float = 0.01  # SparseGPT's damping, for H^-1
    dtype: torch.dtype | None = None  # of the weight x rotation product while learning (None: learning_dtype)
    importance: str | None = None  # whose scores the objective sees; None: the pruning method's own

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown rotation objective {self.objective!r}; choose from {', '.join(OBJECTIVES)}")
        if self.steps < 0 or self.blocks < 1:
            raise ValueError(f"need rotate steps >= 0 and blocks >= 1, got {self.steps} and {self.blocks}")
        if self.importance not in (None, *METHODS):
            raise ValueError(f"unknown rotation importance {self.importance!r}; choose from {', '.join(METHODS)}")


def _names(value, field: str):
    if value is not None and (isinstance(value, str) or not isinstance(value, Sequence)
                              or not all(isinstance(n, str) for n in value)):
        raise ValueError(f"{field} takes a list of linear names or globs, not {value!r}")


@dataclass
class PruneConfig:
    """One prune. ``targets``/``ignore``: linears to prune / to leave (globs or trailing names; default every
    linear in the decoder layers but lm_head). ``device`` runs the layers (default CUDA when there is one);
    ``offload`` keeps the calibration activations on the CPU. ``true_sequential`` calibrates each group of a
    layer's linears on the outputs of the groups pruned before it (None: on for SparseGPT and rotated prunes,
    off for Wanda, as their papers). ``record_errors`` measures ||WX - W_hat X|| / ||WX|| per linear.
    ``rotate`` ("entropy", "nm" or a :class:`RotateOptions`) learns DenoiseRotator rotations per decoder layer
    before pruning it; a name takes ``rotate_steps`` Adam steps, ``rotate_blocks`` diagonal blocks of R1 and
    ``rotate_importance``'s scores (default the method's own). ``allocation`` (an
    :class:`~.allocation.Allocation` of the same pattern) gives each decoder block its own rate.
    ``blocksize``, ``damp`` (also the rotation's), ``refit``: SparseGPT's; ``per``: magnitude's, unstructured.
    ``sink_weight`` (SparseGPT's and GPTQ's): the first token of each calibration window counts that many times in
    the Hessians of the key and value projections. That token is the attention sink: every later query of the
    window reads its key and value, so their error there costs about the window's length in tokens, not one
    (weighed as one, GPTQ's int4 v_proj alone took SmolLM2-135M from 29.5 to 38.8); 1 weighs every token alike.
    ``prior`` (linear name -> keep mask of an earlier prune of the same weights) and ``toward`` (an N:M pattern,
    with ``pattern="unstructured"`` at a sparsity of at most ``1 - N/M``) are a gradual schedule's: a weight
    ``prior`` pruned stays pruned, and no group of M loses more than M - N, so a later N:M prune completes the
    mask (see :func:`~sparse_runtime.format.masks.steer`); neither goes with ``gptq``, which prunes nothing.

    ``quantize`` (int8, int4 or fp8; see :mod:`sparse_runtime.format.quant`) also puts every pruned weight on that
    scheme's grid, ``group_size`` input columns per scale (int4's default 128; int8 and fp8 one scale per row): the
    weights hold ``code * scale`` and the result carries the scales (each group's absmax, or with ``scale_search`` the
    clipped scale of least rounding error, :func:`~.quantize.choose_scales`). Magnitude and Wanda round to nearest after
    masking, SparseGPT quantizes in its sweep. ``quantize_after`` instead prunes the whole model in full precision
    first, then quantizes the pruned linears by GPTQ on the fixed masks (:func:`~.quantize_pruned`; a second
    calibrated pass, the two-stage recipe of the published sparse quantized checkpoints): the masks are then exactly
    the full-precision prune's, where a joint prune's later layers choose theirs on quantized inputs, which moves
    perplexity by a few percent either way (as thread counts do). Method ``gptq`` quantizes without pruning (the
    dense baseline of the same scheme; ``pattern`` and ``sparsity`` then only steer a rotation's objective, learned
    on SparseGPT's scores unless ``rotate_importance`` says otherwise)."""

    method: str = "sparsegpt"
    pattern: str = "2:4"
    sparsity: float = 0.5
    targets: Sequence[str] | None = None
    ignore: Sequence[str] = ("lm_head",)
    device: str | torch.device | None = None
    true_sequential: bool | None = None
    offload: bool = False
    record_errors: bool = False
    progress: bool = True
    rotate: str | RotateOptions | None = None
    rotate_steps: int = 100
    rotate_blocks: int = 1
    rotate_importance: str | None = None
    allocation: Allocation | None = None
    blocksize: int = 128
    damp: float = 0.01
    refit: int = 0
    per: str = "matrix"
    prior: Mapping[str, torch.Tensor] | None = None
    toward: str | None = None
    quantize: str | None = None
    group_size: int | None = None
    quantize_after: bool = False
    scale_search: bool = False
    sink_weight: float = 1.0

    def method_options(self) -> dict:
        """The settings of this config's method, as a checkpoint records them beside the method's name."""
        searched = {"scale_search": True} if self.scale_search else {}
        if self.method in SWEEPS:
            sink = {"sink_weight": self.sink_weight} if self.sink_weight != 1 else {}
            return {"blocksize": self.blocksize, "damp": self.damp, "refit": self.refit} | sink | searched
        return ({"per": self.per} if self.method == "magnitude" else {}) | searched

    def __post_init__(self):
        if self.method not in ALL_METHODS:
            raise ValueError(f"unknown pruning method {self.method!r}; choose from {', '.join(ALL_METHODS)}")
        check_sparsity(self.pattern, self.sparsity)
        _names(self.targets, "targets")
        _names(self.ignore, "ignore")
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError) as e:
                raise ValueError(f"device {self.device!r}: {e}") from None
        for field in ("offload", "record_errors", "progress", "quantize_after", "scale_search"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"{field} must be True or False, got {getattr(self, field)!r}")
        if self.true_sequential not in (None, True, False):
            raise ValueError(f"true_sequential must be True, False or None, got {self.true_sequential!r}")
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) or not self.damp >= 0:
            raise ValueError(f"damp must be a number >= 0, got {self.damp!r}")
        check_refit(self.refit)
        if (isinstance(self.sink_weight, bool) or not isinstance(self.sink_weight, (int, float))
                or not 1 <= self.sink_weight < math.inf):
            raise ValueError(f"sink_weight must be a finite number >= 1, got {self.sink_weight!r}")
        if self.sink_weight != 1 and self.method not in SWEEPS:
            raise ValueError(f"sink_weight weighs tokens in SparseGPT's and GPTQ's Hessians: {self.method} does not "
                             f"take it")
        if self.refit and self.method != "sparsegpt":
            raise ValueError(f"refit re-solves SparseGPT's kept weights: {self.method} does not take it")
        if self.toward is not None:
            nm = parse_pattern(self.toward)
            if nm is None or parse_pattern(self.pattern) is not None or not self.sparsity <= 1 - nm[0] / nm[1]:
                raise ValueError(f"toward takes an N:M pattern beside pattern 'unstructured' at a sparsity of at "
                                 f"most 1 - N/M; got toward={self.toward!r}, pattern={self.pattern!r}, "
                                 f"sparsity={self.sparsity}")
            if self.allocation is not None:
                raise ValueError("toward prunes every block to the same sparsity: it takes no allocation")
        if self.prior is not None and not isinstance(self.prior, Mapping):
            raise ValueError(f"prior takes a mapping of linear names to keep masks, not {type(self.prior).__name__}")
        if self.method in QUANTIZERS and (self.prior is not None or self.toward is not None):
            raise ValueError(f"prior and toward steer a prune's mask: {self.method} prunes nothing")
        self._check_quantize()
        if self.quantize_after and (self.quantize is None or self.method in QUANTIZERS
                                    or ALL_METHODS[self.method].statistics is None):
            raise ValueError(f"quantize_after quantizes a calibrated prune's result by GPTQ: it needs quantize and a "
                             f"calibrated pruning method, got method {self.method!r}, quantize {self.quantize!r}")
        if self.method in SWEEPS:  # the other methods have no column blocks
            check_blocksize(self.blocksize, self.toward or self.pattern, self.quant)
        if self.per not in PER:
            raise ValueError(f"per must be 'row' or 'matrix', got {self.per!r}")
        if self.rotate == "none":
            self.rotate = None
        elif isinstance(self.rotate, str):
            self.rotate = RotateOptions(self.rotate, self.rotate_steps, self.rotate_blocks, damp=self.damp,
                                        importance=self.rotate_importance)
        elif self.rotate is not None and not isinstance(self.rotate, RotateOptions):
            raise ValueError(f"rotate takes 'none', {', '.join(map(repr, OBJECTIVES))} or a RotateOptions, "
                             f"not {self.rotate!r}")
        if self.rotate is not None and (self.prior is not None or self.toward is not None):
            raise ValueError("a rotation moves the weights into new coordinates: it does not combine with an "
                             "earlier prune's masks (prior) or a gradual schedule (toward)")
        if self.rotate is not None and self.method in QUANTIZERS and self.rotate.importance is None:
            self.rotate = dataclasses.replace(self.rotate, importance="sparsegpt")  # GPTQ's sweep is SparseGPT's
        if (self.rotate is not None and ALL_METHODS[self.method].statistics is None
                and self.rotate.importance in NEEDS_CALIBRATION):
            raise ValueError(f"rotate importance {self.rotate.importance!r} needs calibration statistics, which "
                             f"{self.method} pruning does not collect")
        if self.allocation is not None:
            if not isinstance(self.allocation, Allocation):
                raise ValueError(f"allocation takes an Allocation (see allocation.allocate), not {self.allocation!r}")
            if self.allocation.pattern != self.pattern:
                raise ValueError(f"the allocation is for pattern {self.allocation.pattern!r}, the prune for "
                                 f"{self.pattern!r}")
            if self.method in QUANTIZERS:
                raise ValueError(f"an allocation sets sparsities: {self.method} prunes nothing")

    def _check_quantize(self) -> None:
        if self.quantize is None:
            for field in ("group_size", "scale_search"):
                if getattr(self, field):
                    raise ValueError(f"{field} belongs to quantize: give quantize='int4' (or int8, fp8) with it")
            if self.method in QUANTIZERS:
                raise ValueError(f"{self.method} quantizes without pruning: it needs quantize "
                                 f"({', '.join(SCHEMES)})")
            return
        if self.quantize not in SCHEMES:
            raise ValueError(f"unknown quantization scheme {self.quantize!r}; choose from {', '.join(SCHEMES)}")
        if self.group_size is not None and (isinstance(self.group_size, bool) or not isinstance(self.group_size, int)):
            raise ValueError(f"group_size takes a number of input columns, not {self.group_size!r}")
        scheme = QuantScheme.parse(self.quantize, self.group_size)  # refuses a group that is not a multiple of 8
        nm = parse_pattern(self.pattern)
        if scheme.group_size and nm and scheme.group_size % nm[1] and self.method not in QUANTIZERS:
            raise ValueError(f"group_size {scheme.group_size} must be a multiple of the pattern's group size "
                             f"{nm[1]} (a scale's columns hold whole {self.pattern} groups)")

    @property
    def sequential(self) -> bool:
        """Whether each group of a layer's linears is calibrated on the groups pruned before it."""
        if self.true_sequential is not None:
            return self.true_sequential
        return self.method in SWEEPS or self.rotate is not None

    @property
    def quant(self) -> QuantScheme | None:
        """The quantization scheme ``quantize`` and ``group_size`` name (None: full precision)."""
        return None if self.quantize is None else QuantScheme.parse(self.quantize, self.group_size)

    def torch_device(self) -> torch.device:
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def block(self, i: int | None) -> tuple[str, float]:
        """``(pattern, sparsity)`` for decoder block ``i`` (None: a linear outside the blocks, the uniform rate)."""
        if self.allocation is None or i is None:
            return self.pattern, self.sparsity
        return self.allocation.block(i)

    def full_precision(self) -> PruneConfig:
        """The same prune without quantization: ``quantize_after``'s first stage."""
        return self.replace(quantize=None, group_size=None, quantize_after=False, scale_search=False)

    def replace(self, **fields) -> PruneConfig:
        """A copy with ``fields`` changed, validated again."""
        return dataclasses.replace(self, **fields)


def as_config(config: PruneConfig | str, pattern: str | None = None, sparsity: float | None = None,
              **fields) -> PruneConfig:
    """``config`` itself (with ``fields`` replaced), or a new one for the method named ``config``."""
    given = {k: v for k, v in (("pattern", pattern), ("sparsity", sparsity)) if v is not None} | fields
    if isinstance(config, PruneConfig):
        return config.replace(**given) if given else config
    if not isinstance(config, str):
        raise ValueError(f"give a PruneConfig or a method name ({', '.join(ALL_METHODS)}), not {config!r}")
    return PruneConfig(config, **given)

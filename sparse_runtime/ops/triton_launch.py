"""The one way the Triton 2:4 kernel runs: :func:`launch` of a ``triton_plan.LaunchPlan``, for every caller (the
prepared ``Sparse24Layer``, the custom ops' implementations, the functional API).

The first eager launch of a plan consults the autotuner; after that each specialisation Triton compiles
(:func:`specialisation`) is compiled once with the autotuner's choice and then launched without
``JITFunction.run``: ``kernel[grid](...)`` binds the arguments, computes the specialisation key, looks the kernel
up, builds the launch metadata and (autotuned) computes the autotuner's key, tens of microseconds of Python per
call that the plan has already decided. :func:`direct_launch` keeps only the final launcher call; where it is
unavailable (the interpreter compiles nothing) the plan's launch is ``kernel[grid]`` with its config. A launch that
would compile or autotune while the stream is capturing a CUDA graph raises instead (warm up first).

Triton 3.6 through 3.9 launch a ``CompiledKernel`` the same way (``compiler/compiler.py``, ``runtime/jit.py``):
``compiled.run`` (a property that loads the module on first use) is the driver's launcher, called as
``run(grid_0, grid_1, grid_2, stream, compiled.function, compiled.packed_metadata, launch_metadata,
launch_enter_hook, launch_exit_hook, *every_parameter)``, constexprs included (the launcher skips them). The
hooks are ``HookChain``s (``triton.knobs.runtime``), never None; the launcher calls them only when not None, and
``launch_metadata`` only matters to them, so both are skipped while no hook is installed (profilers add them).
A compiled object without these attributes gets no direct launch (None).
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable, Optional

import torch

from ..errors import ShapeError
from ..format.rotation import apply_rotation
from .caches import m_bucket
from . import triton_plan
from ..format.codec import cdiv
from .triton_plan import LaunchPlan, kernels, uncompiled


def launch(plan: LaunchPlan, x, values, meta, bias, rotation, out, locks=None, scales=None) -> None:
    """``out [M, N] = (x [M, K] @ R) @ W^T + bias`` by ``plan``: operands checked and contiguous, so the row
    strides are the widths (a stride read is a quarter microsecond of host time each). ``locks``: split-K counters
    (``triton_ops.decode_locks``); None: the plan's own. ``scales``: those of quantized ``values`` (codes in the
    kernel's layout, as the plan's ``QUANT`` says)."""
    m, k = x.shape
    n = values.shape[0]
    if plan.rotate_first:
        x, rotation = apply_rotation(x, rotation).contiguous(), None
    if plan.max_splits > 1:
        ws = x.new_empty((plan.max_splits, m, n), dtype=torch.float32)
        if locks is None:
            locks = plan.counters(triton_plan.capturing(x.device))
        else:
            locks = checked_locks(locks, x.device, plan.lock_tiles)
    else:
        ws = locks = out  # placeholders: an unsplit launch never touches them
    args = (x, values, meta, x if scales is None else scales, x if rotation is None else rotation,
            out if bias is None else bias, out, ws, locks, m, n, k, plan.m_bucket, k, values.shape[1], (k + 31) // 32, n)
    if plan.device is not None and plan.device != torch.cuda.current_device():
        with torch.cuda.device(plan.device):
            _launch_compiled(plan, args)
    else:
        _launch_compiled(plan, args)


def _launch_compiled(plan: LaunchPlan, args: tuple) -> None:
    """The compiled launch of this specialisation; the first time, :func:`_compile` it (which runs it)."""
    run = plan.launches.get(specialisation(args))
    if run is None:
        _compile(plan, args)
        return
    bm, tiles_n, split = plan.grid
    run(cdiv(args[_M], bm) * tiles_n, split, plan.stream(), *args)


def _compile(plan: LaunchPlan, args: tuple) -> None:
    """Run ``args`` through Triton, which compiles: the autotuner the first time the plan runs, its choice after
    that; keep the compiled kernel's launch for the next call of this specialisation. Never inside a capture: the
    autotuner's benchmark launches would be captured, and compiling there fails."""
    x, m = args[0], args[_M]
    if triton_plan.capturing(x.device):  # through the module: tests fake a capture there
        raise RuntimeError(uncompiled(m, plan.m_bucket, "no compiled kernel for this specialisation "
                                                        f"({_describe(specialisation(args))})"))
    grid = plan.grid_of(m)
    if plan.config is None:
        compiled = plan.tuner[grid](*args, **plan.constexprs)
        plan.use(plan.tuner.best_config)
    else:
        compiled = plan.tuner.fn.run(*args, grid=grid, warmup=False, **plan.constexprs, **plan.config.all_kwargs())
    constexprs = _constexprs({**plan.constexprs, **plan.config.kwargs}, len(args))
    plan.launches[specialisation(args)] = direct_launch(compiled, constexprs) or _jit_launch(plan)


def _jit_launch(plan: LaunchPlan) -> Callable:
    """``kernel[grid]`` with the plan's config, as a launch of :func:`direct_launch`'s signature (Triton reads the
    current stream itself)."""
    kernel, kw = plan.tuner.fn, {**plan.constexprs, **plan.config.all_kwargs()}

    def run(grid_0: int, grid_1: int, stream: int, *args) -> None:
        kernel[grid_0, grid_1](*args, **kw)

    return run


_M, _ROT, _BIAS = 9, 4, 5  # positions of M, R and the bias in the kernel's arguments


def specialisation(args: tuple) -> tuple:
    """What Triton specialises a compiled kernel on that may differ between two calls of one plan: M equal to 1
    or a multiple of 16, and the 16-byte alignment of the tensors passed in (x, R, bias). The layer's layout
    (scales included) and counters are fixed, the output and workspace fresh from the allocator, the other
    integers the plan's."""
    m = args[_M]
    return m == 1, m % 16 == 0, args[0].data_ptr() % 16, args[_ROT].data_ptr() % 16, args[_BIAS].data_ptr() % 16


def bucket_rows(m: int) -> tuple[int, ...]:
    """Row counts whose launches reach every M specialisation of ``m``'s bucket (``(B/2, B]``): its smallest
    (1 for B = 1; never a multiple of 16 above that) and its largest (a multiple of 16 from B = 16)."""
    bucket = m_bucket(m)
    return tuple(sorted({bucket // 2 + 1, bucket}))


def _describe(spec: tuple) -> str:
    return f"M == 1: {spec[0]}, M % 16 == 0: {spec[1]}, x, R, bias at 16-byte offsets {spec[2:]}"


def checked_locks(locks, device, tiles: int) -> torch.Tensor:
    if locks.dtype != torch.int32 or locks.device != device or locks.numel() < tiles:
        raise ShapeError(f"sparse24: locks must be int32 with >= {tiles} elements on {device} (see decode_locks), "
                         f"got {locks.dtype} [{locks.numel()}] on {locks.device}")
    return locks


def _constexprs(values: dict, runtime: int) -> tuple:
    """The kernel's parameters after its ``runtime`` ones, in order: from ``values``, else their defaults (a
    compiled kernel's launcher takes every parameter, constexprs included)."""
    return tuple(values.get(name, default) for name, default in _params()[runtime:])


@functools.cache
def _params() -> tuple:
    """(name, default) of every kernel parameter, in order."""
    params = inspect.signature(kernels().sparse24_matmul_kernel.fn).parameters.values()
    return tuple((q.name, q.default) for q in params)


def _active(hook) -> bool:
    return hook is not None and bool(getattr(hook, "calls", True))  # a HookChain with no hooks is inactive


def direct_launch(compiled, constexprs: tuple, hooks=None) -> Optional[Callable]:
    """``launch(grid_0, grid_1, stream, *args)``: runs ``compiled`` on ``stream`` with the runtime arguments
    ``args`` followed by ``constexprs`` (the values of the kernel's constexpr parameters, in signature order).
    ``hooks``: where the launch hooks live (default ``triton.knobs.runtime``), read per call."""
    try:
        run = compiled.run  # first: loads the module, which sets ``function``
        function, packed = compiled.function, compiled.packed_metadata
    except AttributeError:
        return None
    if hooks is None:
        from triton import knobs

        hooks = knobs.runtime

    def launch(grid_0: int, grid_1: int, stream: int, *args) -> None:
        args += constexprs
        enter, leave = hooks.launch_enter_hook, hooks.launch_exit_hook
        if _active(enter) or _active(leave):
            meta = compiled.launch_metadata((grid_0, grid_1, 1), stream, *args)
            run(grid_0, grid_1, 1, stream, function, packed, meta, enter, leave, *args)
        else:
            run(grid_0, grid_1, 1, stream, function, packed, None, None, None, *args)

    return launch

"""Launch a compiled Triton kernel without ``JITFunction.run``.

``kernel[grid](...)`` binds the arguments, computes the specialisation key, looks the kernel up, builds the
launch metadata and (autotuned) computes the autotuner's key: tens of microseconds of Python per call that a
prepared layer has already decided. :func:`direct_launch` keeps only the final launcher call.

Triton 3.6 through 3.9 launch a ``CompiledKernel`` the same way (``compiler/compiler.py``, ``runtime/jit.py``):
``compiled.run`` (a property that loads the module on first use) is the driver's launcher, called as
``run(grid_0, grid_1, grid_2, stream, compiled.function, compiled.packed_metadata, launch_metadata,
launch_enter_hook, launch_exit_hook, *every_parameter)``, constexprs included (the launcher skips them). The
hooks are ``HookChain``s (``triton.knobs.runtime``), never None; the launcher calls them only when not None, and
``launch_metadata`` only matters to them, so both are skipped while no hook is installed (profilers add them).
A compiled object without these attributes gets no direct launch (None): the caller keeps ``kernel[grid]``.
"""
from __future__ import annotations

from typing import Callable, Optional


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

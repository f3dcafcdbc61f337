"""Pluggable execution backends for :class:`~sparse_runtime.SparseLinear`.

A backend turns the canonical compressed weight into whatever layout it runs
(``prepare``, at load time or after a device/dtype move) and executes the
layer (``forward``). Backends register themselves by name; ``"auto"`` takes
the highest-priority one that is available on the layer's device and supports
the layer, and ``reference`` (decompress + ``F.linear``) supports everything,
so ``auto`` never fails where ``reference`` works.
"""
from __future__ import annotations

import importlib

import torch

from ..errors import BackendUnavailable


class Backend:
    """Base class. Subclasses set ``name`` and ``priority`` and override the hooks."""

    name: str = ""
    priority: int = 0  # "auto" prefers higher
    # Device types on which "auto" may pick this backend. A backend can still be
    # usable elsewhere by name (e.g. Triton kernels on the CPU interpreter, for tests).
    auto_devices: tuple[str, ...] = ("cuda",)
    max_m: int | None = None  # the most rows of x per call, where the backend has a limit (decode kernels)

    def unavailable(self, device: torch.device) -> str | None:
        """Why this backend cannot run on ``device``, or None if it can."""
        return None

    def unsupported(self, layer) -> str | None:
        """Why this backend cannot run ``layer`` (pattern, dtype, shape), or None."""
        return None

    def prepare(self, layer):
        """Derive this backend's layout from the layer's canonical tensors."""
        return None

    def forward(self, layer, state, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


_REGISTRY: dict[str, Backend] = {}
_IMPORT_ERRORS: dict[str, str] = {}
_TRIED: set[str] = set()
# Modules that register backends; a failing import makes that backend unavailable, not the package.
_MODULES = ("reference", "decompressed", "triton", "cusparselt", "torch_semi", "mmasp", "dispatch")


def register(backend: Backend) -> Backend:
    _REGISTRY[backend.name] = backend
    return backend


def _load_all() -> None:
    for mod in _MODULES:
        if mod in _TRIED:
            continue
        _TRIED.add(mod)
        try:
            importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{mod}":
                _IMPORT_ERRORS[mod] = f"import failed: {e}"
        except Exception as e:  # a broken optional backend must not break the package
            _IMPORT_ERRORS[mod] = f"import failed: {type(e).__name__}: {e}"


def names() -> list[str]:
    _load_all()
    return sorted(_REGISTRY, key=lambda n: -_REGISTRY[n].priority)


def get(name: str) -> Backend:
    _load_all()
    if name not in _REGISTRY:
        known = ", ".join(["auto", *names()])
        why = f" ({_IMPORT_ERRORS[name]})" if name in _IMPORT_ERRORS else ""
        raise BackendUnavailable(f"unknown backend {name!r}{why}; known: {known}")
    return _REGISTRY[name]


def availability(device: torch.device | str = "cpu") -> dict[str, str | None]:
    """Every known backend -> None if it can run on ``device``, else the reason."""
    device = torch.device(device)
    out = {n: _REGISTRY[n].unavailable(device) for n in names()}
    out.update({m: err for m, err in _IMPORT_ERRORS.items() if m not in out})
    return out


def resolve(name: str, layer) -> Backend:
    """The backend that will run ``layer``: ``name`` itself, checked, or the best for ``"auto"``."""
    device = layer.weight_values.device
    if name != "auto":
        backend = get(name)
        why = backend.unavailable(device) or backend.unsupported(layer)
        if why:
            raise BackendUnavailable(f"backend {name!r} cannot run {layer.describe()}: {why}")
        return backend
    for n in names():
        backend = _REGISTRY[n]
        if device.type not in backend.auto_devices:
            continue
        if backend.unavailable(device) is None and backend.unsupported(layer) is None:
            return backend
    raise BackendUnavailable(f"no backend can run {layer.describe()}")

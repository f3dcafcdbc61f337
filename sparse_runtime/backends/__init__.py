"""Pluggable execution backends for :class:`~sparse_runtime.SparseLinear`.

A backend turns the canonical compressed weight into whatever layout it runs
(``prepare``, at load time or after a device/dtype move) and executes the
layer (``forward``). Backends register themselves by name; ``"auto"`` takes
the highest-priority one that is available on the layer's device and supports
the layer, and ``reference`` (decompress + ``F.linear``) supports everything,
so ``auto`` never fails where ``reference`` works. Layers with quantized values run only where a
backend's table lists their scheme (``reference`` and ``decompressed``, which dequantize once per call or
at load; ``cpu`` and ``triton``, which dequantize in registers); the others refuse them, so ``auto`` falls
back and ``sparse-runtime info`` says why.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

from ..errors import BackendUnavailable
from ..format.codec import dtype_name, unsupported_dtype, unsupported_pattern


@dataclass(frozen=True)
class Capabilities:
    """What a backend takes, declared once per backend class. ``Backend.unsupported`` and ``unavailable`` check
    it, ``dispatch`` and ``sparse-runtime info`` read it, and :meth:`refusal` words every refusal from it.
    ``None``: no limit."""

    dtypes: tuple[torch.dtype, ...] | None = None  # weight dtypes (None: every dtype the format stores)
    patterns: tuple[str, ...] | None = None  # sparsity patterns (None: every pattern)
    devices: tuple[str, ...] | None = None  # device types it runs on (None: any)
    auto_devices: tuple[str, ...] = ()  # device types on which "auto" may pick it
    max_m: int | None = None  # the most rows of x per call (decode kernels)
    quant: tuple[str, ...] = ()  # quantization schemes of the values it takes (none: full-precision only)

    def refusal(self, dtype: torch.dtype | None = None, pattern: str | None = None, m: int | None = None,
                device: torch.device | None = None, quant: str | None = None) -> str | None:
        """Why a layer of ``dtype`` and ``pattern`` (with values quantized by the scheme named ``quant``), a call
        of ``m`` rows, or a ``device`` is outside this table, or None: the one place these refusals are worded."""
        if m is not None and self.max_m is not None and m > self.max_m:
            return f"takes M <= {self.max_m} rows per call, got M={m}"
        if device is not None and self.devices is not None and device.type not in self.devices:
            return f"runs on {'/'.join(d.upper() for d in self.devices)} devices, not {device.type}"
        if pattern is not None and self.patterns is not None:
            why = unsupported_pattern(pattern, self.patterns)
            if why:
                return why
        if quant is not None and quant not in self.quant:
            return f"unsupported quantization {quant}; supported: {', '.join(self.quant) or 'none'}"
        if dtype is not None and self.dtypes is not None:
            return unsupported_dtype(dtype, self.dtypes)
        return None

    def table(self) -> dict[str, str]:
        """The row ``sparse-runtime info`` prints: each field as text (``-`` for no limit)."""
        def text(v, fmt=str):
            return "-" if v is None else ", ".join(map(fmt, v)) or "none"
        return {"dtypes": text(self.dtypes, dtype_name), "patterns": text(self.patterns), "quant": text(self.quant),
                "devices": text(self.devices), "auto": text(self.auto_devices),
                "max_m": "-" if self.max_m is None else str(self.max_m)}


class Backend:
    """Base class. Subclasses set ``name``, ``priority`` and ``capabilities`` and override the hooks; they
    override ``unsupported``/``unavailable`` only for conditions the table cannot state (shapes, libraries)."""

    name: str = ""
    priority: int = 0  # "auto" prefers higher
    autocasts: bool = False  # its forward follows torch.autocast (F.linear on the weight): else x comes in its dtype
    capabilities: Capabilities = Capabilities()

    def unavailable(self, device: torch.device) -> str | None:
        """Why this backend cannot run on ``device``, or None if it can."""
        return self.capabilities.refusal(device=torch.device(device))

    def unsupported(self, layer, m: int | None = None) -> str | None:
        """Why this backend cannot run ``layer`` (pattern, dtype, shape), or a call of ``m`` rows of it; or None."""
        quant = None if layer.quant is None else layer.quant.name
        return self.capabilities.refusal(dtype=layer.dtype, pattern=layer.pattern, m=m, quant=quant)

    def prepare(self, layer):
        """Derive this backend's layout from the layer's canonical tensors."""
        return None

    def forward(self, layer, state, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


_REGISTRY: dict[str, Backend] = {}
_IMPORT_ERRORS: dict[str, str] = {}
_TRIED: set[str] = set()
# Modules that register backends; a failing import makes that backend unavailable, not the package. The
# backend named "torch" lives in torch_semi: a submodule named torch would, once imported, replace the torch
# library in this package's namespace (importing a submodule binds it as an attribute of its package).
_MODULES = ("reference", "decompressed", "cpu", "triton", "cusparselt", "torch_semi", "mmasp", "dispatch")


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


def capabilities() -> dict[str, Capabilities]:
    """Every registered backend's table, best first."""
    return {n: _REGISTRY[n].capabilities for n in names()}


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
        if device.type not in backend.capabilities.auto_devices:
            continue
        if backend.unavailable(device) is None and backend.unsupported(layer) is None:
            return backend
    raise BackendUnavailable(f"no backend can run {layer.describe()}")

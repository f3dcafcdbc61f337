"""Torch-facing wrappers of the compiled and Triton kernels, and the machine they run on.

One module per kernel family (``triton_ops``, ``cusparselt``, ``mmasp``, ``cpu24``): each checks its inputs,
derives its layout from the canonical format and launches, and is the only importer of its compiled
extension. ``devices``, ``caches`` and ``timing`` say what the device is, where results are cached and how
kernels are timed. It imports the format and ``kernels/``; never backends, ``nn`` modules or pruning."""

"""Torch-facing wrappers of the compiled and Triton kernels."""

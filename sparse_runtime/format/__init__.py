"""The canonical sparse format: what a compressed weight is, on disk and in memory.

``codec`` compresses and decompresses N:M and unstructured weights (half the values plus 2-bit in-group
indices for 2:4) and owns the pattern grammar; ``quant`` owns the quantization schemes of values (int8, int4,
fp8), their arithmetic and stored codes; ``masks`` makes and checks keep-masks; ``rotation`` checks and
applies the orthogonal input rotation a layer may carry. Pure tensor code: it imports torch and
:mod:`sparse_runtime.errors` only, never ``nn`` modules, kernels or backends."""

"""The modules users put in models: :class:`SparseLinear` (a compressed weight run by a backend) and
:func:`sparsify`, which swaps a model's ``nn.Linear`` layers for it. Imports the format, the backends and
the model-architecture knowledge; never the pruning package."""

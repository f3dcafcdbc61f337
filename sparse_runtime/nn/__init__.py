"""The modules users put in models: :class:`SparseLinear` (a compressed weight run by a backend) and
:func:`sparsify`, which swaps a model's ``nn.Linear`` layers for it; ``int8_dense``'s int8 embedding and lm_head
(``sparsify(head="int8")``) and dense int8 linears; ``fused_projections``, which runs the SparseLinears that read
one input (q/k/v, gate/up) as one call. Imports the format, the backends and the model-architecture
knowledge; never the pruning package."""

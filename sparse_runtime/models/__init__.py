"""Models in and out: what a decoder-only transformer looks like (``architecture``: its decoder layers and
which linears a pattern applies to), the rotations folded into its decoder layers (``residual_rotation``),
where a model comes from (``sources``: folders, checkpoints, GGUF files, named models), and the readers and
writers of each on-disk form (``checkpoint``, ``compressed_tensors``, ``tensor_files``, ``skeleton``,
``saving``, the transformers quantizer ``hf_quantizer``). Never imports the pruning package."""

"""Models in and out: what a decoder-only transformer looks like (``architecture``: its decoder layers and
which linears a pattern applies to), the rotations folded into its decoder layers (``residual_rotation``),
loading as one pipeline (``sources`` resolves a spec (folder, checkpoint, GGUF file, name) to the adapter of
its format; ``loading`` holds the steps all stored formats share, on ``skeleton`` and ``tensor_files``), the
formats themselves (``checkpoint``, ``compressed_tensors`` with its quantization configs
``compressed_tensors_quant`` and the ``marlin24`` layout), what plain transformers sees of them (``hf_config``,
the quantizer ``hf_quantizer``), the writers' shared atomic folder swap (``saving``) and the walk of a model one
decoder layer at a time that pruning and block-wise recovery share (``layer_walk``). Never imports the pruning
package."""

"""Text in: calibration and evaluation windows cut from real text (``calibration``) and the perplexity they
score (``perplexity``). Shared by the runtime's ``eval`` and the pruning front-end; imports no kernels."""

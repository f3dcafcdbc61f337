"""The benchmarks: one module per measurement, run from a source checkout's root as ``python -m benchmarks.NAME``
(``--help`` for each). They share ``common`` (report metadata, atomic JSON writes, the quality protocol's
arguments); each writes its JSON under ``results/``, and ``tables`` renders every table of the README and
docs/ from those files. Not part of the installed package: ``sparse-runtime bench`` imports the GPU suites
(``kernels``, ``prefill``) from here when it runs inside a checkout.
"""

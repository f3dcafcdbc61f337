"""Serving: the continuous-batching generation engine, streaming generation, the OpenAI-compatible ASGI
server and tensor parallelism over ``torch.distributed``. The top of the runtime: it may import any runtime
layer, never the pruning package."""

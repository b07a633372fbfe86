"""The metal backend: the Llama-family model in MLX over the same paged KV cache.

On Apple Silicon MLX runs it as Metal kernels; elsewhere (Linux CI) on MLX's
CPU build. Nothing in this package is imported unless the metal backend is
selected: ``backends.base`` loads ``backends.metal.backend`` lazily, and this
``__init__`` imports nothing, so a machine without MLX never touches it.

- ``attention.py``: cache write through the slot mapping, paged gather through
  the block table, ``mx.fast.scaled_dot_product_attention`` over the context;
- ``model.py``: embedding, RMSNorm, ``mx.fast.rope``, GQA projections, SwiGLU;
- ``sampler.py``: the cpu sampler's features, in MLX;
- ``backend.py``: ``MetalBackend``, the ``Backend`` protocol.
"""

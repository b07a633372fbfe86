"""The cuda backend: the shared Llama model on NVIDIA (and ROCm) GPUs.

Triton kernels (``backends.cuda.kernels``) for the paged KV cache write,
paged attention (one kernel for prefill, chunked prefill and decode, split-KV
for long contexts), fused RMSNorm + residual and rotary embedding; CUDA
graphs (``backends.cuda.graphs``) for decode steps (``full``) or everything
but attention (``piecewise``).

Nothing is imported here: ``import backends.cuda`` must work on a CPU-only
install. The backend itself is ``backends.cuda.backend:CUDABackend``.
"""

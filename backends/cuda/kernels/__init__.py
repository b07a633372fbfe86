"""Triton kernels of the cuda backend, one module per kernel.

=======================  =====================================================
module                   what
=======================  =====================================================
``reshape_and_cache``    write new K/V into their cache slots (``slot_mapping``)
``paged_attention``      attention of a flattened variable-length batch over
                         the paged cache: prefill, chunked prefill and decode
                         in one kernel, GQA heads together, split-KV
``merge_splits``         combine the split-KV partial results (log-sum-exp)
``rms_norm``             RMSNorm, optionally fused with the residual add
``rotary``               rotary embedding of q and k in place
=======================  =====================================================

Each module has the kernel, its launcher and a plain torch reference with the
launcher's signature (``*_ref``). Importing them needs triton but no GPU:
with ``TRITON_INTERPRET=1`` set before triton is imported, every kernel runs
on CPU tensors (that is how CI tests them). Nothing is imported here, so
``import backends.cuda.kernels`` works without triton.
"""

"""Triton kernels of the cuda backend, one module per kernel.

=======================  =====================================================
module                   what
=======================  =====================================================
``reshape_and_cache``    write new K/V into their cache slots (``slot_mapping``)
``paged_attention``      attention of a flattened variable-length batch over
                         the paged cache: prefill, chunked prefill and decode
                         in one kernel, GQA heads together, split-KV
``merge_splits``         combine the split-KV partial results (log-sum-exp)
``moe``                  grouped expert GEMMs of a mixture of experts (no host sync)
``rms_norm``             RMSNorm, optionally fused with the residual add
``rotary``               rotary embedding of q and k in place
``quant_matmul``         W4A16/W8A16 GEMM over group-quantized weights (the
                         affine layout of ``model.weights.quant``)
``launch``               ``KernelLaunch``: a launch prepared by ``*_launch``
``variants``             every compiled form of the kernels above a model uses
``aot``                  compile a variant for sm_90a without a GPU; registers
                         and spills from ptxas (``scripts/kernel_report.py``)
=======================  =====================================================

Each module has the kernel, its launcher and a plain torch reference with the
launcher's signature (``*_ref``). Importing them needs triton but no GPU:
with ``TRITON_INTERPRET=1`` set before triton is imported, every kernel runs
on CPU tensors (that is how CI tests them). Nothing is imported here, so
``import backends.cuda.kernels`` works without triton.
"""

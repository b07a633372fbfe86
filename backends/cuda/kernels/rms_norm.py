"""RMSNorm, optionally fused with the residual add that precedes it.

With ``residual``: ``residual <- x + residual`` (rounded to the model dtype,
as an eager add would) and ``out = rmsnorm(residual)``; without:
``out = rmsnorm(x)``. The norm follows HF ``LlamaRMSNorm``: normalise in
float32, round to the model dtype, then scale by the weight. A program
handles ``BLOCK_T`` token rows (one for wide models, several for narrow
ones); the fusion saves one read and one write of the hidden state per norm
(two per layer).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from backends.cuda.kernels.launch import KernelLaunch


@triton.jit(do_not_specialize=["num_tokens"])
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, eps, num_tokens,
    stride_x, stride_r, stride_o,
    HIDDEN: tl.constexpr, BLOCK: tl.constexpr, BLOCK_T: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)[:, None]   # [BT, 1]
    cols = tl.arange(0, BLOCK)[None, :]                                                  # [1, B]
    mask = (rows < num_tokens) & (cols < HIDDEN)
    x = tl.load(x_ptr + rows * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + rows * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(residual_ptr.dtype.element_ty)
        tl.store(residual_ptr + rows * stride_r + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 1) / HIDDEN + eps)                              # [BT]
    w = tl.load(weight_ptr + cols, mask=cols < HIDDEN, other=0.0).to(tl.float32)
    normed = (xf * rstd[:, None]).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + rows * stride_o + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """``out`` ``[T, hidden]`` = RMSNorm of ``x`` (or of ``x + residual``, stored back into ``residual``)."""
    num_tokens, hidden = x.shape
    if x.stride(1) != 1 or (residual is not None and (residual.shape != x.shape or residual.stride(1) != 1)):
        raise ValueError("x and residual must be [T, hidden] with a contiguous last dim")
    if out is None:
        out = torch.empty_like(x)
    if num_tokens == 0:
        return out
    rms_norm_launch(x, weight, eps, residual, out).run()
    return out


def rms_norm_launch(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None,
                    out: torch.Tensor) -> KernelLaunch:
    """The norm's launch: ``BLOCK_T`` rows (about 2048 elements) per program, a warp per 512 of them."""
    num_tokens, hidden = x.shape
    res = x if residual is None else residual
    block = triton.next_power_of_2(hidden)
    block_t = max(1, min(16, 2048 // block))
    return KernelLaunch(
        _rms_norm_kernel, (triton.cdiv(num_tokens, block_t),),
        (x, res, weight, out, eps, num_tokens, x.stride(0), res.stride(0), out.stride(0)),
        dict(HIDDEN=hidden, BLOCK=block, BLOCK_T=block_t, HAS_RESIDUAL=residual is not None,
             num_warps=min(16, max(1, block * block_t // 512))),
    )


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: an eager add, then the shared model's ``rms_norm``."""
    from backends.torch_model.model import rms_norm as model_rms_norm

    if residual is not None:
        residual.add_(x)
        x = residual
    result = model_rms_norm(x, weight, eps)                                      # [T, hidden]
    if out is None:
        return result
    out.copy_(result)
    return out

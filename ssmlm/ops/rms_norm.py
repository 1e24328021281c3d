"""Residual-add + RMSNorm in one Triton kernel (forward and backward), with the residual kept in fp32.

``add_rms_norm_ref`` is the specification: ``residual_out = x + residual`` (just x without a residual),
``out = residual_out / sqrt(mean(residual_out^2) + eps) * weight``; with ``residual_in_fp32`` the residual
stream is returned in fp32 whatever x's dtype (mamba_ssm's ``residual_in_fp32``), and ``out`` has ``out_dtype``
(default x's). One pass reads x (and the residual) and writes both outputs; the backward reads the saved fp32
residual_out and the per-row 1/rms, and takes a gradient for each output (the residual stream's flows on).
The weight gradient is summed per program in registers and over programs with ``torch.sum``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def add_rms_norm_ref(x, weight, residual=None, eps=1e-5, residual_in_fp32=True, out_dtype=None):
    """-> (out, residual_out or None without a residual). Computed in fp32 (fp64 for fp64 inputs)."""
    work = torch.promote_types(x.dtype, torch.float32)  # fp32, or fp64 for a float64 reference
    r = x.to(work) if residual is None else x.to(work) + residual.to(work)
    out = r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + eps) * weight.to(work)
    res_dtype = work if residual_in_fp32 else x.dtype
    return out.to(out_dtype or x.dtype), None if residual is None else r.to(res_dtype)


@triton.jit
def _add_rms_norm_fwd_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, rstd_ptr, n_rows, n_cols, eps,
    stride_x, stride_res, stride_out, stride_res_out,
    BLOCK_N: tl.constexpr, HAS_RESIDUAL: tl.constexpr, STORE_RESIDUAL: tl.constexpr,
):
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    for row in range(tl.program_id(0).to(tl.int64), n_rows, tl.num_programs(0)):
        r = tl.load(x_ptr + row * stride_x + cols, mask=col_mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            r += tl.load(res_ptr + row * stride_res + cols, mask=col_mask, other=0.0).to(tl.float32)
        if STORE_RESIDUAL:
            tl.store(res_out_ptr + row * stride_res_out + cols, r, mask=col_mask)
        rstd = 1.0 / tl.sqrt(tl.sum(r * r, axis=0) / n_cols + eps)
        tl.store(rstd_ptr + row, rstd)
        tl.store(out_ptr + row * stride_out + cols, r * rstd * w, mask=col_mask)


@triton.jit
def _add_rms_norm_bwd_kernel(
    res_ptr, rstd_ptr, w_ptr, dout_ptr, dres_out_ptr, dx_ptr, dw_partial_ptr, n_rows, n_cols,
    stride_res, stride_dout, stride_dres_out, stride_dx,
    BLOCK_N: tl.constexpr, HAS_DRES: tl.constexpr,
):
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    for row in range(tl.program_id(0).to(tl.int64), n_rows, tl.num_programs(0)):
        r = tl.load(res_ptr + row * stride_res + cols, mask=col_mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        dout = tl.load(dout_ptr + row * stride_dout + cols, mask=col_mask, other=0.0).to(tl.float32)
        r_hat = r * rstd
        dw += dout * r_hat
        g = dout * w
        dr = rstd * (g - r_hat * (tl.sum(g * r_hat, axis=0) / n_cols))
        if HAS_DRES:
            dr += tl.load(dres_out_ptr + row * stride_dres_out + cols, mask=col_mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + row * stride_dx + cols, dr, mask=col_mask)
    tl.store(dw_partial_ptr + tl.program_id(0) * n_cols + cols, dw, mask=col_mask)


def _n_programs(n_rows: int, device: torch.device) -> int:
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
    return max(1, min(n_rows, 8 * sms))


def _rows(t: torch.Tensor) -> torch.Tensor:
    # (..., n) -> (rows, n) with unit column stride; a view when possible
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


class AddRMSNormTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, residual, eps, residual_in_fp32, out_dtype):
        shape = x.shape
        x2 = _rows(x)
        res2 = _rows(residual) if residual is not None else None
        n_rows, n_cols = x2.shape
        res_dtype = torch.float32 if residual_in_fp32 else x.dtype
        out = torch.empty(n_rows, n_cols, device=x.device, dtype=out_dtype or x.dtype)
        # The residual stream is stored when it is an output or when it is needed for the backward (always
        # unless it is x itself in fp32, whose storage is then saved as it is).
        reuse_x = residual is None and x2.dtype == torch.float32
        res_out = x2 if reuse_x else torch.empty(n_rows, n_cols, device=x.device, dtype=torch.float32)
        rstd = torch.empty(n_rows, device=x.device, dtype=torch.float32)
        block_n = triton.next_power_of_2(n_cols)
        _add_rms_norm_fwd_kernel[(_n_programs(n_rows, x.device),)](
            x2, res2 if res2 is not None else x2, weight, out, res_out, rstd, n_rows, n_cols, eps,
            x2.stride(0), res2.stride(0) if res2 is not None else 0, out.stride(0), res_out.stride(0),
            BLOCK_N=block_n, HAS_RESIDUAL=res2 is not None, STORE_RESIDUAL=not reuse_x,
            num_warps=min(max(block_n // 256, 1), 16),
        )
        ctx.save_for_backward(res_out, rstd, weight)
        ctx.shape, ctx.x_dtype, ctx.has_residual = shape, x.dtype, residual is not None
        ctx.residual_dtype = residual.dtype if residual is not None else None
        out = out.view(shape)
        if residual is None:
            return out, None
        res_ret = res_out.view(shape) if res_dtype == torch.float32 else res_out.view(shape).to(res_dtype)
        return out, res_ret

    @staticmethod
    def backward(ctx, dout, dres_out):
        res_out, rstd, weight = ctx.saved_tensors
        n_rows, n_cols = res_out.shape
        dout2 = _rows(dout)
        dres2 = _rows(dres_out) if dres_out is not None else None
        dx = torch.empty(n_rows, n_cols, device=dout.device, dtype=ctx.x_dtype)
        n_prog = _n_programs(n_rows, dout.device)
        dw_partial = torch.empty(n_prog, n_cols, device=dout.device, dtype=torch.float32)
        block_n = triton.next_power_of_2(n_cols)
        _add_rms_norm_bwd_kernel[(n_prog,)](
            res_out, rstd, weight, dout2, dres2 if dres2 is not None else dout2, dx, dw_partial, n_rows, n_cols,
            res_out.stride(0), dout2.stride(0), dres2.stride(0) if dres2 is not None else 0, dx.stride(0),
            BLOCK_N=block_n, HAS_DRES=dres2 is not None, num_warps=min(max(block_n // 256, 1), 16),
        )
        dx = dx.view(ctx.shape)
        dres = dx.to(ctx.residual_dtype) if ctx.has_residual else None
        return dx, dw_partial.sum(0).to(weight.dtype), dres, None, None, None


def add_rms_norm(x, weight, residual=None, eps=1e-5, residual_in_fp32=True, out_dtype=None):
    """Triton residual-add + RMSNorm. x, residual: (..., n); weight (n,). Returns (out, residual_out); residual_out
    is None when no residual is given (the norm of x alone). Gradients for x, weight and residual."""
    return AddRMSNormTriton.apply(x, weight, residual, eps, residual_in_fp32, out_dtype)

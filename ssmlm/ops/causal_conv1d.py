"""Causal depthwise conv1d + SiLU in Triton: forward, backward and the single-step (decoding) update.

``causal_conv1d_ref`` is the specification: per channel d, ``out[t] = act(bias[d] + sum_k w[d, k] x[t - (W-1) + k])``
with x = 0 before the first step (W the kernel width), i.e. ``F.conv1d(x, w[:, None], bias, padding=W-1,
groups=dim)[..., :L]``. The kernels compute in fp32 and accept any batch/channel/time strides for x and for the
outputs, so a Mamba mixer can hand them a slice of its in_proj output and ask for the layout its next matmul reads.

* forward: a program computes a (channels, steps) tile; the W shifted input tiles are re-read through L1.
* backward: a program owns a block of channels of one batch row over ``BWD_TILES`` time tiles; the weight and
  bias gradients (sums over time) stay in registers and are added once per program. The gradient of the
  pre-activation at t + j (j < W) is recomputed from x for every output tile rather than stored.
* update: one step for decoding, ``out = act(bias + <w, [state, x]>)``, with the new state (the last W-1 inputs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ssmlm.ops.triton_scan import _sigmoid


def causal_conv1d_ref(x, weight, bias=None, silu=True, initial_state=None):
    """x (batch, dim, L), weight (dim, W), bias (dim,), initial_state (batch, dim, W-1) the inputs before
    the first step (zeros if None). Computed in fp32, returned in x's dtype."""
    width = weight.shape[-1]
    history = (x.new_zeros(x.shape[0], x.shape[1], width - 1) if initial_state is None
               else initial_state.to(x.dtype))
    work = torch.promote_types(x.dtype, torch.float32)  # fp32, or fp64 for a float64 reference
    xp = torch.cat([history, x], dim=-1).to(work)
    weight = weight.reshape(x.shape[1], 1, width).to(work)
    out = F.conv1d(xp, weight, None if bias is None else bias.to(work), groups=x.shape[1])
    return (F.silu(out) if silu else out).to(x.dtype)


def causal_conv1d_update_ref(x, conv_state, weight, bias=None, silu=True):
    """One step: x (batch, dim), conv_state (batch, dim, W-1) -> (out (batch, dim), new conv_state)."""
    window = torch.cat([conv_state.to(x.dtype), x[..., None]], dim=-1)
    work = torch.promote_types(x.dtype, torch.float32)
    out = (window.to(work) * weight.reshape(x.shape[1], -1).to(work)).sum(-1)
    if bias is not None:
        out = out + bias.to(work)
    out = F.silu(out) if silu else out
    return out.to(x.dtype), window[..., 1:]


@triton.jit
def _conv_at(x_rows, w_rows, bias, t, shift, channel_mask, L, stride_x_l, W: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Pre-activation at steps t + shift: bias + sum_k w[k] x[t + shift - (W-1) + k], fp32, (BLOCK_D, BLOCK_L)."""
    acc = tl.zeros([w_rows.shape[0], t.shape[0]], dtype=tl.float32)
    for k in tl.static_range(W):
        src = t + shift - (W - 1) + k
        m = channel_mask[:, None] & ((src >= 0) & (src < L))[None, :]
        xk = tl.load(x_rows + src[None, :] * stride_x_l, mask=m, other=0.0).to(tl.float32)
        wk = tl.load(w_rows + k, mask=channel_mask, other=0.0).to(tl.float32)
        acc += wk[:, None] * xk
    if HAS_BIAS:
        acc += bias[:, None]
    return acc


@triton.jit
def _conv_fwd_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, dim, L,
    stride_x_b, stride_x_d, stride_x_l, stride_w_d, stride_o_b, stride_o_d, stride_o_l,
    W: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
):
    pid_l, pid_d, batch = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    channels = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    channel_mask = channels < dim
    t = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    x_rows = x_ptr + batch * stride_x_b + channels[:, None] * stride_x_d
    w_rows = w_ptr + channels * stride_w_d
    bias = tl.load(b_ptr + channels, mask=channel_mask, other=0.0).to(tl.float32) if HAS_BIAS else None
    acc = _conv_at(x_rows, w_rows, bias, t, 0, channel_mask, L, stride_x_l, W, HAS_BIAS)
    if SILU:
        acc = acc * _sigmoid(acc)
    out = out_ptr + batch * stride_o_b + channels[:, None] * stride_o_d + t[None, :] * stride_o_l
    tl.store(out, acc, mask=channel_mask[:, None] & (t < L)[None, :])


@triton.jit
def _conv_bwd_kernel(
    x_ptr, w_ptr, b_ptr, dout_ptr, dx_ptr, dw_ptr, db_ptr, dim, L,
    stride_x_b, stride_x_d, stride_x_l, stride_w_d, stride_g_b, stride_g_d, stride_g_l,
    stride_dx_b, stride_dx_d, stride_dx_l,
    W: tl.constexpr, W_POW2: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, TILES: tl.constexpr,
    HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
):
    pid_l, pid_d, batch = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    channels = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    channel_mask = channels < dim
    steps = tl.arange(0, BLOCK_L)
    taps = tl.arange(0, W_POW2)[None, :]
    x_rows = x_ptr + batch * stride_x_b + channels[:, None] * stride_x_d
    g_rows = dout_ptr + batch * stride_g_b + channels[:, None] * stride_g_d
    dx_rows = dx_ptr + batch * stride_dx_b + channels[:, None] * stride_dx_d
    w_rows = w_ptr + channels * stride_w_d
    bias = tl.load(b_ptr + channels, mask=channel_mask, other=0.0).to(tl.float32) if HAS_BIAS else None
    dw = tl.zeros([BLOCK_D, W_POW2], dtype=tl.float32)
    db = tl.zeros([BLOCK_D], dtype=tl.float32)
    for tile in range(TILES):
        t = (pid_l * TILES + tile) * BLOCK_L + steps
        dx = tl.zeros([BLOCK_D, BLOCK_L], dtype=tl.float32)
        # out[t + j] depends on x[t] through w[W-1-j]: dx[t] = sum_j w[W-1-j] dpre[t + j]
        for j in tl.static_range(W):
            src = t + j
            m = channel_mask[:, None] & (src < L)[None, :]
            g = tl.load(g_rows + src[None, :] * stride_g_l, mask=m, other=0.0).to(tl.float32)
            if SILU:
                g = _silu_grad(g, _conv_at(x_rows, w_rows, bias, t, j, channel_mask, L, stride_x_l, W, HAS_BIAS))
            wj = tl.load(w_rows + (W - 1 - j), mask=channel_mask, other=0.0).to(tl.float32)
            dx += wj[:, None] * g
            if j == 0:  # the pre-activation gradient of this tile's own steps: dw and db
                if HAS_BIAS:
                    db += tl.sum(g, axis=1)
                for k in tl.static_range(W):
                    xsrc = t - (W - 1) + k
                    xm = channel_mask[:, None] & ((xsrc >= 0) & (xsrc < L))[None, :]
                    xk = tl.load(x_rows + xsrc[None, :] * stride_x_l, mask=xm, other=0.0).to(tl.float32)
                    dw += tl.where(taps == k, tl.sum(g * xk, axis=1)[:, None], 0.0)
        tl.store(dx_rows + t[None, :] * stride_dx_l, dx, mask=channel_mask[:, None] & (t < L)[None, :])
    tl.atomic_add(dw_ptr + channels[:, None] * W + taps, dw, mask=channel_mask[:, None] & (taps < W), sem="relaxed")
    if HAS_BIAS:
        tl.atomic_add(db_ptr + channels, db, mask=channel_mask, sem="relaxed")


@triton.jit
def _silu_grad(g, pre):
    sig = _sigmoid(pre)
    return g * sig * (1.0 + pre * (1.0 - sig))


@triton.jit
def _load_shifted(rows, t, shift, channel_mask, L, stride_l):
    src = t + shift
    m = channel_mask[:, None] & ((src >= 0) & (src < L))[None, :]
    return tl.load(rows + src[None, :] * stride_l, mask=m, other=0.0).to(tl.float32)


@triton.jit
def _conv_bwd_w4_kernel(
    x_ptr, w_ptr, b_ptr, dout_ptr, dx_ptr, dw_ptr, db_ptr, dim, L,
    stride_x_b, stride_x_d, stride_x_l, stride_w_d, stride_g_b, stride_g_d, stride_g_l,
    stride_dx_b, stride_dx_d, stride_dx_l,
    BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, TILES: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """_conv_bwd_kernel for width 4 with SiLU, written out: the 7 shifted input tiles are loaded once and shared
    by the 4 pre-activations the tile's dx needs, and dw/db accumulate elementwise (one reduction per program)."""
    pid_l, pid_d, batch = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    channels = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    channel_mask = channels < dim
    cm = channel_mask
    steps = tl.arange(0, BLOCK_L)
    x_rows = x_ptr + batch * stride_x_b + channels[:, None] * stride_x_d
    g_rows = dout_ptr + batch * stride_g_b + channels[:, None] * stride_g_d
    dx_rows = dx_ptr + batch * stride_dx_b + channels[:, None] * stride_dx_d
    w0 = tl.load(w_ptr + channels * stride_w_d + 0, mask=cm, other=0.0).to(tl.float32)[:, None]
    w1 = tl.load(w_ptr + channels * stride_w_d + 1, mask=cm, other=0.0).to(tl.float32)[:, None]
    w2 = tl.load(w_ptr + channels * stride_w_d + 2, mask=cm, other=0.0).to(tl.float32)[:, None]
    w3 = tl.load(w_ptr + channels * stride_w_d + 3, mask=cm, other=0.0).to(tl.float32)[:, None]
    bias = tl.load(b_ptr + channels, mask=cm, other=0.0).to(tl.float32)[:, None] if HAS_BIAS else 0.0
    dw0 = tl.zeros([BLOCK_D, BLOCK_L], dtype=tl.float32)
    dw1 = tl.zeros([BLOCK_D, BLOCK_L], dtype=tl.float32)
    dw2 = tl.zeros([BLOCK_D, BLOCK_L], dtype=tl.float32)
    dw3 = tl.zeros([BLOCK_D, BLOCK_L], dtype=tl.float32)
    db = tl.zeros([BLOCK_D, BLOCK_L], dtype=tl.float32)
    for tile in range(TILES):
        t = (pid_l * TILES + tile) * BLOCK_L + steps
        xm3 = _load_shifted(x_rows, t, -3, channel_mask, L, stride_x_l)
        xm2 = _load_shifted(x_rows, t, -2, channel_mask, L, stride_x_l)
        xm1 = _load_shifted(x_rows, t, -1, channel_mask, L, stride_x_l)
        x0 = _load_shifted(x_rows, t, 0, channel_mask, L, stride_x_l)
        xp1 = _load_shifted(x_rows, t, 1, channel_mask, L, stride_x_l)
        xp2 = _load_shifted(x_rows, t, 2, channel_mask, L, stride_x_l)
        xp3 = _load_shifted(x_rows, t, 3, channel_mask, L, stride_x_l)
        # pre-activation gradients at t, t+1, t+2, t+3 (0 past the end: the loaded dout is 0 there)
        g0 = _silu_grad(_load_shifted(g_rows, t, 0, channel_mask, L, stride_g_l),
                        bias + w0 * xm3 + w1 * xm2 + w2 * xm1 + w3 * x0)
        g1 = _silu_grad(_load_shifted(g_rows, t, 1, channel_mask, L, stride_g_l),
                        bias + w0 * xm2 + w1 * xm1 + w2 * x0 + w3 * xp1)
        g2 = _silu_grad(_load_shifted(g_rows, t, 2, channel_mask, L, stride_g_l),
                        bias + w0 * xm1 + w1 * x0 + w2 * xp1 + w3 * xp2)
        g3 = _silu_grad(_load_shifted(g_rows, t, 3, channel_mask, L, stride_g_l),
                        bias + w0 * x0 + w1 * xp1 + w2 * xp2 + w3 * xp3)
        tl.store(dx_rows + t[None, :] * stride_dx_l, w3 * g0 + w2 * g1 + w1 * g2 + w0 * g3,
                 mask=cm[:, None] & (t < L)[None, :])
        dw0 += g0 * xm3
        dw1 += g0 * xm2
        dw2 += g0 * xm1
        dw3 += g0 * x0
        db += g0
    dw_rows = dw_ptr + channels * 4
    tl.atomic_add(dw_rows + 0, tl.sum(dw0, axis=1), mask=cm, sem="relaxed")
    tl.atomic_add(dw_rows + 1, tl.sum(dw1, axis=1), mask=cm, sem="relaxed")
    tl.atomic_add(dw_rows + 2, tl.sum(dw2, axis=1), mask=cm, sem="relaxed")
    tl.atomic_add(dw_rows + 3, tl.sum(dw3, axis=1), mask=cm, sem="relaxed")
    if HAS_BIAS:
        tl.atomic_add(db_ptr + channels, tl.sum(db, axis=1), mask=cm, sem="relaxed")


@triton.jit
def _conv_update_kernel(
    x_ptr, state_ptr, w_ptr, b_ptr, out_ptr, new_state_ptr, dim,
    stride_x_b, stride_x_d, stride_s_b, stride_s_d, stride_s_k, stride_w_d, stride_o_b, stride_o_d,
    stride_n_b, stride_n_d, stride_n_k,
    W: tl.constexpr, W_POW2: tl.constexpr, BLOCK_D: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
):
    pid_d, batch = tl.program_id(0), tl.program_id(1).to(tl.int64)
    channels = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    channel_mask = channels < dim
    taps = tl.arange(0, W_POW2)[None, :]
    # the window [state_0 .. state_{W-2}, x]
    in_state = channel_mask[:, None] & (taps < W - 1)
    window = tl.load(state_ptr + batch * stride_s_b + channels[:, None] * stride_s_d + taps * stride_s_k,
                     mask=in_state, other=0.0)
    x = tl.load(x_ptr + batch * stride_x_b + channels * stride_x_d, mask=channel_mask, other=0.0)
    window = tl.where(taps == W - 1, x[:, None].to(window.dtype), window)
    w = tl.load(w_ptr + channels[:, None] * stride_w_d + taps, mask=channel_mask[:, None] & (taps < W), other=0.0)
    acc = tl.sum(window.to(tl.float32) * w.to(tl.float32), axis=1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + channels, mask=channel_mask, other=0.0).to(tl.float32)
    if SILU:
        acc = acc * _sigmoid(acc)
    tl.store(out_ptr + batch * stride_o_b + channels * stride_o_d, acc, mask=channel_mask)
    # new state slot k holds window slot k + 1: load the shifted window once more (registers cannot shift)
    shifted = taps + 1
    nxt = tl.load(state_ptr + batch * stride_s_b + channels[:, None] * stride_s_d + shifted * stride_s_k,
                  mask=channel_mask[:, None] & (shifted < W - 1), other=0.0)
    nxt = tl.where(shifted == W - 1, x[:, None].to(nxt.dtype), nxt)
    tl.store(new_state_ptr + batch * stride_n_b + channels[:, None] * stride_n_d + taps * stride_n_k, nxt,
             mask=channel_mask[:, None] & (taps < W - 1))


FWD_BLOCK_D, FWD_BLOCK_L = 16, 128
BWD_BLOCK_D, BWD_BLOCK_L = 8, 128
BWD_TILES = 4  # time tiles per backward program: enough programs to fill the GPU, few atomics for dw and db


def conv_forward(x, weight, bias, silu=True, out=None):
    """Launch the forward kernel: x (batch, dim, L) any strides -> out (batch, dim, L) (given, or new)."""
    batch, dim, L = x.shape
    width = weight.shape[-1]
    weight = weight.reshape(dim, width).contiguous()
    out = torch.empty(batch, dim, L, device=x.device, dtype=x.dtype) if out is None else out
    grid = (triton.cdiv(L, FWD_BLOCK_L), triton.cdiv(dim, FWD_BLOCK_D), batch)
    _conv_fwd_kernel[grid](
        x, weight, bias if bias is not None else weight, out, dim, L,
        *x.stride(), weight.stride(0), *out.stride(),
        W=width, BLOCK_D=FWD_BLOCK_D, BLOCK_L=FWD_BLOCK_L, HAS_BIAS=bias is not None, SILU=silu, num_warps=4,
    )
    return out


def conv_backward(x, weight, bias, dout, silu=True, dx=None):
    """Launch the backward kernel. Returns (dx in x's dtype, dweight fp32 (dim, W), dbias fp32 or None)."""
    batch, dim, L = x.shape
    width = weight.shape[-1]
    weight = weight.reshape(dim, width).contiguous()
    dx = torch.empty(batch, dim, L, device=x.device, dtype=x.dtype) if dx is None else dx
    dw = torch.zeros(dim, width, device=x.device, dtype=torch.float32)
    db = torch.zeros(dim, device=x.device, dtype=torch.float32) if bias is not None else None
    tiles = triton.cdiv(L, BWD_BLOCK_L * BWD_TILES)
    grid = (tiles, triton.cdiv(dim, BWD_BLOCK_D), batch)
    if width == 4 and silu:  # Mamba's conv: the written-out kernel
        _conv_bwd_w4_kernel[grid](
            x, weight, bias if bias is not None else weight, dout, dx, dw, db if db is not None else dw, dim, L,
            *x.stride(), weight.stride(0), *dout.stride(), *dx.stride(),
            BLOCK_D=BWD_BLOCK_D, BLOCK_L=BWD_BLOCK_L, TILES=BWD_TILES, HAS_BIAS=bias is not None, num_warps=4,
        )
        return dx, dw, db
    _conv_bwd_kernel[grid](
        x, weight, bias if bias is not None else weight, dout, dx, dw, db if db is not None else dw, dim, L,
        *x.stride(), weight.stride(0), *dout.stride(), *dx.stride(),
        W=width, W_POW2=triton.next_power_of_2(width), BLOCK_D=BWD_BLOCK_D, BLOCK_L=BWD_BLOCK_L, TILES=BWD_TILES,
        HAS_BIAS=bias is not None, SILU=silu, num_warps=4,
    )
    return dx, dw, db


class CausalConv1dTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, silu):
        ctx.save_for_backward(x, weight, bias)
        ctx.silu = silu
        return conv_forward(x, weight, bias, silu)

    @staticmethod
    def backward(ctx, dout):
        x, weight, bias = ctx.saved_tensors
        dx, dw, db = conv_backward(x, weight, bias, dout, ctx.silu)
        return dx, dw.view(weight.shape).to(weight.dtype), None if db is None else db.to(bias.dtype), None


def causal_conv1d(x, weight, bias=None, silu=True):
    """Causal depthwise conv1d (+ SiLU) with the Triton kernels: x (batch, dim, L), weight (dim, W) or
    (dim, 1, W) (nn.Conv1d's), bias (dim,) or None. Output in x's dtype; gradients for x, weight and bias."""
    return CausalConv1dTriton.apply(x, weight, bias, silu)


def causal_conv1d_update(x, conv_state, weight, bias=None, silu=True):
    """One decoding step with the Triton kernel: x (batch, dim), conv_state (batch, dim, W-1) ->
    (out (batch, dim) in x's dtype, new conv_state like conv_state). No gradients (inference)."""
    batch, dim = x.shape
    width = weight.shape[-1]
    weight = weight.reshape(dim, width).contiguous()
    out = torch.empty_like(x)
    new_state = torch.empty_like(conv_state)
    block_d = 64
    _conv_update_kernel[(triton.cdiv(dim, block_d), batch)](
        x, conv_state, weight, bias if bias is not None else weight, out, new_state, dim,
        *x.stride(), *conv_state.stride(), weight.stride(0), *out.stride(), *new_state.stride(),
        W=width, W_POW2=triton.next_power_of_2(width), BLOCK_D=block_d, HAS_BIAS=bias is not None, SILU=silu,
        num_warps=2,
    )
    return out, new_state

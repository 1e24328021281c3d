"""The whole Mamba mixer as one autograd function, and its decoding step, on the Triton kernels.

``mamba_inner_fn`` computes in_proj -> causal conv1d + SiLU -> x_proj -> dt_proj -> selective scan (gated by
SiLU(z)) -> out_proj, the same function as ``ssmlm.models.mamba.MambaMixer.forward`` (its PyTorch path is the
specification), with two differences in how:

* **Layout without copies.** The activations live as (channels, batch * L) matrices: ``xz = W_in @ h^T`` is
  (2 d_inner, B L); viewed as (batch, channels, L) it has unit time stride, which is what the conv and the scan
  read, and x_proj / dt_proj / out_proj are plain matrix products on it. B and C are row slices of
  ``x_dbl = W_x @ conv_out`` that the scan reads in place (no transpose + contiguous copies); the scan writes y in
  the same layout and out_proj reads it transposed. The backward writes dz straight into the gradient of xz.
* **Saves only what it must.** The forward keeps the mixer's input h, x_dbl ((dt_rank + 2N) per token) and the
  scan's chunk-entry states; the backward recomputes xz (one matmul), the conv output, delta, and (inside the
  scan's backward kernel) the gated output y that out_proj's weight gradient needs. Per token and layer that is
  about d_model + d_inner/2 values instead of the ~4 d_inner an unfused graph keeps.

The last conv inputs and the scan's final state are returned like the PyTorch path returns them, without
gradients (the fused path is taken for a forward from the zero state; a forward continuing from a given state,
and the CPU path, stay on the PyTorch code).

``selective_state_update`` is the decoding step of the scan in one Triton kernel (state update, output, D skip
and gate), and ``mamba_mixer_step`` the mixer's step on it and on ``causal_conv1d_update``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ssmlm.ops.causal_conv1d import causal_conv1d_update, conv_backward, conv_forward
from ssmlm.ops.triton_scan import _sigmoid, _softplus, scan_backward, scan_forward


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype


def _as_bdl(m: torch.Tensor, batch: int) -> torch.Tensor:
    """(channels, batch * L) matrix -> (batch, channels, L) view (unit time stride)."""
    return m.view(m.shape[0], batch, -1).permute(1, 0, 2)


class MambaInnerFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, in_proj_w, conv_w, conv_b, x_proj_w, dt_proj_w, dt_proj_b, out_proj_w, A_log, D,
                dt_rank: int, d_state: int, save_xz: bool):
        dtype = _compute_dtype(hidden)
        batch, L, d_model = hidden.shape
        with torch.autocast(hidden.device.type, enabled=False):
            h = hidden.reshape(batch * L, d_model).to(dtype)
            xz = in_proj_w.to(dtype) @ h.t()  # (2 d_inner, B L)
            d_inner = xz.shape[0] // 2
            x, z = _as_bdl(xz[:d_inner], batch), _as_bdl(xz[d_inner:], batch)
            conv_out = torch.empty_like(xz[:d_inner])
            conv_forward(x, conv_w, conv_b, out=_as_bdl(conv_out, batch))
            x_dbl = x_proj_w.to(dtype) @ conv_out
            delta = _as_bdl(dt_proj_w.to(dtype) @ x_dbl[:dt_rank], batch)
            B = _as_bdl(x_dbl[dt_rank:dt_rank + d_state], batch)
            C = _as_bdl(x_dbl[dt_rank + d_state:], batch)
            A = -torch.exp(A_log.float())
            y = torch.empty(d_inner, batch * L, device=hidden.device, dtype=dtype)
            _, chunk_states = scan_forward(_as_bdl(conv_out, batch), delta, A, B, C, D.float(), z, dt_proj_b.float(), True,
                                           y=_as_bdl(y, batch))
            out = (y.t() @ out_proj_w.to(dtype).t()).view(batch, L, d_model)
            width = conv_w.shape[-1]
            conv_state = F.pad(x[..., max(L - (width - 1), 0):], (max(width - 1 - L, 0), 0)).contiguous()
            ssm_state = chunk_states[:, -1].clone()
        ctx.save_for_backward(h, in_proj_w, conv_w, conv_b, x_proj_w, dt_proj_w, dt_proj_b, out_proj_w, A_log, D,
                              x_dbl, chunk_states, xz if save_xz else None)
        ctx.dims = (batch, L, dt_rank, d_state)
        ctx.hidden_dtype = hidden.dtype
        ctx.mark_non_differentiable(conv_state, ssm_state)
        return out, conv_state, ssm_state

    @staticmethod
    def backward(ctx, dout, _dconv_state, _dssm_state):
        (h, in_proj_w, conv_w, conv_b, x_proj_w, dt_proj_w, dt_proj_b, out_proj_w, A_log, D, x_dbl,
         chunk_states, xz) = ctx.saved_tensors
        batch, L, dt_rank, d_state = ctx.dims
        dtype = h.dtype
        with torch.autocast(h.device.type, enabled=False):
            W_in, W_x, W_dt, W_out = (w.to(dtype) for w in (in_proj_w, x_proj_w, dt_proj_w, out_proj_w))
            # recompute the forward's activations
            xz = W_in @ h.t() if xz is None else xz
            d_inner = xz.shape[0] // 2
            x, z = _as_bdl(xz[:d_inner], batch), _as_bdl(xz[d_inner:], batch)
            conv_out2 = torch.empty_like(xz[:d_inner])
            conv_forward(x, conv_w, conv_b, out=_as_bdl(conv_out2, batch))
            delta = _as_bdl(W_dt @ x_dbl[:dt_rank], batch)
            B = _as_bdl(x_dbl[dt_rank:dt_rank + d_state], batch)
            C = _as_bdl(x_dbl[dt_rank + d_state:], batch)
            A = -torch.exp(A_log.float())
            # out_proj, then the scan (which also rebuilds its gated output y for out_proj's weight gradient)
            dout2 = dout.reshape(batch * L, -1).to(dtype)
            dy = W_out.t() @ dout2.t()  # (d_inner, B L)
            dxz = torch.empty_like(xz)
            du, ddelta, y = (torch.empty_like(dy) for _ in range(3))
            _, _, _, dA, dB, dC, dD, ddt_bias, _ = scan_backward(
                _as_bdl(conv_out2, batch), delta, A, B, C, D.float(), z, dt_proj_b.float(), True, chunk_states,
                _as_bdl(dy, batch), du=_as_bdl(du, batch), ddelta=_as_bdl(ddelta, batch),
                dz=_as_bdl(dxz[d_inner:], batch), y_gated=_as_bdl(y, batch))
            d_out_proj_w = dout2.t() @ y.t()
            # x_proj's output: dt (through dt_proj), B and C
            d_x_dbl = torch.empty_like(x_dbl)
            torch.mm(W_dt.t(), ddelta, out=d_x_dbl[:dt_rank])
            _as_bdl(d_x_dbl[dt_rank:dt_rank + d_state], batch).copy_(dB)
            _as_bdl(d_x_dbl[dt_rank + d_state:], batch).copy_(dC)
            d_dt_proj_w = ddelta @ x_dbl[:dt_rank].t()
            d_x_proj_w = d_x_dbl @ conv_out2.t()
            dconv_out = torch.addmm(du, W_x.t(), d_x_dbl)
            # the conv writes dx into the x half of dxz
            _, dconv_w, dconv_b = conv_backward(x, conv_w, conv_b, _as_bdl(dconv_out, batch),
                                                dx=_as_bdl(dxz[:d_inner], batch))
            d_in_proj_w = dxz @ h
            dh = (dxz.t() @ W_in).view(batch, L, -1).to(ctx.hidden_dtype)
        return (dh, d_in_proj_w.to(in_proj_w.dtype), dconv_w.view(conv_w.shape).to(conv_w.dtype),
                None if conv_b is None else dconv_b.to(conv_b.dtype), d_x_proj_w.to(x_proj_w.dtype),
                d_dt_proj_w.to(dt_proj_w.dtype), ddt_bias.to(dt_proj_b.dtype), d_out_proj_w.to(out_proj_w.dtype),
                (dA * A).to(A_log.dtype), dD.to(D.dtype), None, None, None)


# Keep in_proj's output (2 d_inner values per token) for the backward instead of recomputing it: one matmul
# less, ~1.7x the saved activations (scripts/bench_mamba.py's ``ssmlm[save_xz]`` measures both).
SAVE_XZ = False


def mamba_inner_fn(hidden, in_proj_w, conv_w, conv_b, x_proj_w, dt_proj_w, dt_proj_b, out_proj_w, A_log, D,
                   dt_rank: int, d_state: int, save_xz: bool = False):
    """The Mamba mixer, fused (see the module docstring): hidden (batch, L, d_model) and the mixer's parameters
    (no in_proj/out_proj biases; SiLU activation) -> (out (batch, L, d_model), conv_state (batch, d_inner,
    d_conv - 1), ssm_state (batch, d_inner, d_state) fp32). Under autocast the matmuls and activations use the
    autocast dtype; the scan accumulates in fp32."""
    return MambaInnerFn.apply(hidden, in_proj_w, conv_w, conv_b, x_proj_w, dt_proj_w, dt_proj_b, out_proj_w,
                              A_log, D, dt_rank, d_state, save_xz)


def mamba_mixer_forward(mixer, hidden):
    """``mamba_inner_fn`` on a ``MambaMixer``'s parameters: -> (out, (conv_state, ssm_state))."""
    out, conv_state, ssm_state = mamba_inner_fn(
        hidden, mixer.in_proj.weight, mixer.conv1d.weight, mixer.conv1d.bias, mixer.x_proj.weight,
        mixer.dt_proj.weight, mixer.dt_proj.bias, mixer.out_proj.weight, mixer.A_log, mixer.D,
        mixer.dt_rank, mixer.d_state, SAVE_XZ)
    return out, (conv_state, ssm_state)


@triton.jit
def _state_update_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, y_ptr, new_state_ptr, dim,
    stride_s_b, stride_s_d, stride_x_b, stride_dt_b, stride_A_d, stride_B_b, stride_C_b, stride_z_b, stride_y_b,
    stride_n_b, stride_n_d,
    N: tl.constexpr, N_POW2: tl.constexpr, BLOCK_D: tl.constexpr, HAS_Z: tl.constexpr,
):
    pid_d, batch = tl.program_id(0), tl.program_id(1).to(tl.int64)
    channels = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    cm = channels < dim
    n = tl.arange(0, N_POW2)
    nm = n < N
    m2 = cm[:, None] & nm[None, :]
    x = tl.load(x_ptr + batch * stride_x_b + channels, mask=cm, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + batch * stride_dt_b + channels, mask=cm, other=0.0).to(tl.float32)
    dt += tl.load(bias_ptr + channels, mask=cm, other=0.0).to(tl.float32)
    dt = _softplus(dt)
    A = tl.load(A_ptr + channels[:, None] * stride_A_d + n[None, :], mask=m2, other=0.0).to(tl.float32)
    Bv = tl.load(B_ptr + batch * stride_B_b + n, mask=nm, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + batch * stride_C_b + n, mask=nm, other=0.0).to(tl.float32)
    s = tl.load(state_ptr + batch * stride_s_b + channels[:, None] * stride_s_d + n[None, :], mask=m2, other=0.0)
    s = s * tl.exp(dt[:, None] * A) + (dt * x)[:, None] * Bv[None, :]
    tl.store(new_state_ptr + batch * stride_n_b + channels[:, None] * stride_n_d + n[None, :], s, mask=m2)
    y = tl.sum(s * Cv[None, :], axis=1) + tl.load(D_ptr + channels, mask=cm, other=0.0).to(tl.float32) * x
    if HAS_Z:
        z = tl.load(z_ptr + batch * stride_z_b + channels, mask=cm, other=0.0).to(tl.float32)
        y = y * z * _sigmoid(z)
    tl.store(y_ptr + batch * stride_y_b + channels, y, mask=cm)


def selective_state_update(state, x, dt, A, B, C, D, z=None, dt_bias=None):
    """One step of the scan: state (batch, dim, N) fp32, x, dt, z (batch, dim), A (dim, N), B, C (batch, N),
    D, dt_bias (dim,); ``dt = softplus(dt + dt_bias)``. -> (y (batch, dim) in x's dtype, new state (fp32)).
    No gradients (inference). The PyTorch twin is ``MambaMixer.step``'s scan update."""
    batch, dim, N = state.shape
    y = torch.empty_like(x)
    new_state = torch.empty_like(state)
    dt_bias = torch.zeros(dim, device=x.device) if dt_bias is None else dt_bias
    for t in (x, dt, B, C, z):
        assert t is None or t.stride(-1) == 1
    block_d = 16
    _state_update_kernel[(triton.cdiv(dim, block_d), batch)](
        state, x, dt, A, B, C, D, z if z is not None else x, dt_bias, y, new_state, dim,
        state.stride(0), state.stride(1), x.stride(0), dt.stride(0), A.stride(0), B.stride(0), C.stride(0),
        z.stride(0) if z is not None else 0, y.stride(0), new_state.stride(0), new_state.stride(1),
        N=N, N_POW2=triton.next_power_of_2(N), BLOCK_D=block_d, HAS_Z=z is not None, num_warps=2,
    )
    return y, new_state


def mamba_mixer_step(mixer, hidden, state):
    """``MambaMixer.step`` on the Triton step kernels (SiLU activation): one conv update and one state update
    instead of ~20 small PyTorch ops. hidden (batch, d_model) -> (out, (conv_state, ssm_state))."""
    conv_state, ssm_state = state
    x, z = mixer.in_proj(hidden).chunk(2, dim=-1)
    x, conv_state = causal_conv1d_update(x, conv_state, mixer.conv1d.weight, mixer.conv1d.bias, silu=True)
    dt, B, C = torch.split(mixer.x_proj(x), [mixer.dt_rank, mixer.d_state, mixer.d_state], dim=-1)
    dt = F.linear(dt, mixer.dt_proj.weight)
    A = -torch.exp(mixer.A_log.float())
    y, ssm_state = selective_state_update(ssm_state, x, dt, A, B, C, mixer.D, z, mixer.dt_proj.bias)
    return mixer.out_proj(y), (conv_state, ssm_state)

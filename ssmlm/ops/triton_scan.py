"""Fused selective scan in Triton: one forward kernel and one backward kernel.

Same interface and semantics as mamba_ssm's ``selective_scan_fn`` (``scan_ref.selective_scan_ref`` is the spec).

Design (docs/kernels.md has the derivation and the measurements):

* A program owns ``BLOCK_D`` channels of one batch row and walks the sequence in chunks of ``T_CHUNK`` steps.
  A chunk is a (BLOCK_D, T_CHUNK) register tile: u, delta, z, dout are read once per chunk, y is written once.
* Inside a chunk the state dimension is a loop: for each n the recurrence ``x_t = a_t x_{t-1} + b_t`` is a
  parallel scan along time (``tl.associative_scan`` over affine maps), so no (batch, dim, L, N) tensor exists.
  The state entering each chunk is kept in ``chunk_states`` (batch, n_chunks + 1, dim, N), fp32: the forward
  writes it (its last slot is the final state), the backward reads it to recompute the chunk's states.
* The backward walks the chunks right to left. Per n it recomputes the chunk's states x_t, runs the adjoint
  recurrence ``h_t = C_t dy_t + a_{t+1} h_{t+1}`` as a forward scan over the time-reversed chunk (``tl.flip``
  brings h back; Triton's ``reverse=True`` scan costs several times more shuffles), and forms every gradient
  from (x_t, h_t) in registers. The adjoint entering a chunk from its right travels in ``adjoint_carry``.
* Sums over channels (dB, dC of input-dependent B/C) are per-program partial sums added to fp32 buffers with
  relaxed atomics; per-channel sums over time (dA, dD, d delta_bias, fixed B/C) stay in registers until the end.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


@dataclass(frozen=True)
class ScanConfig:
    """Launch configuration. The defaults are the fp32 choice measured on an H100 (docs/kernels.md)."""

    t_chunk: int = 32  # steps per chunk, also the spacing of the saved states
    fwd_block_d: int = 16  # channels per forward program
    fwd_warps: int = 4
    fwd_stages: int = 3  # software pipelining of the loads in the loop over the state dimension
    fwd_unroll: int = 2  # unrolling of that loop
    bwd_block_d: int = 4  # channels per backward program
    bwd_warps: int = 1
    bwd_stages: int = 3
    bwd_unroll: int = 2
    fwd_maxnreg: int = 0  # register cap per thread (0: the compiler's choice); lower caps fit more warps per SM
    bwd_maxnreg: int = 0
    bc_partial: bool = False  # dB/dC over channels: per-program partial sums + torch.sum instead of atomics


# Half precision loads 8 steps per vector, so it prefers longer chunks. Forward programs of 4 channels and one
# warp: 7-11% faster forwards than 16 channels / 4 warps at the Mamba LM benchmark's shapes on the H200
# (docs/kernels.md, "Forward launch configuration in bf16").
_HALF = ScanConfig(t_chunk=64, fwd_block_d=4, fwd_warps=1, bwd_unroll=1, bwd_maxnreg=168)
DEFAULT_CONFIGS = {torch.float32: ScanConfig(), torch.bfloat16: _HALF, torch.float16: _HALF}
CONFIG: ScanConfig | None = None  # set to force one configuration whatever the dtype (benchmarks, tests)


def config_for(dtype: torch.dtype) -> ScanConfig:
    return CONFIG if CONFIG is not None else DEFAULT_CONFIGS.get(dtype, DEFAULT_CONFIGS[torch.float32])


@triton.jit
def _affine_combine(a_first, b_first, a_second, b_second):
    # Compose x -> a_first x + b_first, then x -> a_second x + b_second. The reverse scan feeds the later
    # segment as ``first``, which composes the adjoint maps h -> g + a h in the right order too.
    return a_first * a_second, a_second * b_first + b_second


@triton.jit
def _softplus(x):
    # torch's softplus (threshold 20); log1p(e) written so that it stays accurate when e is tiny.
    e = tl.exp(-tl.abs(x))
    one_plus_e = 1.0 + e
    log1p_e = tl.where(one_plus_e == 1.0, e, tl.log(one_plus_e) * (e / (one_plus_e - 1.0)))
    return tl.where(x > 20.0, x, tl.maximum(x, 0.0) + log1p_e)


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _load_delta(delta_ptr, bias, t, mask, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """Raw delta (+ bias) and the effective step (softplus applied, 0 where masked so padding is a no-op)."""
    raw = tl.load(delta_ptr + t, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw = raw + bias[:, None]
    step = raw
    if SOFTPLUS:
        step = _softplus(raw)
    return raw, tl.where(mask, step, 0.0)


@triton.jit
def _scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, y_ptr, states_ptr,
    dim, L, n_chunks,
    stride_u_b, stride_u_d, stride_delta_b, stride_delta_d, stride_z_b, stride_z_d, stride_y_b, stride_y_d,
    stride_A_d, stride_A_n, stride_B_0, stride_B_1, stride_B_l, stride_C_0, stride_C_1, stride_C_l,
    N: tl.constexpr, BLOCK_D: tl.constexpr, T_CHUNK: tl.constexpr,
    B_VARIABLE: tl.constexpr, C_VARIABLE: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, STAGES: tl.constexpr, UNROLL: tl.constexpr,
):
    pid_d = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    channels = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    channel_mask = channels < dim
    steps = tl.arange(0, T_CHUNK)
    last_step = (steps == T_CHUNK - 1)[None, :]

    u_rows = u_ptr + batch * stride_u_b + channels[:, None] * stride_u_d
    delta_rows = delta_ptr + batch * stride_delta_b + channels[:, None] * stride_delta_d
    y_rows = y_ptr + batch * stride_y_b + channels[:, None] * stride_y_d
    A_col = A_ptr + channels * stride_A_d
    B_base = B_ptr + batch * stride_B_0 if B_VARIABLE else B_ptr + channels * stride_B_0
    C_base = C_ptr + batch * stride_C_0 if C_VARIABLE else C_ptr + channels * stride_C_0
    states_base = states_ptr + batch * (n_chunks + 1) * dim * N + channels * N
    bias = tl.load(bias_ptr + channels, mask=channel_mask, other=0.0).to(tl.float32) if HAS_BIAS else None

    for chunk in range(n_chunks):
        t = chunk * T_CHUNK + steps
        mask = channel_mask[:, None] & (t < L)[None, :]
        u = tl.load(u_rows + t[None, :], mask=mask, other=0.0).to(tl.float32)
        _, dt = _load_delta(delta_rows, bias, t[None, :], mask, HAS_BIAS, SOFTPLUS)
        dt_u = dt * u
        y = tl.zeros([BLOCK_D, T_CHUNK], dtype=tl.float32)
        # The entry states of this chunk were stored by other threads of this program in the previous chunk.
        tl.debug_barrier()
        for n in tl.range(0, N, num_stages=STAGES, loop_unroll_factor=UNROLL):
            A_n = tl.load(A_col + n * stride_A_n, mask=channel_mask, other=0.0).to(tl.float32)
            if B_VARIABLE:
                B_n = tl.load(B_base + n * stride_B_1 + t * stride_B_l, mask=t < L, other=0.0)[None, :]
            else:
                B_n = tl.load(B_base + n * stride_B_1, mask=channel_mask, other=0.0)[:, None]
            if C_VARIABLE:
                C_n = tl.load(C_base + n * stride_C_1 + t * stride_C_l, mask=t < L, other=0.0)[None, :]
            else:
                C_n = tl.load(C_base + n * stride_C_1, mask=channel_mask, other=0.0)[:, None]
            B_n, C_n = B_n.to(tl.float32), C_n.to(tl.float32)
            decay = tl.exp2(dt * (A_n * 1.4426950408889634)[:, None])
            decay_prod, x = tl.associative_scan((decay, dt_u * B_n), 1, _affine_combine)
            state_ptrs = states_base + chunk * dim * N + n
            x_entry = tl.load(state_ptrs, mask=channel_mask, other=0.0)
            x = x + decay_prod * x_entry[:, None]
            y += x * C_n
            # The last step's state enters the next chunk (padding past L leaves it unchanged).
            tl.store(state_ptrs[:, None] + dim * N + 0 * t[None, :], x, mask=channel_mask[:, None] & last_step)
        if HAS_D:
            y += tl.load(D_ptr + channels, mask=channel_mask, other=0.0).to(tl.float32)[:, None] * u
        if HAS_Z:
            z = tl.load(z_ptr + batch * stride_z_b + channels[:, None] * stride_z_d + t[None, :], mask=mask,
                        other=0.0).to(tl.float32)
            y *= z * _sigmoid(z)
        tl.store(y_rows + t[None, :], y, mask=mask)


@triton.jit
def _scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, C_rev_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr, states_ptr, carry_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr, y_out_ptr,
    dim, L, n_chunks,
    stride_u_b, stride_u_d, stride_delta_b, stride_delta_d, stride_z_b, stride_z_d, stride_dout_b, stride_dout_d,
    stride_du_b, stride_du_d, stride_ddelta_b, stride_ddelta_d, stride_dz_b, stride_dz_d, stride_yo_b, stride_yo_d,
    stride_A_d, stride_A_n, stride_B_0, stride_B_1, stride_B_l, stride_C_0, stride_C_1, stride_C_l,
    N: tl.constexpr, N_POW2: tl.constexpr, BLOCK_D: tl.constexpr, T_CHUNK: tl.constexpr,
    B_VARIABLE: tl.constexpr, C_VARIABLE: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, BC_PARTIAL: tl.constexpr, STAGES: tl.constexpr,
    UNROLL: tl.constexpr, Y_OUT: tl.constexpr,
):
    pid_d = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    channels = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    channel_mask = channels < dim
    steps = tl.arange(0, T_CHUNK)
    first_step = (steps == 0)[None, :]
    states_col = tl.arange(0, N_POW2)[None, :]

    u_rows = u_ptr + batch * stride_u_b + channels[:, None] * stride_u_d
    delta_rows = delta_ptr + batch * stride_delta_b + channels[:, None] * stride_delta_d
    dout_rows = dout_ptr + batch * stride_dout_b + channels[:, None] * stride_dout_d
    z_rows = z_ptr + batch * stride_z_b + channels[:, None] * stride_z_d
    du_rows = du_ptr + batch * stride_du_b + channels[:, None] * stride_du_d
    ddelta_rows = ddelta_ptr + batch * stride_ddelta_b + channels[:, None] * stride_ddelta_d
    dz_rows = dz_ptr + batch * stride_dz_b + channels[:, None] * stride_dz_d
    A_col = A_ptr + channels * stride_A_d
    B_base = B_ptr + batch * stride_B_0 if B_VARIABLE else B_ptr + channels * stride_B_0
    C_base = C_ptr + batch * stride_C_0 if C_VARIABLE else C_ptr + channels * stride_C_0
    C_rev_base = C_rev_ptr + batch * N * n_chunks * T_CHUNK
    # Input-dependent dB/dC: one (N, L) slice per batch row, or per (batch row, program) with BC_PARTIAL.
    bc_slice = batch * tl.num_programs(0) + pid_d if BC_PARTIAL else batch
    dB_base = dB_ptr + bc_slice * N * L
    dC_base = dC_ptr + bc_slice * N * L
    states_base = states_ptr + batch * (n_chunks + 1) * dim * N + channels * N
    carry_base = carry_ptr + batch * 2 * dim * N + channels * N
    bias = tl.load(bias_ptr + channels, mask=channel_mask, other=0.0).to(tl.float32) if HAS_BIAS else None
    D = tl.load(D_ptr + channels, mask=channel_mask, other=0.0).to(tl.float32) if HAS_D else None
    # Per-channel gradients accumulate in registers over the whole sequence and are flushed once.
    dA = tl.zeros([BLOCK_D, N_POW2], dtype=tl.float32)
    dB_fixed = tl.zeros([BLOCK_D, N_POW2], dtype=tl.float32)
    dC_fixed = tl.zeros([BLOCK_D, N_POW2], dtype=tl.float32)
    dD = tl.zeros([BLOCK_D], dtype=tl.float32)
    dbias = tl.zeros([BLOCK_D], dtype=tl.float32)

    for chunk_from_end in range(n_chunks):
        chunk = n_chunks - 1 - chunk_from_end
        t = chunk * T_CHUNK + steps
        mask = channel_mask[:, None] & (t < L)[None, :]
        u = tl.load(u_rows + t[None, :], mask=mask, other=0.0).to(tl.float32)
        _, dt = _load_delta(delta_rows, bias, t[None, :], mask, HAS_BIAS, SOFTPLUS)
        dt_u = dt * u
        dy = tl.load(dout_rows + t[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_Z:
            z = tl.load(z_rows + t[None, :], mask=mask, other=0.0).to(tl.float32)
            dy *= z * _sigmoid(z)
        # The adjoint runs right to left: its scan works on time-reversed tiles (suffix "_rev"). It needs
        # a_{t+1}, which at the chunk's last step is the next chunk's first decay (1 past the end).
        next_mask = channel_mask[:, None] & (t + 1 < L)[None, :]
        _, dt_next = _load_delta(delta_rows, bias, t[None, :] + 1, next_mask, HAS_BIAS, SOFTPLUS)
        dt_next_rev = tl.flip(dt_next, 1)
        dy_rev = tl.flip(dy, 1)
        du = tl.zeros([BLOCK_D, T_CHUNK], dtype=tl.float32)
        ddt = tl.zeros([BLOCK_D, T_CHUNK], dtype=tl.float32)
        y = tl.zeros([BLOCK_D, T_CHUNK], dtype=tl.float32)
        read_carry = carry_base + ((chunk + 1) % 2) * dim * N
        write_carry = carry_base + (chunk % 2) * dim * N
        # The carry of the chunk to the right was stored by other threads of this program.
        tl.debug_barrier()
        for n in tl.range(0, N, num_stages=STAGES, loop_unroll_factor=UNROLL):
            A_n = tl.load(A_col + n * stride_A_n, mask=channel_mask, other=0.0).to(tl.float32)
            A2_n = (A_n * 1.4426950408889634)[:, None]
            if B_VARIABLE:
                B_n = tl.load(B_base + n * stride_B_1 + t * stride_B_l, mask=t < L, other=0.0)[None, :]
            else:
                B_n = tl.load(B_base + n * stride_B_1, mask=channel_mask, other=0.0)[:, None]
            if C_VARIABLE:
                C_n = tl.load(C_base + n * stride_C_1 + t * stride_C_l, mask=t < L, other=0.0)[None, :]
                C_n_rev = tl.load(C_rev_base + (n * n_chunks + chunk) * T_CHUNK + steps)[None, :]
            else:
                C_n = tl.load(C_base + n * stride_C_1, mask=channel_mask, other=0.0)[:, None]
                C_n_rev = C_n
            B_n, C_n, C_n_rev = B_n.to(tl.float32), C_n.to(tl.float32), C_n_rev.to(tl.float32)
            # Recompute this chunk's states x_t from its saved entry state.
            decay = tl.exp2(dt * A2_n)
            inject = dt_u * B_n
            decay_prod, x = tl.associative_scan((decay, inject), 1, _affine_combine)
            x_entry = tl.load(states_base + chunk * dim * N + n, mask=channel_mask, other=0.0)
            x += decay_prod * x_entry[:, None]
            if HAS_Z:
                y += x * C_n
            # Adjoint h_t = C_t dy_t + a_{t+1} h_{t+1}, seeded by h at the first step of the chunk to the right.
            carry_in = tl.load(read_carry + n, mask=channel_mask, other=0.0)
            carry_prod, h_rev = tl.associative_scan((tl.exp2(dt_next_rev * A2_n), dy_rev * C_n_rev), 1,
                                                    _affine_combine)
            h = tl.flip(h_rev + carry_prod * carry_in[:, None], 1)
            # a_t x_{t-1} = x_t - b_t: the factor every derivative through a_t needs.
            h_decayed_x = h * (x - inject)
            h_B = h * B_n
            ddt += A_n[:, None] * h_decayed_x + h_B * u
            du += h_B * dt
            this_n = states_col == n
            dA += tl.where(this_n, tl.sum(h_decayed_x * dt, axis=1)[:, None], 0.0)
            if B_VARIABLE and BC_PARTIAL:
                tl.store(dB_base + n * L + t, tl.sum(h * dt_u, axis=0), mask=t < L)
            elif B_VARIABLE:
                tl.atomic_add(dB_base + n * L + t, tl.sum(h * dt_u, axis=0), mask=t < L, sem="relaxed")
            else:
                dB_fixed += tl.where(this_n, tl.sum(h * dt_u, axis=1)[:, None], 0.0)
            if C_VARIABLE and BC_PARTIAL:
                tl.store(dC_base + n * L + t, tl.sum(dy * x, axis=0), mask=t < L)
            elif C_VARIABLE:
                tl.atomic_add(dC_base + n * L + t, tl.sum(dy * x, axis=0), mask=t < L, sem="relaxed")
            else:
                dC_fixed += tl.where(this_n, tl.sum(dy * x, axis=1)[:, None], 0.0)
            tl.store(write_carry + n, tl.sum(tl.where(first_step, h, 0.0), axis=1), mask=channel_mask)
        if HAS_D:
            du += D[:, None] * dy
            dD += tl.sum(dy * u, axis=1)
        # dout, z and the raw delta are read again here (cache hits) rather than kept in registers.
        if HAS_Z:
            if HAS_D:
                y += D[:, None] * u
            dout = tl.load(dout_rows + t[None, :], mask=mask, other=0.0).to(tl.float32)
            z = tl.load(z_rows + t[None, :], mask=mask, other=0.0).to(tl.float32)
            sig_z = _sigmoid(z)
            tl.store(dz_rows + t[None, :], dout * y * sig_z * (1.0 + z * (1.0 - sig_z)), mask=mask)
            if Y_OUT:  # the forward's gated output, recomputed: a caller need not keep it for its own backward
                tl.store(y_out_ptr + batch * stride_yo_b + channels[:, None] * stride_yo_d + t[None, :],
                         y * z * sig_z, mask=mask)
        if SOFTPLUS:
            dt_raw, _ = _load_delta(delta_rows, bias, t[None, :], mask, HAS_BIAS, False)
            ddt = tl.where(dt_raw > 20.0, ddt, ddt * _sigmoid(dt_raw))
        ddt = tl.where(mask, ddt, 0.0)
        if HAS_BIAS:
            dbias += tl.sum(ddt, axis=1)
        tl.store(du_rows + t[None, :], du, mask=mask)
        tl.store(ddelta_rows + t[None, :], ddt, mask=mask)
    per_channel = channel_mask[:, None] & (states_col < N)
    per_channel_offsets = channels[:, None] * N + states_col
    tl.atomic_add(dA_ptr + per_channel_offsets, dA, mask=per_channel, sem="relaxed")
    if not B_VARIABLE:
        tl.atomic_add(dB_ptr + per_channel_offsets, dB_fixed, mask=per_channel, sem="relaxed")
    if not C_VARIABLE:
        tl.atomic_add(dC_ptr + per_channel_offsets, dC_fixed, mask=per_channel, sem="relaxed")
    if HAS_D:
        tl.atomic_add(dD_ptr + channels, dD, mask=channel_mask, sem="relaxed")
    if HAS_BIAS:
        tl.atomic_add(dbias_ptr + channels, dbias, mask=channel_mask, sem="relaxed")


def _time_contiguous(x):
    # Kernels take any batch/channel strides but want unit stride along time (vector loads).
    return x if x is None or x.stride(-1) == 1 else x.contiguous()


def _bc_strides(x):
    # (batch, N, L) -> (b, n, l) strides; fixed (dim, N) -> (d, n, 0).
    return tuple(x.stride()) if x.dim() == 3 else (x.stride(0), x.stride(1), 0)


def _chunk_reversed(x, t_chunk):
    """(batch, N, L) -> (batch, N, n_chunks * t_chunk), each chunk's steps in reverse order, zero padded."""
    n_chunks = triton.cdiv(x.shape[-1], t_chunk)
    padded = F.pad(x, (0, n_chunks * t_chunk - x.shape[-1]))
    return padded.view(*x.shape[:-1], n_chunks, t_chunk).flip(-1).reshape(*x.shape[:-1], n_chunks * t_chunk)


def _strides2(x):
    # (batch, channel) strides of an optional (batch, dim, L) tensor
    return (x.stride(0), x.stride(1)) if x is not None else (0, 0)


def scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state=None, y=None):
    """Launch the forward kernel. Returns (y, chunk_states); chunk_states[:, -1] is the final state.

    ``y``: an optional (batch, dim, L) output buffer with unit time stride and any batch/channel strides
    (e.g. a (dim, batch, L) layout that a following matmul reads as a plain matrix).
    """
    if A.is_complex():
        raise ValueError("selective_scan_triton supports real A only")
    u, delta, z = _time_contiguous(u), _time_contiguous(delta), _time_contiguous(z)
    B, C = _time_contiguous(B), _time_contiguous(C)
    batch, dim, L = u.shape
    N = A.shape[1]
    cfg = config_for(u.dtype)
    n_chunks = triton.cdiv(L, cfg.t_chunk)
    # Entry state of every chunk, and the final state in the last slot.
    chunk_states = torch.empty(batch, n_chunks + 1, dim, N, device=u.device, dtype=torch.float32)
    if initial_state is None:
        chunk_states[:, 0].zero_()
    else:
        chunk_states[:, 0].copy_(initial_state)
    if y is None:
        y = torch.empty(batch, dim, L, device=u.device, dtype=u.dtype)
    assert y.stride(-1) == 1 and y.shape == u.shape
    grid = (triton.cdiv(dim, cfg.fwd_block_d), batch)
    _scan_fwd_kernel[grid](
        u, delta, A, B, C, D if D is not None else u, z if z is not None else u,
        delta_bias if delta_bias is not None else u, y, chunk_states,
        dim, L, n_chunks,
        *_strides2(u), *_strides2(delta), *_strides2(z), *_strides2(y),
        A.stride(0), A.stride(1), *_bc_strides(B), *_bc_strides(C),
        N=N, BLOCK_D=cfg.fwd_block_d, T_CHUNK=cfg.t_chunk, B_VARIABLE=B.dim() == 3, C_VARIABLE=C.dim() == 3,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=bool(delta_softplus), STAGES=cfg.fwd_stages, UNROLL=cfg.fwd_unroll, num_warps=cfg.fwd_warps,
        **({"maxnreg": cfg.fwd_maxnreg} if cfg.fwd_maxnreg else {}),
    )
    return y, chunk_states


def scan_backward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_states, dy, dlast_state=None,
                  du=None, ddelta=None, dz=None, y_gated=None):
    """Launch the backward kernel. Returns fp32 (dA, dB, dC, dD, dbias) and the adjoint carry (its slot 0 is
    the adjoint of the first step); du, ddelta, dz are written into the given buffers (allocated when None)
    and returned first: ``(du, ddelta, dz, dA, dB, dC, dD, dbias, adjoint_carry)``.

    ``y_gated``: an optional (batch, dim, L) buffer (unit time stride) that receives the forward's output
    ``y * silu(z)`` recomputed on the way (needs z), so a caller can drop it after the forward.
    """
    u, delta, z = _time_contiguous(u), _time_contiguous(delta), _time_contiguous(z)
    B, C = _time_contiguous(B), _time_contiguous(C)
    batch, dim, L = u.shape
    N = A.shape[1]
    cfg = config_for(u.dtype)
    n_chunks = chunk_states.shape[1] - 1
    assert n_chunks == triton.cdiv(L, cfg.t_chunk), "chunk_states from another launch configuration"
    n_programs = triton.cdiv(dim, cfg.bwd_block_d)
    dout = _time_contiguous(dy)
    f32 = dict(device=u.device, dtype=torch.float32)
    du = torch.empty(batch, dim, L, device=u.device, dtype=u.dtype) if du is None else du
    ddelta = torch.empty(batch, dim, L, device=u.device, dtype=delta.dtype) if ddelta is None else ddelta
    if z is not None and dz is None:
        dz = torch.empty(batch, dim, L, device=u.device, dtype=z.dtype)
    for out in (du, ddelta, dz, y_gated):
        assert out is None or (out.stride(-1) == 1 and out.shape == u.shape)
    if y_gated is not None and z is None:
        raise ValueError("y_gated needs z")
    dA = torch.zeros(dim, N, **f32)
    # Input-dependent dB/dC are sums over channels: atomics into (batch, N, L), or one partial per program.
    bc_partial = cfg.bc_partial
    partial_shape = (batch, n_programs, N, L)
    dB = torch.empty(partial_shape, **f32) if B.dim() == 3 and bc_partial else torch.zeros(B.shape, **f32)
    dC = torch.empty(partial_shape, **f32) if C.dim() == 3 and bc_partial else torch.zeros(C.shape, **f32)
    dD = torch.zeros(dim, **f32) if D is not None else None
    dbias = torch.zeros(dim, **f32) if delta_bias is not None else None
    # The adjoint scan reads C right to left within each chunk; a reversed copy keeps those loads vectorised.
    C_rev = _chunk_reversed(C, cfg.t_chunk) if C.dim() == 3 else C
    # Two (dim, N) slots per batch row: the chunk being processed reads one and writes the other.
    adjoint_carry = torch.zeros(batch, 2, dim, N, **f32)
    if dlast_state is not None:
        adjoint_carry[:, n_chunks % 2].copy_(dlast_state)
    _scan_bwd_kernel[(n_programs, batch)](
        u, delta, A, B, C, C_rev, D if D is not None else u, z if z is not None else u,
        delta_bias if delta_bias is not None else u, dout, chunk_states, adjoint_carry,
        du, ddelta, dz if dz is not None else du, dA, dB, dC,
        dD if dD is not None else dA, dbias if dbias is not None else dA, y_gated if y_gated is not None else du,
        dim, L, n_chunks,
        *_strides2(u), *_strides2(delta), *_strides2(z), *_strides2(dout),
        *_strides2(du), *_strides2(ddelta), *_strides2(dz), *_strides2(y_gated),
        A.stride(0), A.stride(1), *_bc_strides(B), *_bc_strides(C),
        N=N, N_POW2=triton.next_power_of_2(N), BLOCK_D=cfg.bwd_block_d, T_CHUNK=cfg.t_chunk,
        B_VARIABLE=B.dim() == 3, C_VARIABLE=C.dim() == 3,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=bool(delta_softplus), BC_PARTIAL=bc_partial, STAGES=cfg.bwd_stages, UNROLL=cfg.bwd_unroll,
        Y_OUT=y_gated is not None,
        num_warps=cfg.bwd_warps, **({"maxnreg": cfg.bwd_maxnreg} if cfg.bwd_maxnreg else {}),
    )
    if bc_partial:
        dB = dB.sum(1) if B.dim() == 3 else dB
        dC = dC.sum(1) if C.dim() == 3 else dC
    return du, ddelta, dz, dA, dB, dC, dD, dbias, adjoint_carry


class SelectiveScanTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, initial_state):
        # the time-contiguous copies (if any) are made once and saved: the backward reads them as they are
        u, delta, z, B, C = (_time_contiguous(t) for t in (u, delta, z, B, C))
        y, chunk_states = scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, chunk_states)
        ctx.delta_softplus = bool(delta_softplus)
        ctx.initial_state_dtype = initial_state.dtype if initial_state is not None else None
        if not return_last_state:
            return y
        return y, chunk_states[:, -1].clone()

    @staticmethod
    def backward(ctx, dy, dlast_state=None):
        u, delta, A, B, C, D, z, delta_bias, chunk_states = ctx.saved_tensors
        du, ddelta, dz, dA, dB, dC, dD, dbias, adjoint_carry = scan_backward(
            u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, chunk_states, dy, dlast_state)
        d_initial = None
        if ctx.initial_state_dtype is not None:  # a_0 h_0, with h_0 the adjoint of the first step (slot 0)
            dt0 = delta[:, :, 0].float() + (delta_bias.float() if delta_bias is not None else 0.0)
            dt0 = F.softplus(dt0) if ctx.delta_softplus else dt0
            d_initial = (torch.exp(dt0[:, :, None] * A.float()) * adjoint_carry[:, 0]).to(ctx.initial_state_dtype)
        return (du, ddelta, dA.to(A.dtype), dB.to(B.dtype), dC.to(C.dtype),
                dD.to(D.dtype) if dD is not None else None, dz,
                dbias.to(delta_bias.dtype) if dbias is not None else None, None, None, d_initial)


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False, initial_state=None):
    """Selective scan with mamba_ssm's ``selective_scan_fn`` layout, fused forward and backward (CUDA only).

    u, delta, z: (batch, dim, L); A: (dim, N) real; B, C: (batch, N, L) or (dim, N); D, delta_bias: (dim,);
    initial_state: (batch, dim, N). Returns y (batch, dim, L) in u's dtype and, with ``return_last_state``,
    also the final state (batch, dim, N) in fp32. Gradients reach every tensor input, ``initial_state`` too.
    """
    return SelectiveScanTriton.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                     initial_state)

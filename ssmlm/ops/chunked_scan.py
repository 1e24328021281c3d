"""The selective scan in pure PyTorch, chunk by chunk: any device, memory bounded in the sequence length.

The scan ``x_t = exp(delta_t A) x_{t-1} + delta_t B_t u_t`` has a (batch, dim, N) state per time step.
Materialising it for the whole sequence costs batch*dim*L*N floats (268 MB for 2 x 256 x 8192 x 16), so we cut
the sequence into chunks of ``chunk_size`` steps and walk over the chunks, carrying the state across boundaries:

* inside a chunk the recurrence ``x_t = a_t x_{t-1} + b_t`` runs in parallel (:func:`_linear_scan`): combine
  neighbouring pairs of steps into one step, scan the half-length sequence, fill in the other half. Every
  factor formed is a product of decays ``a = exp(delta A) <= 1``, so nothing overflows however fast the decay
  (the ``exp(cumsum)`` / ``exp(-cumsum)`` trick does overflow in fp32);
* the state entering a chunk is folded into the chunk's first input, so it propagates with the scan;
* backward keeps only the chunk-boundary states. It walks the chunks from last to first, recomputes a chunk's
  states and runs the adjoint recurrence ``g_t = dL/dx_t + a_{t+1} g_{t+1}`` (the same scan, reversed).

Peak extra memory is O(batch*dim*chunk_size*N) for one chunk's temporaries, O(batch*dim*L) for outputs and
gradients and O(batch*dim*N*L/chunk_size) for the boundary states, never O(batch*dim*L*N).
``ssmlm.ops.scan_ref.selective_scan_ref`` is the specification.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Backward holds ~12 tensors of (batch, dim, chunk, N) floats at a time. On CPUs the speed hardly depends on
# the chunk length, so chunks stay short (4 MB tensors for 2 x 256 x 64 x 16). On GPUs every chunk costs a few
# hundred kernel launches, so chunks are as long as a 64 MB tensor allows (3x faster at 256 than at 64 steps
# for 4 x 624 x 16 on an H100).
CPU_CHUNK_SIZE = 64
GPU_CHUNK_BYTES = 64 * 2**20
GPU_CHUNK_SIZES = (256, 128, 64, 32)


def default_chunk_size(u: torch.Tensor, state_size: int) -> int:
    """The chunk length for u (batch, dim, L) and N = ``state_size`` when the caller gives none."""
    if u.device.type == "cpu":
        return CPU_CHUNK_SIZE
    bytes_per_step = u.shape[0] * u.shape[1] * state_size * 4
    return next((T for T in GPU_CHUNK_SIZES if T * bytes_per_step <= GPU_CHUNK_BYTES), GPU_CHUNK_SIZES[-1])


def _linear_scan(decay: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """All states of ``x_t = decay_t x_{t-1} + inputs_t`` from x_{-1} = 0 along dim 2 (time); O(T) work.

    Steps (2i, 2i+1) compose into one step with decay ``a_2i a_2i+1`` and input ``a_2i+1 b_2i + b_2i+1``; the
    half-length scan of those gives the odd states, and ``x_2i = a_2i x_2i-1 + b_2i`` the even ones.
    """
    T = inputs.shape[2]
    if T == 1:
        return inputs
    pairs = T // 2
    decay_even, decay_odd = decay[:, :, 0:2 * pairs:2], decay[:, :, 1:2 * pairs:2]
    inputs_even, inputs_odd = inputs[:, :, 0:2 * pairs:2], inputs[:, :, 1:2 * pairs:2]
    states_odd = _linear_scan(decay_even * decay_odd, torch.addcmul(inputs_odd, decay_odd, inputs_even))
    states_even = inputs[:, :, 0::2].clone()  # ceil(T/2) steps: includes the last one when T is odd
    states_even[:, :, 1:].addcmul_(decay[:, :, 2::2], states_odd[:, :, :states_even.shape[2] - 1])
    states = torch.empty_like(inputs)
    states[:, :, 0::2] = states_even
    states[:, :, 1::2] = states_odd
    return states


def _reverse_linear_scan(decay: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """All ``g_t = inputs_t + decay_{t+1} g_{t+1}`` from g_T = 0: the adjoint of :func:`_linear_scan`."""
    next_decay = torch.cat([decay[:, :, 1:], torch.ones_like(decay[:, :, :1])], dim=2)
    return _linear_scan(next_decay.flip(2), inputs.flip(2)).flip(2)


def _per_step(B: torch.Tensor) -> torch.Tensor:
    """B or C as (batch, 1, T, N) when input-dependent ((batch, N, T)), as (dim, 1, N) when fixed ((dim, N))."""
    return B.transpose(1, 2)[:, None] if B.dim() == 3 else B[:, None, :]


def _chunk_states(u, delta, A, B, state):
    """A chunk's decays and states (batch, dim, T, N) given its discretised delta and the state entering it."""
    decay = torch.exp(delta[..., None] * A[:, None, :])
    inputs = (delta * u)[..., None] * _per_step(B)
    inputs[:, :, 0] += decay[:, :, 0] * state  # x_0 = a_0 * state + b_0
    return decay, _linear_scan(decay, inputs)


def _chunk(x, start: int, stop: int):
    """The chunk's part of a per-time-step tensor (time last) in fp32; (dim, N) B/C and (dim,) params whole."""
    if x is None:
        return None
    return (x[..., start:stop] if x.dim() == 3 else x).float()


def _sum_to(grad: torch.Tensor, per_step: bool) -> torch.Tensor:
    """Reduce a (batch, dim, T, N) gradient for B or C: over dim when input-dependent, else over batch, time."""
    return grad.sum(1).transpose(1, 2) if per_step else grad.sum((0, 2))


def _discretize(delta, delta_bias, delta_softplus: bool):
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    return F.softplus(delta) if delta_softplus else delta


class _ChunkedSelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, chunk_size):
        batch, dim, L = u.shape
        A32, D32, bias32 = (None if t is None else t.float() for t in (A, D, delta_bias))
        state = (u.new_zeros(batch, dim, A.shape[1], dtype=torch.float32) if initial_state is None
                 else initial_state.float())
        y = torch.empty_like(u)
        boundary_states = []  # the state entering each chunk: all that backward keeps
        for start in range(0, L, chunk_size):
            stop = min(start + chunk_size, L)
            boundary_states.append(state)
            u_c = _chunk(u, start, stop)
            delta_c = _discretize(_chunk(delta, start, stop), bias32, delta_softplus)
            _, states = _chunk_states(u_c, delta_c, A32, _chunk(B, start, stop), state)
            y_c = (states * _per_step(_chunk(C, start, stop))).sum(-1)
            if D is not None:
                y_c += D32[:, None] * u_c
            if z is not None:
                y_c *= F.silu(_chunk(z, start, stop))
            y[..., start:stop] = y_c
            # a copy: a view would pin the whole chunk's states while the boundary state is kept
            state = states[:, :, -1].clone()
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state, torch.stack(boundary_states))
        ctx.delta_softplus, ctx.chunk_size = delta_softplus, chunk_size
        return y, state

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y, grad_last_state):
        u, delta, A, B, C, D, z, delta_bias, initial_state, boundary_states = ctx.saved_tensors
        A32, D32, bias32 = (None if t is None else t.float() for t in (A, D, delta_bias))
        B_per_step, C_per_step = B.dim() == 3, C.dim() == 3
        L = u.shape[-1]
        # gradients of per-time-step inputs are written chunk by chunk in their dtype; those of the shared
        # parameters (and of fixed B, C) are summed over chunks in fp32
        du, ddelta = torch.empty_like(u), torch.empty_like(delta)
        dz = None if z is None else torch.empty_like(z)
        dB = torch.empty_like(B) if B_per_step else torch.zeros_like(B, dtype=torch.float32)
        dC = torch.empty_like(C) if C_per_step else torch.zeros_like(C, dtype=torch.float32)
        dA = torch.zeros_like(A32)
        dD = None if D is None else torch.zeros_like(D32)
        dbias = None if delta_bias is None else torch.zeros_like(bias32)
        grad_state = grad_last_state.float()  # zeros when the caller did not use the last state
        starts = range(0, L, ctx.chunk_size)
        for index in reversed(range(len(starts))):
            start, stop = starts[index], min(starts[index] + ctx.chunk_size, L)
            u_c, B_c, C_c = _chunk(u, start, stop), _chunk(B, start, stop), _chunk(C, start, stop)
            delta_raw = _discretize(_chunk(delta, start, stop), bias32, delta_softplus=False)
            delta_c = F.softplus(delta_raw) if ctx.delta_softplus else delta_raw
            state_in = boundary_states[index]
            decay, states = _chunk_states(u_c, delta_c, A32, B_c, state_in)

            grad_y_c = grad_y[..., start:stop].float()
            if z is not None:  # y = (y_ssm + D u) * silu(z)
                z_c = _chunk(z, start, stop)
                y_ssm = (states * _per_step(C_c)).sum(-1)
                if D is not None:
                    y_ssm += D32[:, None] * u_c
                sig = torch.sigmoid(z_c)
                dz[..., start:stop] = grad_y_c * y_ssm * sig * (1 + z_c * (1 - sig))
                grad_y_c = grad_y_c * z_c * sig
            du_c = torch.zeros_like(u_c)
            if D is not None:
                dD += (grad_y_c * u_c).sum((0, 2))
                du_c += grad_y_c * D32[:, None]

            # y_t = <C_t, x_t>: the gradient reaching each state, then back through the recurrence
            grad_states = grad_y_c[..., None] * _per_step(C_c)
            grad_states[:, :, -1] += grad_state
            dC_c = _sum_to(grad_y_c[..., None] * states, C_per_step)
            grad_inputs = _reverse_linear_scan(decay, grad_states)  # dL/d(inputs_t) = adjoint state g_t

            # x_t = a_t x_{t-1} + (delta_t u_t) B_t, a_t = exp(delta_t A)
            states_prev = torch.cat([state_in[:, :, None], states[:, :, :-1]], dim=2)
            grad_log_decay = grad_inputs * states_prev * decay  # dL/d(delta_t A)
            grad_state = decay[:, :, 0] * grad_inputs[:, :, 0]
            dA += (grad_log_decay * delta_c[..., None]).sum((0, 2))
            grad_delta_u = (grad_inputs * _per_step(B_c)).sum(-1)
            dB_c = _sum_to(grad_inputs * (delta_c * u_c)[..., None], B_per_step)
            du_c += grad_delta_u * delta_c
            du[..., start:stop] = du_c
            grad_delta = grad_delta_u * u_c + (grad_log_decay * A32[:, None, :]).sum(-1)
            if ctx.delta_softplus:
                grad_delta = grad_delta * torch.sigmoid(delta_raw)
            ddelta[..., start:stop] = grad_delta
            if dbias is not None:
                dbias += grad_delta.sum((0, 2))
            for grad, grad_c, per_step in ((dB, dB_c, B_per_step), (dC, dC_c, C_per_step)):
                if per_step:
                    grad[..., start:stop] = grad_c
                else:
                    grad += grad_c

        def cast(grad, like):
            return None if like is None else grad.to(like.dtype)

        return (du, ddelta, cast(dA, A), cast(dB, B), cast(dC, C), cast(dD, D), dz, cast(dbias, delta_bias),
                cast(grad_state, initial_state), None, None)


def selective_scan_chunked(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                           return_last_state=False, initial_state=None, chunk_size: int | None = None):
    """The selective scan (mamba_ssm ``selective_scan_fn`` layout), chunked; see the module docstring.

    u, delta, z: (batch, dim, L); A: (dim, N); B, C: (batch, N, L) or (dim, N); D, delta_bias: (dim,);
    initial_state: (batch, dim, N) or None (zeros); chunk_size: steps per chunk (None: see
    :func:`default_chunk_size`). Returns y (batch, dim, L) in u's dtype [and the last state (batch, dim, N), fp32].
    """
    chunk_size = chunk_size or default_chunk_size(u, A.shape[1])
    y, last_state = _ChunkedSelectiveScan.apply(u, delta, A, B, C, D, z, delta_bias, initial_state,
                                                delta_softplus, chunk_size)
    return (y, last_state) if return_last_state else y

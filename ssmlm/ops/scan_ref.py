"""Sequential reference implementations: the specification every fast kernel is tested against.

They are plain loops over time, slow and obviously correct; tests and benchmarks use them, training does not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def diag_scan_ref(h: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, x0: torch.Tensor | None = None):
    """Per-channel scalar recurrence ``x_t = a*x_{t-1} + b*h_t``, ``y_t = c*x_t``.

    h: (batch, L, H); a, b, c: (H,). Returns y (batch, L, H) and the last state (batch, H).
    """
    x = torch.zeros_like(h[:, 0]) if x0 is None else x0
    ys = []
    for t in range(h.shape[1]):
        x = a * x + b * h[:, t]
        ys.append(c * x)
    return torch.stack(ys, dim=1), x


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, x0=None):
    """The selective scan, one time step at a time (layout of mamba_ssm's ``selective_scan_fn``).

    u, delta, z: (batch, dim, L); A: (dim, N); B, C: (batch, N, L) or (dim, N); D, delta_bias: (dim,).
    ``x_t = exp(delta_t A) x_{t-1} + delta_t B_t u_t``; ``y_t = <C_t, x_t> + D u_t``; ``y *= silu(z)``.
    The state is kept in fp32; the output has u's dtype.
    """
    dtype_in = u.dtype
    u, delta, A = u.float(), delta.float(), A.float()
    B, C = B.float(), C.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, L = u.shape
    x = u.new_zeros(batch, dim, A.shape[1]) if x0 is None else x0.float()
    ys = []
    for t in range(L):
        dA = torch.exp(delta[:, :, t, None] * A)  # (batch, dim, N)
        Bt = B[:, None, :, t] if B.dim() == 3 else B[None]  # (batch|1, 1|dim, N)
        Ct = C[:, None, :, t] if C.dim() == 3 else C[None]
        x = dA * x + (delta[:, :, t] * u[:, :, t])[..., None] * Bt
        ys.append((x * Ct).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.float()[:, None] * u
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(dtype_in)
    return (y, x) if return_last_state else y

"""HiPPO transition matrices and their normal-plus-low-rank (NPLR) form.

Gu, Dao, Ermon, Rudra, Re, "HiPPO: Recurrent Memory with Optimal Polynomial Projections" (2020);
Gu, Goel, Re, "Efficiently Modeling Long Sequences with Structured State Spaces" (S4, 2022).

A HiPPO matrix pair (A, B) defines the continuous-time system x'(t) = A x(t) + B u(t) whose state holds
the coefficients of the input's history projected onto a polynomial basis; A is stable (eigenvalues with
real part <= 0). Each of the three classic measures has the form

    A = A_normal - P P^T        with A_normal = c I + S, S skew-symmetric,

so A_normal is normal, unitarily diagonalisable A_normal = V diag(Lambda) V^*, with every eigenvalue on the
line Re = c (c = -1/2 for LegS, 0 for LegT and LagT). S4 initialises from (Lambda, P, B); S4D and S5 keep
only Lambda ("HiPPO-N", the diagonal part).

Everything is computed in float64 / complex128; callers cast.
"""

from __future__ import annotations

import math

import torch

from ssmlm.errors import ConfigError

MEASURES = ("legs", "legt", "lagt")


def transition(measure: str, N: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The HiPPO (A, B) of ``measure``: A (N, N), B (N,), float64, continuous time, A stable.

    * legs (scaled Legendre, the whole history weighted uniformly):
      A_nk = -sqrt(2n+1) sqrt(2k+1) for n > k, -(n+1) for n = k, 0 above the diagonal; B_n = sqrt(2n+1).
    * legt (translated Legendre, a sliding window; the LMU of Voelker et al.), with S4's timescale halving:
      A_nk = -1/2 sqrt(2n+1) sqrt(2k+1) * (1 if n >= k else (-1)^(n-k)); B_n = 1/2 sqrt(2n+1).
    * lagt (Laguerre, exponentially decaying history): A = I/2 - tril(ones), B_n = 1.
    """
    n = torch.arange(N, dtype=torch.float64)
    row, col = n[:, None], n[None, :]
    if measure == "legs":
        q = torch.sqrt(2 * n + 1)
        A = -torch.tril(q[:, None] * q[None, :], diagonal=-1) - torch.diag(n + 1)
        return A, q.clone()
    if measure == "legt":
        q = torch.sqrt(2 * n + 1)
        sign = torch.where(row >= col, torch.ones_like(row * col), (-1.0) ** (row - col))
        return -0.5 * q[:, None] * sign * q[None, :], 0.5 * q
    if measure == "lagt":
        return 0.5 * torch.eye(N, dtype=torch.float64) - torch.tril(torch.ones(N, N, dtype=torch.float64)), \
            torch.ones(N, dtype=torch.float64)
    raise ConfigError(f"HiPPO measure {measure!r} is unknown; use one of {', '.join(MEASURES)}")


def low_rank(measure: str, N: int) -> torch.Tensor:
    """P (rank, N) such that A + P^T P is c I plus a skew-symmetric matrix (rank 1 for legs/lagt, 2 for legt).

    Derivation: A + A^T + 2 P^T P must be 2c I. For legs, A + A^T = -(q q^T) + I with q_n = sqrt(2n+1)
    (off the diagonal -q_n q_k, on it -2(n+1) = -q_n^2 - 1), so P = q / sqrt(2) = sqrt(n + 1/2), c = -1/2.
    For legt, A + A^T = -1/2 (q q^T + (s q)(s q)^T) with s_n = (-1)^n, so P = [q, s q] / 2.
    For lagt, A + A^T = -1 1^T, so P = 1 / sqrt(2).
    """
    n = torch.arange(N, dtype=torch.float64)
    if measure == "legs":
        return torch.sqrt(n + 0.5)[None, :]
    if measure == "legt":
        q = torch.sqrt(2 * n + 1)
        return torch.stack([q, (-1.0) ** n * q]) / 2
    if measure == "lagt":
        return torch.full((1, N), 0.5**0.5, dtype=torch.float64)
    raise ConfigError(f"HiPPO measure {measure!r} is unknown; use one of {', '.join(MEASURES)}")


def nplr(measure: str, N: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A_normal, P, B) with A = A_normal - P^T P: the normal part (N, N), P (rank, N), B (N,), float64."""
    A, B = transition(measure, N)
    P = low_rank(measure, N)
    return A + P.T @ P, P, B


def dplr(measure: str, N: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The diagonal-plus-low-rank form: (Lambda (N,), P (rank, N), B (N,), V (N, N)), all complex128.

    A = V (diag(Lambda) - P P^*) V^*, with P and B given in the eigenbasis (V^* P, V^* B). Lambda is sorted by
    imaginary part, so its conjugate pairs sit at mirrored positions and Lambda[N//2:] has imag >= 0.
    """
    normal, P, B = nplr(measure, N)
    c = torch.diagonal(normal).mean()  # every diagonal entry is c: the skew part has a zero diagonal
    skew = normal - c * torch.eye(N, dtype=torch.float64)
    # -iS is Hermitian for real skew-symmetric S: eigh gives real w and unitary V with S = V diag(iw) V^*.
    w, V = torch.linalg.eigh(-1j * skew.to(torch.complex128))
    Lambda = torch.complex(torch.full_like(w, c.item()), w)
    Vh = V.conj().T
    return Lambda, P.to(torch.complex128) @ Vh.T, Vh @ B.to(torch.complex128), V


INITS = ("lin", "inv", "real", "legs")  # S4D's diagonal initialisations


def legs_diagonal(N: int) -> torch.Tensor:
    """Eigenvalues of the normal part of HiPPO-LegS, one of each conjugate pair: (N/2,) complex128.

    LegS is A_nk = -sqrt(2n+1) sqrt(2k+1) (n > k), -(n+1) (n = k), 0 (n < k). Adding P P^T with
    P_n = sqrt(n + 1/2) leaves -1/2 I + S with S skew-symmetric (the normal-plus-low-rank form of S4),
    so the eigenvalues are -1/2 + i*w with i*w the eigenvalues of S, in +/- pairs.
    """
    n = torch.arange(N, dtype=torch.float64)
    q = torch.sqrt(2 * n + 1)
    legs = -torch.tril(q[:, None] * q[None, :], diagonal=-1) - torch.diag(n + 1)
    p = torch.sqrt(n + 0.5)
    skew = legs + p[:, None] * p[None, :] + 0.5 * torch.eye(N, dtype=torch.float64)
    # -iS is Hermitian when S is real skew-symmetric: its real eigenvalues w give S's eigenvalues i*w.
    w = torch.linalg.eigvalsh(-1j * skew.to(torch.complex128))  # ascending
    return torch.complex(torch.full((N // 2,), -0.5, dtype=torch.float64), w[N - N // 2:])


def init_A(init: str, N: int) -> torch.Tensor:
    """The N/2 diagonal entries of A (one per conjugate pair) for an S4D initialisation: complex128."""
    n = torch.arange(N // 2, dtype=torch.float64)
    half = torch.full_like(n, -0.5)
    if init == "lin":  # S4D-Lin: frequencies spread linearly, like a Fourier basis
        return torch.complex(half, math.pi * n)
    if init == "inv":  # S4D-Inv: an approximation of LegS's frequencies
        return torch.complex(half, N / math.pi * (N / (2 * n + 1) - 1))
    if init == "real":  # S4D-Real: decaying exponentials, no oscillation
        return torch.complex(-(n + 1), torch.zeros_like(n))
    if init == "legs":
        return legs_diagonal(N)
    raise ConfigError(f"model.init={init!r} is not an S4D initialisation; use one of {', '.join(INITS)}")

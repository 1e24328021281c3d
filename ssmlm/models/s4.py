"""S4: a language model built from structured state-space layers with a diagonal-plus-low-rank state matrix.

Gu, Goel, Re, "Efficiently Modeling Long Sequences with Structured State Spaces" (2022). Each layer runs H
single-input single-output SSMs x' = A x + B u, y = C x + D u, with state size N and A a HiPPO matrix written in
its normal-plus-low-rank eigenbasis:

    A = Lambda - P P^*          Lambda: (N,) complex diagonal, P: (N, r), r = 1 (legs, lagt) or 2 (legt)

(``hippo.dplr``; the HiPPO matrix itself is V A V^* with V unitary). A is real in the HiPPO basis, so Lambda,
P, B and C come in conjugate pairs: only the N/2 modes with Im Lambda > 0 are stored, the other half being their
conjugates (exact for every measure at even N: no eigenvalue of the normal part is real, see ``hippo_half``).
The state is likewise kept as N/2 complex modes x, and y = 2 Re(C x). Because P P^* couples a mode with the
conjugates of the others, the dynamics of x are x' = Lambda x - P (2 Re(P^* x)) + B u: real-linear, not
complex-linear. For dense work (state powers, the ZOH exponential) the layer uses the real coordinates
[Re x, Im x], in which A is an (N, N) real matrix, see :func:`real_form`.

Training convolves the input with the kernel K_l = C dA^l dB (l < L), computed two ways:

* bilinear (S4's algorithm): the truncated generating function sum_{l<L} K_l z^l equals
  C (I - dA^L) (I - z dA)^{-1} dB when z^L = 1, and for the bilinear transform
  (I - z dA)^{-1} dB = 2 [(2/dt)(1 - z) I - (1 + z) A]^{-1} B. With A diagonal-plus-low-rank the Woodbury
  identity turns that resolvent into four Cauchy sums sum_n a_n b_n / ((2/dt)(1 - z) - (1 + z) lambda_n); we
  evaluate them at the L-th roots of unity (L/2 + 1 of them: K is real) and invert with an FFT. Written as plain
  tensor ops the Cauchy sums cost O(H N L) per kernel (S4's fast Cauchy / pykeops kernels are not used), plus
  O(H N^3 log L) for dA^L (below) and O(H L log L) for the FFT. The correction C~ = C (I - dA^L) is computed from C
  each time with dA^L by repeated squaring of the dense discretised matrix, rather than learning C~ directly as the
  S4 code base does: C stays the same parameter at every sequence length (no conversion between lengths, and the
  recurrence reads C as it is), at a cost independent of the batch.
* zoh: dA = expm(dt A) is not diagonal-plus-low-rank, so the kernel is computed densely per channel: the rows
  C dA^j (j < c) by doubling, then blocks of c positions, K_{lo + j} = (C dA^j) (dA^lo dB): O(H N^2 c + H N^3 log c
  + H N^2 L / c + H N L), at most O(H N^2 L) with c = ``kernel_chunk``.

The recurrence (``step``) uses the same discretisation. Bilinear: x <- (I - dt/2 A)^{-1} ((I + dt/2 A) x + dt B u),
the inverse applied by Woodbury in O(N r) per channel, as in S4; the dense bilinear dA is that same update applied to
the N basis states, O(H N^2 r). ZOH: the dense real (dA, dB), O(H N^2) per token plus O(H N^3) to recompute expm at
each call (slower; generation only). ``forward`` continues from a state and returns the final one in closed form
(:func:`krylov_products`, :func:`final_state`): dense powers, looping only over blocks of ``kernel_chunk`` positions.

Precision: kernels are generated in complex64 (fp32 parameters; the layer leaves autocast off for them). Against
fp64 at N = 64 and 256, L up to 4096, dt in [1e-3, 1e-1], the kernels' error relative to their peak is below 5e-5
for legs and legt and below 6e-4 for lagt, whose normal part has eigenvalues near 0 (1/(2 lambda) is large at z = 1).
fp64 is not needed. Cost: at the sizes of this project's presets a layer is bound by kernel launches, not FLOPs
(the kernel takes ~350 small ops forward and backward, independent of the batch): on an H100 an S4 layer with
H = 352, N = 64, L = 512, batch 8 takes ~13 ms forward + backward against ~3 ms for S4D.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ssmlm.errors import ConfigError
from ssmlm.models.base import mark_ssm_dynamics
from ssmlm.models.blocks import BackboneLM, Mixer
from ssmlm.models.cores import log_uniform_dt
from ssmlm.models.hippo import MEASURES, dplr
from ssmlm.models.s4d import GLU_LAYER_LEGACY_NAMES, GLULayer, GLUMixer, check_ssm_sizes
from ssmlm.ops.fftconv import causal_fft_conv

DISCRETIZATIONS = ("bilinear", "zoh")
MIN_DECAY = 1e-4  # Re Lambda is clamped to <= -MIN_DECAY at init (legt and lagt have Re Lambda = 0), as in S4


def hippo_half(measure: str, N: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The conjugate-symmetric half of HiPPO's DPLR form: Lambda (N/2,), P (r, N/2), B (N/2,), V (N, N/2).

    ``hippo.dplr`` sorts the eigenvalues of the normal part by imaginary part; we keep the modes with Im > 0 and
    their eigenvectors V. The full eigenbasis is then [conj(V), V]: when no eigenvalue is real, conj(V)'s columns
    are eigenvectors for the conjugate eigenvalues, orthogonal to V's (tests check [conj(V), V] is unitary and
    rebuilds the HiPPO matrix), and the coordinates of the real P and B in it are (conj(P), P), (conj(B), B).
    """
    Lambda, P, B, V = dplr(measure, N)
    if N % 2 or (Lambda[N // 2:].imag < 1e-6).any():  # a real eigenvalue (always at odd N) is its own conjugate
        raise ConfigError(f"model.d_state={N}: HiPPO-{measure} has a real eigenvalue in its normal part, so its "
                          f"modes do not come in conjugate pairs; use an even d_state")
    return Lambda[N // 2:], P[:, N // 2:], B[N // 2:], V[:, N // 2:]


def solve_small(M: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """M^{-1} b for M (..., r, r), b (..., r) with r = 1 or 2 (the rank of P), batch dimensions broadcast.

    Gaussian elimination with partial pivoting written out: as stable as LAPACK's LU (Cramer's rule is not, in fp32)
    without a batched-LU launch and, on GPU, its host synchronisations, for large batches of tiny Woodbury systems.
    Every one is invertible while Re Lambda < 0 (A + A^* is then negative definite, so I - dt/2 A and a I - s A at
    |z| = 1 are non-singular, and so are their capacitances).
    """
    if M.shape[-1] == 1:
        return b / M[..., 0]
    batch = torch.broadcast_shapes(M.shape[:-2], b.shape[:-1])
    rows = torch.cat([M.expand(*batch, 2, 2), b.expand(*batch, 2)[..., None]], dim=-1)  # [M | b]: (..., 2, 3)
    swap = (M[..., 1, 0].abs() > M[..., 0, 0].abs())[..., None]  # pivot on the larger entry of the first column
    top = torch.where(swap, rows[..., 1, :], rows[..., 0, :])
    bottom = torch.where(swap, rows[..., 0, :], rows[..., 1, :])
    bottom = bottom - bottom[..., :1] / top[..., :1] * top  # eliminate the first unknown
    x1 = bottom[..., 2] / bottom[..., 1]
    return torch.stack([(top[..., 2] - top[..., 1] * x1) / top[..., 0], x1], dim=-1)


def real_coordinates(x: torch.Tensor) -> torch.Tensor:
    """(..., N/2) complex modes -> (..., N) real: [Re x, Im x]."""
    return torch.cat([x.real, x.imag], dim=-1)


def complex_coordinates(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`real_coordinates`."""
    half = x.shape[-1] // 2
    return torch.complex(x[..., :half], x[..., half:])


def readout(C: torch.Tensor) -> torch.Tensor:
    """The real row vector C_r with C_r [Re x, Im x] = 2 Re(C x): (..., N/2) complex -> (..., N)."""
    return 2 * real_coordinates(C.conj())


def real_form(Lambda: torch.Tensor, P: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A (H, N, N) and B (H, N), real, acting on [Re x, Im x].

    x' = Lambda x - P q + B u with q = 2 Re(P^* x) = 2 (Re P . Re x + Im P . Im x) gives, with w_r = [Re P_r, Im P_r],
    A = [[diag Re Lambda, -diag Im Lambda], [diag Im Lambda, diag Re Lambda]] - 2 sum_r w_r w_r^T.
    A + A^T = 2 diag(Re Lambda) - 4 sum_r w_r w_r^T is negative semi-definite while Re Lambda <= 0: the system is
    dissipative, so the bilinear and ZOH dA are contractions and their powers cannot blow up.
    """
    re, im = torch.diag_embed(Lambda.real), torch.diag_embed(Lambda.imag)
    rotation = torch.cat([torch.cat([re, -im], -1), torch.cat([im, re], -1)], -2)
    w = real_coordinates(P)  # (r, H, N)
    return rotation - 2 * torch.einsum("rhn,rhm->hnm", w, w), real_coordinates(B)


def krylov(M: torch.Tensor, v: torch.Tensor, length: int) -> torch.Tensor:
    """[v, M v, ..., M^(length-1) v] for M (H, N, N), v (H, N, m): (H, N, m, length), by doubling (log2 matmuls)."""
    out, power = v[..., None], M
    while out.shape[-1] < length:
        H, N, m, k = out.shape
        out = torch.cat([out, (power @ out.reshape(H, N, m * k)).reshape(H, N, m, k)], dim=-1)
        if out.shape[-1] < length:
            power = power @ power
    return out[..., :length]


def krylov_products(left: torch.Tensor, M: torch.Tensor, right: torch.Tensor, L: int,
                    chunk: int | None) -> torch.Tensor:
    """left_a M^l right_b for l < L, from left (a, H, N), M (H, N, N), right (H, N, b): (a, b, H, L).

    Positions go in blocks of c = ``chunk``: the rows left M^j (j < c) are built once, by doubling, and block
    [lo, lo + c) multiplies them by M^lo right, advanced by one product with M^c per block. Only an
    (H, N, a, c) tensor is ever held. ``chunk=None`` takes all L positions in one block.
    """
    c = L if chunk is None else min(chunk, L)
    rows = krylov(M.transpose(-1, -2), left.permute(1, 2, 0), c)  # (H, N, a, c): (left M^j)^T
    jump = torch.linalg.matrix_power(M, c)
    out = []
    for lo in range(0, L, c):
        out.append(torch.einsum("hnaj,hnb->abhj", rows[..., : min(c, L - lo)], right))
        if lo + c < L:
            right = jump @ right
    return torch.cat(out, dim=-1)


def final_state(u: torch.Tensor, dA: torch.Tensor, dB: torch.Tensor, chunk: int | None) -> torch.Tensor:
    """sum_t dA^(L-1-t) dB u_t, the state after reading u (batch, H, L) from zero: (batch, H, N), real coordinates.

    Horner's rule over blocks of c positions, x <- dA^c x + sum_j dA^j dB u_(hi-1-j), with the vectors dA^j dB
    (j < c) built once by doubling; the first block is the short one so the others all have c positions.
    """
    L = u.shape[-1]
    c = L if chunk is None else min(chunk, L)
    powers_dB = krylov(dA, dB[..., None], c)[..., 0, :]  # (H, N, c)
    jump = torch.linalg.matrix_power(dA, c)
    first = L - c * ((L - 1) // c)
    x = torch.einsum("hnj,bhj->bhn", powers_dB[..., :first], u[..., :first].flip(-1))
    for lo in range(first, L, c):
        block = torch.einsum("hnj,bhj->bhn", powers_dB, u[..., lo:lo + c].flip(-1))
        x = torch.einsum("hnm,bhm->bhn", jump, x) + block
    return x


def bilinear_update(Lambda: torch.Tensor, P: torch.Tensor, B: torch.Tensor, dt: torch.Tensor, x: torch.Tensor,
                    u: torch.Tensor) -> torch.Tensor:
    """A bilinear step x <- (I - dt/2 A)^{-1} ((I + dt/2 A) x + dt B u), half states x (batch, H, N/2), u (batch, H).

    O(N r) per channel, as in S4: with A x = Lambda x - P (2 Re(P^* x)) and I - dt/2 A = E + dt/2 P P^*,
    E = 1 - dt/2 Lambda diagonal, Woodbury gives (E + dt/2 P P^*)^{-1} v = E^{-1} v - E^{-1} P c with
    (2/dt + P^* E^{-1} P) c = P^* E^{-1} v; every P^* (...) sums a mode and its conjugate, 2 Re(...).
    """
    half_dt = (dt / 2)[:, None]
    P = P[:, None]  # (r, 1, H, N/2): broadcasts over the batch
    Px = 2 * (P.conj() * x).sum(-1, keepdim=True).real  # (r, batch, H, 1)
    v = x + half_dt * (Lambda * x - (P * Px).sum(0)) + dt[:, None] * B * u[..., None]
    E = 1 - half_dt * Lambda
    P_E, v_E = P / E, v / E
    capacitance = 2 * (P.conj()[:, None] * P_E).sum(-1).real.movedim((0, 1), (-2, -1))  # P^* E^{-1} P: (1, H, r, r)
    capacitance = capacitance + torch.diag_embed((2 / dt)[:, None].expand(-1, P.shape[0]))
    c = solve_small(capacitance, 2 * (P.conj() * v_E).sum(-1).real.movedim(0, -1))  # (batch, H, r)
    return v_E - (P_E * c.movedim(-1, 0)[..., None]).sum(0)


def bilinear_kernel(C_tilde: torch.Tensor, Lambda: torch.Tensor, P: torch.Tensor, B: torch.Tensor,
                    dt: torch.Tensor, L: int, chunk: int | None) -> torch.Tensor:
    """The bilinear kernels from their generating function: (kernels, H, L) real.

    C_tilde = C (I - dA^L) (kernels, H, N/2), Lambda (H, N/2), P (r, H, N/2), B (H, N/2): conjugate-symmetric
    halves; dt (H,). At z = exp(-2 pi i k / L) the spectrum is 2 C~ (a I - s A)^{-1} B with a = (2/dt)(1 - z),
    s = 1 + z (no pole at z = -1 in this form). Woodbury on a I - s Lambda + s P P^*, with R = (a - s Lambda)^{-1}:

        C~ (a - s A)^{-1} B = C~RB - s C~RP (I + s P^*RP)^{-1} P^*RB,

    each term a Cauchy sum over the N modes. A mode and its conjugate share one denominator (S4's conjugate trick):

        c / (a - s lambda) + conj(c) / (a - s conj(lambda))
            = (2 Re(c) a - 2 Re(c conj(lambda)) s) / (a^2 - 2 Re(lambda) a s + |lambda|^2 s^2),

    so a block of F frequencies costs one (H, N/2, F) reciprocal and a matmul. Frequencies go in blocks of
    ``chunk``; with gradients each block is recomputed in the backward pass (activation checkpointing), so no
    (H, N/2, L) tensor is stored either.
    """
    kernels, rank = C_tilde.shape[0], P.shape[0]
    H, modes = Lambda.shape
    left = torch.cat([C_tilde, P.conj()])  # rows C~, P^*: (kernels + r, H, N/2)
    right = torch.cat([B[None], P])  # columns B, P: (1 + r, H, N/2)
    coef = (left[:, None] * right[None]).permute(2, 0, 1, 3).reshape(H, -1, modes)
    numerators = torch.cat([2 * coef.real, 2 * (coef * Lambda.conj()[:, None]).real], dim=1).to(Lambda.dtype)
    pairs = coef.shape[1]
    Lambda_re, Lambda_abs2 = Lambda.real[..., None], Lambda.abs().square()[..., None]
    eye = torch.eye(rank, dtype=Lambda.dtype, device=Lambda.device)

    def spectrum(z: torch.Tensor) -> torch.Tensor:  # (F,) -> (H, kernels, F)
        a, s = (2 / dt)[:, None, None] * (1 - z), 1 + z  # (H, 1, F), (F,)
        parts = numerators @ (1 / (a * a - 2 * (a * s) * Lambda_re + (s * s) * Lambda_abs2))
        sums = (a * parts[:, :pairs] - s * parts[:, pairs:]).view(H, kernels + rank, 1 + rank, -1)
        CRB, CRP = sums[:, :kernels, 0], sums[:, :kernels, 1:]  # (H, kernels, F), (H, kernels, r, F)
        PRB, PRP = sums[:, kernels:, 0], sums[:, kernels:, 1:]  # (H, r, F), (H, r, r, F)
        woodbury = solve_small(eye + s[:, None, None] * PRP.permute(0, 3, 1, 2), PRB.transpose(1, 2))
        return 2 * (CRB - s * torch.einsum("hkrf,hfr->hkf", CRP, woodbury))

    k = torch.arange(L // 2 + 1, device=Lambda.device, dtype=dt.dtype)
    z = torch.polar(torch.ones_like(k), -2 * math.pi * k / L)
    block = z.shape[0] if chunk is None else chunk
    parts = z.split(block)
    if len(parts) > 1 and torch.is_grad_enabled():
        spectra = [checkpoint(spectrum, part, use_reentrant=False) for part in parts]
    else:
        spectra = [spectrum(part) for part in parts]
    return torch.fft.irfft(torch.cat(spectra, dim=-1), n=L).transpose(0, 1)


class DPLRSSM(Mixer):
    """S4's SSM alone on (batch, L, H): SSM convolution + D skip (the "s4" linear time-invariant core), fp32 out.

    ``init`` picks the HiPPO measure (legs | legt | lagt). ``n_ssm`` copies of (Lambda, P, B) are shared by groups of
    H / n_ssm consecutive channels (``None``: every channel its own, as S4's ``n_ssm``); dt, C and D are always per
    channel. ``bidirectional`` adds a second kernel run backwards in time (non-causal use only: no recurrent form).
    ``kernel_chunk`` bounds the memory of kernels and states (frequencies or positions per block).
    """

    def __init__(self, d_model: int, d_state: int = 64, init: str = "legs", discretization: str = "bilinear",
                 n_ssm: int | None = None, dt_min: float = 1e-3, dt_max: float = 1e-1,
                 bidirectional: bool = False, ssm_lr: float | None = 1e-3, kernel_chunk: int | None = 1024):
        super().__init__()
        check_ssm_sizes(d_state, dt_min, dt_max, kernel_chunk)
        if init not in MEASURES:
            raise ConfigError(f"model.init={init!r} is not a HiPPO measure; use one of {', '.join(MEASURES)}")
        if discretization not in DISCRETIZATIONS:
            raise ConfigError(f"model.discretization={discretization!r}: use one of {', '.join(DISCRETIZATIONS)}")
        n_ssm = d_model if n_ssm is None else n_ssm
        if n_ssm < 1 or d_model % n_ssm:
            raise ConfigError(f"model.n_ssm={n_ssm} must divide d_model={d_model} (or be null: one SSM per channel)")
        self.d_model, self.d_state = d_model, d_state
        self.discretization, self.bidirectional, self.kernel_chunk = discretization, bidirectional, kernel_chunk
        self.causal = not bidirectional
        H, modes = d_model, d_state // 2

        Lambda, P, B, _ = hippo_half(init, d_state)
        # dt log-uniform in [dt_min, dt_max] per channel; Re Lambda stored as log(-Re) so it stays negative.
        self.log_dt = nn.Parameter(log_uniform_dt(H, dt_min, dt_max))
        self.log_Lambda_real = nn.Parameter(torch.log((-Lambda.real).clamp(min=MIN_DECAY)).float().repeat(n_ssm, 1))
        self.Lambda_imag = nn.Parameter(Lambda.imag.float().repeat(n_ssm, 1))
        self.P = nn.Parameter(torch.view_as_real(P[:, None].repeat(1, n_ssm, 1).to(torch.cfloat)))
        self.B = nn.Parameter(torch.view_as_real(B.repeat(n_ssm, 1).to(torch.cfloat)))
        mark_ssm_dynamics(self.log_dt, self.log_Lambda_real, self.Lambda_imag, self.P, self.B, lr=ssm_lr)

        kernels = 2 if bidirectional else 1
        self.C = nn.Parameter(torch.view_as_real(torch.randn(kernels, H, modes, dtype=torch.cfloat)))
        self.D = nn.Parameter(torch.randn(H))

    def dplr(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per channel: Lambda (H, N/2), P (r, H, N/2), B (H, N/2) complex halves, and dt (H,)."""
        copies = self.d_model // self.Lambda_imag.shape[0]
        Lambda = torch.complex(-torch.exp(self.log_Lambda_real), self.Lambda_imag).repeat_interleave(copies, 0)
        P = torch.view_as_complex(self.P).repeat_interleave(copies, 1)
        B = torch.view_as_complex(self.B).repeat_interleave(copies, 0)
        return Lambda, P, B, torch.exp(self.log_dt)

    def discretise(self, ssm: tuple[torch.Tensor, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """dA (H, N, N) and dB (H, N), dense, in real coordinates (from ``ssm``, :meth:`dplr`'s result, if given).

        Bilinear: the columns of dA are the O(N) Woodbury step (:func:`bilinear_update`) applied to the N basis
        states with no input, dB the step from the zero state with u = 1: O(H N^2 r), the same arithmetic as
        ``step``. ZOH: expm([[A, B], [0, 0]] dt) = [[dA, dB], [0, 1]] (so dB = A^{-1} (dA - I) B without inverting
        A), O(H N^3).
        """
        Lambda, P, B, dt = self.dplr() if ssm is None else ssm
        N = self.d_state
        if self.discretization == "bilinear":
            eye = torch.eye(N + 1, N, dtype=dt.dtype, device=dt.device)  # the N basis states, then the zero state
            states = complex_coordinates(eye)[:, None, :].expand(-1, self.d_model, -1)
            inputs = eye.new_zeros(N + 1, self.d_model)
            inputs[N] = 1
            columns = real_coordinates(bilinear_update(Lambda, P, B, dt, states, inputs))  # (N + 1, H, N)
            return columns[:N].permute(1, 2, 0), columns[N]
        A, B = real_form(Lambda, P, B)
        augmented = F.pad(torch.cat([A, B[..., None]], dim=-1), (0, 0, 0, 1))  # a zero last row: (H, N+1, N+1)
        expm = torch.linalg.matrix_exp(dt[:, None, None] * augmented)
        return expm[:, :-1, :-1], expm[:, :-1, -1]

    def kernel(self, L: int, ssm: tuple[torch.Tensor, ...] | None = None,
               discrete: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The convolution kernel(s) K_l = 2 Re(C dA^l dB), l < L: (kernels, H, L), kernels = 2 when bidirectional.

        ``ssm`` and ``discrete`` are :meth:`dplr`'s and :meth:`discretise`'s results when the caller has them.
        """
        ssm = self.dplr() if ssm is None else ssm
        dA, dB = self.discretise(ssm) if discrete is None else discrete
        C = readout(torch.view_as_complex(self.C))  # (kernels, H, N) real
        if self.discretization == "zoh":
            return krylov_products(C, dA, dB[..., None], L, self.kernel_chunk)[:, 0]
        C_tilde = C - torch.einsum("khn,hnm->khm", C, torch.linalg.matrix_power(dA, L))
        Lambda, P, B, dt = ssm
        return bilinear_kernel(complex_coordinates(C_tilde / 2).conj(), Lambda, P, B, dt, L, self.kernel_chunk)

    def forward(self, u: torch.Tensor, state: torch.Tensor | None = None, need_state: bool = True):
        """u: (batch, L, H) -> (y (batch, L, H), state (batch, H, N/2) complex); continues from ``state``.
        Bidirectional: no state (None)."""
        need_state = need_state and not self.bidirectional
        if self.bidirectional and state is not None:
            raise ConfigError("a bidirectional S4 layer has no recurrent state: set model.bidirectional=false")
        L = u.shape[1]
        u_ch = u.transpose(1, 2).to(torch.promote_types(u.dtype, torch.float32))  # (batch, H, L), fp32 at least
        # the SSM's matrices stay in fp32 under mixed precision: its powers and Cauchy sums do not survive bf16
        with torch.autocast(u.device.type, enabled=False):
            ssm = self.dplr()
            dA, dB = self.discretise(ssm)
            K = self.kernel(L, ssm, (dA, dB))
            y = causal_fft_conv(u_ch, K[0], self.D)
            if self.bidirectional:  # anti-causal part: y_t += sum_{s>=1} K1_{s-1} u_{t+s}
                K_back = F.pad(K[1], (1, 0))[:, :L]
                y = y + causal_fft_conv(u_ch.flip(-1), K_back).flip(-1)
            if state is not None:  # the initial state's contribution C dA^(t+1) x0
                x0 = real_coordinates(state).to(dA.dtype)
                C = readout(torch.view_as_complex(self.C)[:1])
                y = y + krylov_products(C, dA, dA @ x0.permute(1, 2, 0), L, self.kernel_chunk)[0]
            if not need_state:
                return y.transpose(1, 2), None
            x = final_state(u_ch, dA, dB, self.kernel_chunk)
            if state is not None:
                x = x + torch.einsum("hnm,bhm->bhn", torch.linalg.matrix_power(dA, L), x0)
        return y.transpose(1, 2), complex_coordinates(x)

    def allocate_state(self, batch_size: int, device=None, dtype=None) -> torch.Tensor:
        """complex64 (complex128 for an fp64 layer) whatever ``dtype``."""
        dtype = torch.promote_types(self.log_dt.dtype, torch.complex64)  # complex64, or complex128 in fp64
        return torch.zeros(batch_size, self.d_model, self.d_state // 2, dtype=dtype, device=device)

    def step(self, u: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One token: u (batch, H), state (batch, H, N/2) -> (y (batch, H), new state)."""
        if self.bidirectional:
            raise ConfigError("a bidirectional S4 layer has no recurrent form: set model.bidirectional=false")
        u_hi = u.to(torch.promote_types(u.dtype, torch.float32))
        with torch.autocast(u.device.type, enabled=False):
            if self.discretization == "bilinear":
                state = bilinear_update(*self.dplr(), state, u_hi)
            else:
                dA, dB = self.discretise()
                x = torch.einsum("hnm,bhm->bhn", dA, real_coordinates(state)) + dB * u_hi[..., None]
                state = complex_coordinates(x)
            y = 2 * (torch.view_as_complex(self.C)[0] * state).real.sum(-1) + self.D * u_hi
        return y, state


class S4Layer(GLULayer):
    """One S4 layer: SSM convolution + D skip -> GELU -> dropout -> Linear(H, 2H) -> GLU; ``init_method`` is the
    HiPPO measure."""

    core = DPLRSSM


class S4LM(BackboneLM):
    """Embedding -> n_layers x pre-norm residual S4 layer -> LayerNorm -> linear head.

    ``bidirectional`` layers need ``causal=False``: a non-causal sequence model (ssmlm.create_model), not an LM.

    The recurrent state is a list with one complex (batch, d_model, d_state/2) tensor per layer.
    """

    legacy_names = GLU_LAYER_LEGACY_NAMES

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, d_state: int = 64, init: str = "legs",
                 discretization: str = "bilinear", n_ssm: int | None = None, dt_min: float = 1e-3,
                 dt_max: float = 1e-1, dropout: float = 0.1, ssm_lr: float | None = 1e-3,
                 kernel_chunk: int | None = 1024, bidirectional: bool = False, causal: bool = True):
        super().__init__(vocab_size, d_model, n_layers, lambda i: GLUMixer(DPLRSSM(
            d_model, d_state=d_state, init=init, discretization=discretization, n_ssm=n_ssm, dt_min=dt_min,
            dt_max=dt_max, ssm_lr=ssm_lr, kernel_chunk=kernel_chunk, bidirectional=bidirectional), d_model, dropout),
            dropout=dropout, causal=causal)

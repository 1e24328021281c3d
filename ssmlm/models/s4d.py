"""S4D: a language model built from diagonal state-space layers.

Gu, Gupta, Goel, Re, "On the Parameterization and Initialization of Diagonal State Space Models" (2022).
Each layer runs H independent single-input single-output SSMs. A real state of size N is kept as
N/2 complex modes (the other half are their conjugates, so outputs are 2 Re(...)):

    x_t = dA x_{t-1} + dB u_t            dA, dB: (H, N/2) complex, discretised from A and dt
    y_t = 2 Re(C x_t) + D u_t

Unrolled from a zero state this is a convolution y = K * u + D u with the kernel
K_l = 2 Re(sum_n C_n dB_n dA_n^l), a Vandermonde product. Training uses the convolution (by FFT),
generation uses the recurrence; :class:`DiagonalSSM` holds both, and tests check that they agree.
(B is fixed to 1 and folded into C, as in S4D: a per-mode scale of B is redundant with C.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ssmlm.errors import ConfigError
from ssmlm.models.base import mark_ssm_dynamics
from ssmlm.models.blocks import BackboneLM, Mixer, SequenceLayer
from ssmlm.models.cores import OutputGLU, check_dt_range, log_uniform_dt
from ssmlm.models.hippo import INITS, init_A, legs_diagonal  # noqa: F401 - S4D's initialisations, here by name
from ssmlm.ops.fftconv import causal_fft_conv

DISCRETIZATIONS = ("zoh", "bilinear")


def _powers(log_dA: torch.Tensor, length: int) -> torch.Tensor:
    """dA^l for l < length: (H, N/2, length) complex."""
    positions = torch.arange(length, device=log_dA.device, dtype=torch.float32)
    return torch.exp(log_dA[..., None] * positions)


def vandermonde(coef: torch.Tensor, log_dA: torch.Tensor, L: int, chunk: int | None) -> torch.Tensor:
    """2 Re(sum_n coef[..., h, n] dA[h, n]^l) for l < L, from coef (..., H, N/2): (..., H, L) real.

    Positions go in blocks of ``chunk``: block [lo, lo + c) is (coef dA^lo) times the powers dA^0..dA^(c-1),
    so only one (H, N/2, chunk) power tensor ever exists, in the forward pass and (saved once, shared by
    all blocks) for backward. ``chunk=None`` computes all L powers at once.
    """
    H, modes = log_dA.shape
    lead = coef.shape[:-2]
    coef = coef.reshape(-1, H, modes).transpose(0, 1)  # (H, M, N/2): batched matmul over channels
    powers = _powers(log_dA, L if chunk is None else min(chunk, L))
    block = powers.shape[-1]
    out = []
    for lo in range(0, L, block):
        shifted = coef * torch.exp(log_dA * lo)[:, None, :]
        out.append(torch.bmm(shifted, powers[..., : min(block, L - lo)]).real)
    out = 2 * torch.cat(out, dim=-1)  # (H, M, L)
    return out.transpose(0, 1).reshape(*lead, H, L)


def final_state(u: torch.Tensor, log_dA: torch.Tensor, dB: torch.Tensor, chunk: int | None) -> torch.Tensor:
    """The state after reading u (batch, H, L) from a zero state: sum_t dA^(L-1-t) dB u_t, (batch, H, N/2).

    In closed form instead of a loop over t, and by blocks of positions like :func:`vandermonde`:
    for t in [lo, hi), dA^(L-1-t) = dA^(L-hi) dA^(hi-1-t).
    """
    L = u.shape[-1]
    powers = _powers(log_dA, L if chunk is None else min(chunk, L))
    block = powers.shape[-1]
    x = u.new_zeros(u.shape[0], *log_dA.shape, dtype=log_dA.dtype)
    for hi in range(L, 0, -block):
        lo = max(0, hi - block)
        reversed_u = u[..., lo:hi].flip(-1).to(log_dA.dtype)  # index j = hi-1-t
        x = x + torch.exp(log_dA * (L - hi)) * torch.einsum("bhj,hnj->bhn", reversed_u, powers[..., : hi - lo])
    return x * dB


def discretise(log_A_real: torch.Tensor, A_imag: torch.Tensor, log_dt: torch.Tensor,
               method: str = "zoh") -> tuple[torch.Tensor, torch.Tensor]:
    """log dA and dB (B = 1), both (H, N/2) complex, of the diagonal A = -exp(log_A_real) + i A_imag (H, N/2)
    with step exp(log_dt) (H,): ZOH, or bilinear (Tustin)."""
    A = torch.complex(-torch.exp(log_A_real), A_imag)
    dt = torch.exp(log_dt)[:, None]
    dtA = A * dt
    if method == "zoh":
        return dtA, (torch.exp(dtA) - 1) / A
    # bilinear: dA = (1 + dtA/2) / (1 - dtA/2), dB = dt / (1 - dtA/2)
    return torch.log((1 + dtA / 2) / (1 - dtA / 2)), dt / (1 - dtA / 2)


def check_ssm_sizes(d_state: int, dt_min: float, dt_max: float, kernel_chunk: int | None) -> None:
    """The config checks every diagonal complex SSM layer (S4D, H3's diagonal SSM) shares."""
    if d_state < 2 or d_state % 2:
        raise ConfigError(f"model.d_state={d_state} must be a positive even number (N/2 conjugate pairs)")
    check_dt_range(dt_min, dt_max)
    if kernel_chunk is not None and kernel_chunk < 1:
        raise ConfigError(f"model.kernel_chunk={kernel_chunk} must be a positive int or null (unchunked)")


class DiagonalSSM(Mixer):
    """S4D's SSM alone on (batch, L, H): y = K * u + D u (an FFT convolution) in training, the recurrence in
    generation; no output non-linearity or projection. The output is fp32 (at least) whatever u's dtype. The
    "s4d" linear time-invariant core (:mod:`ssmlm.models.lti`).

    ``bidirectional`` adds a second kernel run backwards in time (non-causal use only: it has no recurrent
    form). ``kernel_chunk`` bounds the memory of computing kernels and states (see :func:`vandermonde`); it
    changes nothing else. ``c_std``: the scale C is drawn with.
    """

    def __init__(self, d_model: int, d_state: int = 64, init: str = "lin", discretization: str = "zoh",
                 dt_min: float = 1e-3, dt_max: float = 1e-1, bidirectional: bool = False,
                 ssm_lr: float | None = 1e-3, kernel_chunk: int | None = 1024, c_std: float = 1.0):
        super().__init__()
        check_ssm_sizes(d_state, dt_min, dt_max, kernel_chunk)
        if discretization not in DISCRETIZATIONS:
            raise ConfigError(f"model.discretization={discretization!r}: use one of {', '.join(DISCRETIZATIONS)}")
        self.d_model, self.d_state = d_model, d_state
        self.discretization, self.bidirectional, self.kernel_chunk = discretization, bidirectional, kernel_chunk
        self.causal = not bidirectional
        H, modes = d_model, d_state // 2

        # dt log-uniform in [dt_min, dt_max] per channel; A stored as log(-Re A) so Re A stays negative.
        log_dt = log_uniform_dt(H, dt_min, dt_max)
        A = init_A(init, d_state).expand(H, modes).contiguous()
        self.log_dt = nn.Parameter(log_dt)
        self.log_A_real = nn.Parameter(torch.log(-A.real).float())
        self.A_imag = nn.Parameter(A.imag.float())
        mark_ssm_dynamics(self.log_dt, self.log_A_real, self.A_imag, lr=ssm_lr)

        kernels = 2 if bidirectional else 1
        self.C = nn.Parameter(torch.view_as_real(torch.randn(kernels, H, modes, dtype=torch.cfloat) * c_std))
        self.D = nn.Parameter(torch.randn(H))

    def discretise(self) -> tuple[torch.Tensor, torch.Tensor]:
        """log dA and dB (with B = 1), both (H, N/2) complex."""
        return discretise(self.log_A_real, self.A_imag, self.log_dt, self.discretization)

    def kernel(self, L: int) -> torch.Tensor:
        """The convolution kernel(s) K: (kernels, H, L), kernels = 2 when bidirectional."""
        log_dA, dB = self.discretise()
        return vandermonde(torch.view_as_complex(self.C) * dB, log_dA, L, self.kernel_chunk)

    def forward(self, u: torch.Tensor, state: torch.Tensor | None = None, need_state: bool = True):
        """u: (batch, L, H) -> (y (batch, L, H), state (batch, H, N/2) complex); continues from ``state``.
        Bidirectional: no state (None)."""
        need_state = need_state and not self.bidirectional
        if self.bidirectional and state is not None:
            raise ConfigError("a bidirectional S4D layer has no recurrent state: set model.bidirectional=false")
        L = u.shape[1]
        u_ch = u.transpose(1, 2).to(torch.promote_types(u.dtype, torch.float32))  # (batch, H, L), fp32 at least
        log_dA, dB = self.discretise()
        C = torch.view_as_complex(self.C)
        K = vandermonde(C * dB, log_dA, L, self.kernel_chunk)
        y = causal_fft_conv(u_ch, K[0], self.D)
        if self.bidirectional:  # anti-causal part: y_t += sum_{s>=1} K1_{s-1} u_{t+s}
            K_back = F.pad(K[1], (1, 0))[:, :L]
            y = y + causal_fft_conv(u_ch.flip(-1), K_back).flip(-1)
        if state is not None:  # the initial state's contribution 2 Re(C dA^(t+1) x0)
            y = y + vandermonde(C[0] * torch.exp(log_dA) * state, log_dA, L, self.kernel_chunk)
        y = y.transpose(1, 2)
        if not need_state:
            return y, None
        new_state = final_state(u_ch, log_dA, dB, self.kernel_chunk)
        if state is not None:
            new_state = new_state + torch.exp(log_dA * L) * state
        return y, new_state

    def allocate_state(self, batch_size: int, device=None, dtype=None) -> torch.Tensor:
        """complex64 (complex128 for an fp64 layer) whatever ``dtype``."""
        dtype = torch.promote_types(self.log_dt.dtype, torch.complex64)
        return torch.zeros(batch_size, self.d_model, self.d_state // 2, dtype=dtype, device=device)

    def step(self, u: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One token: u (batch, H), state (batch, H, N/2) -> (y (batch, H), new state)."""
        if self.bidirectional:
            raise ConfigError("a bidirectional S4D layer has no recurrent form: set model.bidirectional=false")
        log_dA, dB = self.discretise()
        u_hi = u.to(torch.promote_types(u.dtype, torch.float32))
        state = torch.exp(log_dA) * state + dB * u_hi[..., None]
        y = 2 * (torch.view_as_complex(self.C)[0] * state).real.sum(-1) + self.D * u_hi
        return y, state


class GLUMixer(Mixer):
    """An S4-style layer: a state-space core on (batch, L, H), then GELU -> dropout -> Linear(H, 2H) -> GLU.
    The mixer of S4, S4D and S5 (their cores differ); its state is the core's."""

    def __init__(self, ssm: Mixer, d_model: int, dropout: float = 0.0):
        super().__init__()
        self.ssm = ssm
        self.output = OutputGLU(d_model, dropout)
        self.causal = ssm.causal

    def forward(self, u: torch.Tensor, state=None, need_state: bool = True):
        y, state = self.ssm(u, state, need_state)
        return self.output(y, u.dtype), state

    def step(self, u: torch.Tensor, state):
        y, state = self.ssm.step(u, state)
        return self.output(y, u.dtype), state

    def allocate_state(self, batch_size: int, device=None, dtype=None):
        return self.ssm.allocate_state(batch_size, device, dtype)


# Checkpoints written before the mixer contract kept an S4-style layer's core and output side by side.
GLU_LAYER_LEGACY_NAMES = (r"blocks\.\d+\.ssm\.", (
    (r"blocks\.(\d+)\.ssm\.out_proj\.", r"blocks.\1.mixer.output.out_proj."),
    (r"blocks\.(\d+)\.ssm\.", r"blocks.\1.mixer.ssm."),
))


class GLULayer(SequenceLayer):
    """An S4-style layer on (batch, L, H), its ``core`` -> GELU -> dropout -> Linear(H, 2H) -> GLU, as a plain
    layer: ``layer(x)`` is a tensor. ``init_method`` is the core's ``init`` under the seed project's name."""

    core: type[Mixer]

    def __init__(self, d_model: int, d_state: int = 64, init_method: str | None = None, bidirectional: bool = False,
                 dropout: float = 0.0, **ssm_kwargs):
        if init_method is not None:
            ssm_kwargs["init"] = init_method
        super().__init__(GLUMixer(self.core(d_model, d_state, bidirectional=bidirectional, **ssm_kwargs),
                                  d_model, dropout))


class S4DLayer(GLULayer):
    """One S4D layer: the diagonal SSM (convolution + D skip) -> GELU -> dropout -> Linear(H, 2H) -> GLU."""

    core = DiagonalSSM


class S4DLM(BackboneLM):
    """Embedding -> n_layers x pre-norm residual S4D layer -> LayerNorm -> linear head.

    ``bidirectional`` layers need ``causal=False``: a non-causal sequence model (ssmlm.create_model), not an LM.

    The recurrent state is a list with one complex (batch, d_model, d_state/2) tensor per layer.
    """

    legacy_names = GLU_LAYER_LEGACY_NAMES

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, d_state: int = 64, init: str = "lin",
                 discretization: str = "zoh", dt_min: float = 1e-3, dt_max: float = 1e-1, dropout: float = 0.1,
                 ssm_lr: float | None = 1e-3, kernel_chunk: int | None = 1024, bidirectional: bool = False,
                 causal: bool = True):
        super().__init__(vocab_size, d_model, n_layers, lambda i: GLUMixer(DiagonalSSM(
            d_model, d_state=d_state, init=init, discretization=discretization, dt_min=dt_min, dt_max=dt_max,
            ssm_lr=ssm_lr, kernel_chunk=kernel_chunk, bidirectional=bidirectional), d_model, dropout),
            dropout=dropout, causal=causal)

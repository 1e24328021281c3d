"""S5: a language model built from one multi-input multi-output diagonal SSM per layer.

Smith, Warrington, Linderman, "Simplified State Space Layers for Sequence Modeling" (2023).
Where S4D runs H independent single-channel SSMs, an S5 layer runs one SSM of state size P over all H
channels at once, diagonalised in the eigenbasis of HiPPO-N (the normal part of HiPPO-LegS):

    x_t = dA x_{t-1} + dB u_t          dA = exp(Lambda dt) (P), dB = (dA - 1) / Lambda * B  (P, H)
    y_t = Re(C x_t) + D u_t            C: (H, P) complex, D: (H,)

with a time scale dt per mode (ZOH discretisation). Lambda is closed under conjugation, so only P/2 modes
are kept and y uses 2 Re(C x) ("conj_sym"). The paper runs the recurrence with a parallel scan; since dA is
time-invariant, the states x_t = sum_{s<=t} dA^(t-s) dB u_s are equally a causal convolution per mode, which we
compute by FFT: no loop over time in training, and every state comes out, so the last one is the final state.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ssmlm.errors import ConfigError
from ssmlm.models.base import mark_ssm_dynamics
from ssmlm.models.blocks import BackboneLM, Mixer, SequenceLayer
from ssmlm.models.cores import check_dt_range, log_uniform_dt
from ssmlm.models.hippo import dplr
from ssmlm.models.s4d import GLU_LAYER_LEGACY_NAMES, GLUMixer
from ssmlm.ops.fftconv import next_fast_len


def hippo_n_init(d_state: int, blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lambda (P/2,) and the eigenvectors V (P, P/2) of a block-diagonal HiPPO-N with ``blocks`` blocks.

    Each block is the normal part of LegS of size P/blocks; of each conjugate pair of eigenvalues we keep the
    one with positive imaginary part. Smaller blocks start the modes at lower frequencies (S5, Sec. 4.3).
    """
    size = d_state // blocks
    Lambda, _, _, V = dplr("legs", size)
    Lambda, V = Lambda[size // 2:], V[:, size // 2:]
    return Lambda.repeat(blocks), torch.block_diag(*[V] * blocks)


def causal_mode_conv(bu: torch.Tensor, log_dA: torch.Tensor) -> torch.Tensor:
    """x_t = sum_{s<=t} dA^(t-s) bu_s for bu (batch, L, modes) complex: (batch, L, modes), by complex FFT."""
    L = bu.shape[1]
    n = next_fast_len(2 * L - 1)
    powers = torch.exp(log_dA * torch.arange(L, device=bu.device, dtype=log_dA.real.dtype)[:, None])  # (L, modes)
    x = torch.fft.ifft(torch.fft.fft(bu, n=n, dim=1) * torch.fft.fft(powers, n=n, dim=0), n=n, dim=1)
    return x[:, :L]


class S5SSM(Mixer):
    """S5's MIMO SSM alone on (batch, L, H): y = 2 Re(C x) + D u, fp32 (at least) out."""

    def __init__(self, d_model: int, d_state: int = 64, blocks: int = 1, dt_min: float = 1e-3,
                 dt_max: float = 1e-1, ssm_lr: float | None = 1e-3):
        super().__init__()
        if d_state < 2 or d_state % (2 * blocks):
            raise ConfigError(f"model.d_state={d_state} must be a positive multiple of 2 * model.blocks "
                              f"= {2 * blocks} (each block holds conjugate pairs)")
        check_dt_range(dt_min, dt_max)
        self.d_model, self.d_state = d_model, d_state
        H, modes = d_model, d_state // 2

        Lambda, V = hippo_n_init(d_state, blocks)
        # Re Lambda stored as log(-Re) so the system stays stable whatever the optimizer does.
        self.log_Lambda_real = nn.Parameter(torch.log(-Lambda.real).float())
        self.Lambda_imag = nn.Parameter(Lambda.imag.float())
        self.log_dt = nn.Parameter(log_uniform_dt(modes, dt_min, dt_max))
        mark_ssm_dynamics(self.log_Lambda_real, self.Lambda_imag, self.log_dt, lr=ssm_lr)

        # B and C drawn in the state basis, then moved to the eigenbasis: B~ = V^* B, C~ = C V.
        B = torch.randn(d_state, H, dtype=torch.float64) / math.sqrt(H)  # LeCun normal
        C = torch.randn(H, d_state, dtype=torch.complex128) / math.sqrt(d_state)
        self.B = nn.Parameter(torch.view_as_real((V.conj().T @ B.to(torch.complex128)).to(torch.cfloat)))
        self.C = nn.Parameter(torch.view_as_real((C @ V).to(torch.cfloat)))
        self.D = nn.Parameter(torch.randn(H))

    def discretise(self) -> tuple[torch.Tensor, torch.Tensor]:
        """log dA (P/2,) and dB (P/2, H), complex, by zero-order hold."""
        Lambda = torch.complex(-torch.exp(self.log_Lambda_real), self.Lambda_imag)
        dtLambda = Lambda * torch.exp(self.log_dt)
        return dtLambda, ((torch.exp(dtLambda) - 1) / Lambda)[:, None] * torch.view_as_complex(self.B)

    def _readout(self, u_hi: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return 2 * (x @ torch.view_as_complex(self.C).T).real + self.D * u_hi

    def forward(self, u: torch.Tensor, state: torch.Tensor | None = None, need_state: bool = True):
        """u: (batch, L, H) -> (y, state (batch, P/2)); continues from ``state``."""
        u_hi = u.to(torch.promote_types(u.dtype, torch.float32))
        log_dA, dB = self.discretise()
        x = causal_mode_conv(u_hi.to(dB.dtype) @ dB.T, log_dA)  # (batch, L, P/2)
        if state is not None:  # the initial state's contribution dA^(t+1) x0
            steps = torch.arange(1, u.shape[1] + 1, device=u.device, dtype=u_hi.dtype)[:, None]
            x = x + torch.exp(log_dA * steps) * state[:, None, :]
        return self._readout(u_hi, x), x[:, -1]

    def allocate_state(self, batch_size: int, device=None, dtype=None) -> torch.Tensor:
        """complex64 (complex128 for an fp64 layer) whatever ``dtype``."""
        dtype = torch.promote_types(self.log_dt.dtype, torch.complex64)
        return torch.zeros(batch_size, self.d_state // 2, dtype=dtype, device=device)

    def step(self, u: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One token: u (batch, H), state (batch, P/2) -> (y (batch, H), new state)."""
        u_hi = u.to(torch.promote_types(u.dtype, torch.float32))
        log_dA, dB = self.discretise()
        state = torch.exp(log_dA) * state + u_hi.to(dB.dtype) @ dB.T
        return self._readout(u_hi, state), state


class S5Layer(SequenceLayer):
    """One S5 layer on (batch, L, H): MIMO SSM + D skip -> GELU -> dropout -> Linear(H, 2H) -> GLU.
    ``layer(x)`` is a tensor. Its A starts at HiPPO-N (the normal part of LegS): ``init_method`` "legs" only."""

    def __init__(self, d_model: int, d_state: int = 64, init_method: str = "legs", bidirectional: bool = False,
                 dropout: float = 0.0, **ssm_kwargs):
        if bidirectional:
            raise ConfigError("S5Layer(bidirectional=True) is not implemented; use S4Layer or S4DLayer")
        if init_method != "legs":
            raise ConfigError(f"S5Layer(init_method={init_method!r}): S5 starts at HiPPO-N, use init_method='legs'")
        super().__init__(GLUMixer(S5SSM(d_model, d_state, **ssm_kwargs), d_model, dropout))


class S5LM(BackboneLM):
    """Embedding -> n_layers x pre-norm residual S5 layer -> LayerNorm -> linear head.

    The recurrent state is a list with one complex (batch, d_state/2) tensor per layer.
    """

    legacy_names = GLU_LAYER_LEGACY_NAMES

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, d_state: int = 64, blocks: int = 1,
                 dt_min: float = 1e-3, dt_max: float = 1e-1, dropout: float = 0.1, ssm_lr: float | None = 1e-3):
        super().__init__(vocab_size, d_model, n_layers, lambda i: GLUMixer(S5SSM(
            d_model, d_state=d_state, blocks=blocks, dt_min=dt_min, dt_max=dt_max, ssm_lr=ssm_lr), d_model, dropout),
            dropout=dropout)

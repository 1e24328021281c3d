"""H3 (Hungry Hungry Hippos): a language model of shift-SSM / diagonal-SSM token mixers with multiplicative gates.

Fu, Dao, Saab, Thomas, Rudra, Re, "Hungry Hungry Hippos: Towards Language Modeling with State Space Models" (2023).
An H3 layer projects its input to Q, K, V (like attention) and mixes tokens with two SSMs instead of softmax:

    y = out_proj( Q * SSM_diag( SSM_shift(K) * V ) )

* SSM_shift has a shift matrix as A, so its state holds the last N inputs and its output is a learned causal
  convolution of length N: a short filter that lets K look at the previous few tokens (for "recall the token
  after X" patterns).
* SSM_diag is an S4D layer (one diagonal complex SSM of N/2 conjugate modes per channel, ZOH): a long memory
  of the products K * V, read out by the gate Q.

Head dimension 1 (every channel its own SSM). Training uses convolutions (a grouped conv1d for the short filter,
an FFT convolution for the diagonal kernel); generation keeps the shift register and the diagonal state.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ssmlm.errors import ConfigError
from ssmlm.models.base import BlockStackLM, mark_ssm_dynamics
from ssmlm.models.s4d import INITS, check_ssm_sizes, discretise, final_state, init_A, vandermonde
from ssmlm.ops.fftconv import causal_fft_conv


class H3Layer(nn.Module):
    """One H3 token mixer on (batch, L, H). State: (last N-1 values of K, diagonal SSM state)."""

    def __init__(self, d_model: int, d_state: int = 64, init: str = "lin", dt_min: float = 1e-3,
                 dt_max: float = 1e-1, ssm_lr: float | None = 1e-3, kernel_chunk: int | None = 1024):
        super().__init__()
        check_ssm_sizes(d_state, dt_min, dt_max, kernel_chunk)
        if init not in INITS:
            raise ConfigError(f"model.init={init!r} is not an S4D initialisation; use one of {', '.join(INITS)}")
        self.d_model, self.d_state, self.kernel_chunk = d_model, d_state, kernel_chunk
        H, modes = d_model, d_state // 2
        self.in_proj = nn.Linear(H, 3 * H)
        self.out_proj = nn.Linear(H, H)

        # Shift SSM: its kernel C A^l B with A the shift matrix and B = e_1 is just C, a length-N filter.
        self.shift_kernel = nn.Parameter(torch.randn(H, d_state) / math.sqrt(d_state))

        # Diagonal SSM, as in S4D: dt log-uniform per channel, A stored as log(-Re A) so Re A stays negative.
        A = init_A(init, d_state).expand(H, modes).contiguous()
        self.log_dt = nn.Parameter(torch.rand(H) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        self.log_A_real = nn.Parameter(torch.log(-A.real).float())
        self.A_imag = nn.Parameter(A.imag.float())
        mark_ssm_dynamics(self.log_dt, self.log_A_real, self.A_imag, lr=ssm_lr)
        self.C = nn.Parameter(torch.view_as_real(torch.randn(H, modes, dtype=torch.cfloat) / math.sqrt(modes)))
        self.D = nn.Parameter(torch.randn(H))

    def discretise(self) -> tuple[torch.Tensor, torch.Tensor]:
        """log dA and dB (B = 1, ZOH) of the diagonal SSM, both (H, N/2) complex."""
        return discretise(self.log_A_real, self.A_imag, self.log_dt)

    def _qkv(self, u: torch.Tensor) -> tuple[torch.Tensor, ...]:
        hi = torch.promote_types(u.dtype, torch.float32)  # the SSMs run in fp32 at least
        return tuple(t.to(hi) for t in self.in_proj(u).chunk(3, dim=-1))

    def forward(self, u: torch.Tensor, state=None, return_state: bool = False):
        """u: (batch, L, H). With ``state`` (shift register (batch, H, N-1), diagonal state (batch, H, N/2))
        the sequence continues from it."""
        batch, L, H = u.shape
        q, k, v = (t.transpose(1, 2) for t in self._qkv(u))  # (batch, H, L)
        shift_state, diag_state = self.allocate_state(batch, u.device) if state is None else state

        # Shift SSM: the register's last N-1 inputs (zeros at the start), then this sequence, through the filter.
        k_ext = torch.cat([shift_state.to(k.dtype), k], dim=-1)
        shifted_k = F.conv1d(k_ext, self.shift_kernel.flip(-1).to(k.dtype)[:, None, :], groups=H)  # (batch, H, L)
        kv = shifted_k * v

        log_dA, dB = self.discretise()
        C = torch.view_as_complex(self.C)
        y = causal_fft_conv(kv, vandermonde(C * dB, log_dA, L, self.kernel_chunk), self.D)
        if state is not None:  # the initial state's contribution 2 Re(C dA^(t+1) x0)
            y = y + vandermonde(C * torch.exp(log_dA) * diag_state, log_dA, L, self.kernel_chunk)
        out = self.out_proj((q * y).transpose(1, 2).to(u.dtype))
        if not return_state:
            return out
        new_diag = final_state(kv, log_dA, dB, self.kernel_chunk)
        if state is not None:
            new_diag = new_diag + torch.exp(log_dA * L) * diag_state
        return out, (k_ext[..., k_ext.shape[-1] - (self.d_state - 1):], new_diag)

    def allocate_state(self, batch_size: int, device=None):
        real = self.log_dt.dtype
        shift = torch.zeros(batch_size, self.d_model, self.d_state - 1, dtype=real, device=device)
        diag = torch.zeros(batch_size, self.d_model, self.d_state // 2, device=device,
                           dtype=torch.promote_types(real, torch.complex64))
        return shift, diag

    def step(self, u: torch.Tensor, state):
        """One token: u (batch, H) -> (y (batch, H), new state)."""
        shift_state, diag_state = state
        q, k, v = self._qkv(u)  # (batch, H)
        register = torch.cat([shift_state.to(k.dtype), k[..., None]], dim=-1)  # the last N values of K
        kv = (register * self.shift_kernel.flip(-1)).sum(-1) * v
        log_dA, dB = self.discretise()
        diag_state = torch.exp(log_dA) * diag_state + dB * kv[..., None]
        y = 2 * (torch.view_as_complex(self.C) * diag_state).real.sum(-1) + self.D * kv
        return self.out_proj((q * y).to(u.dtype)), (register[..., 1:], diag_state)


class H3Block(nn.Module):
    """x + dropout(H3(LayerNorm(x))), then (when mlp_expand > 0) x + dropout(MLP(LayerNorm(x)))."""

    def __init__(self, d_model: int, dropout: float, mlp_expand: int, **layer_kwargs):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.mixer = H3Layer(d_model, **layer_kwargs)
        self.dropout = nn.Dropout(dropout)
        self.mlp = None
        if mlp_expand > 0:
            self.mlp = nn.Sequential(nn.LayerNorm(d_model), nn.Linear(d_model, mlp_expand * d_model), nn.GELU(),
                                     nn.Linear(mlp_expand * d_model, d_model), nn.Dropout(dropout))

    def _mlp(self, x):
        return x if self.mlp is None else x + self.mlp(x)

    def forward(self, x, state=None, return_state=False):
        out = self.mixer(self.norm(x), state, return_state)
        if return_state:
            out, state = out
        x = self._mlp(x + self.dropout(out))
        return (x, state) if return_state else x

    def allocate_state(self, batch_size, device=None):
        return self.mixer.allocate_state(batch_size, device)

    def step(self, x, state):
        out, state = self.mixer.step(self.norm(x), state)
        return self._mlp(x + self.dropout(out)), state


class H3LM(BlockStackLM):
    """Embedding -> n_layers x H3Block -> LayerNorm -> linear head.

    The recurrent state is a list with one (shift register, diagonal state) pair per layer.
    """

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, d_state: int = 64, init: str = "lin",
                 dt_min: float = 1e-3, dt_max: float = 1e-1, mlp_expand: int = 2, dropout: float = 0.1,
                 ssm_lr: float | None = 1e-3, kernel_chunk: int | None = 1024):
        super().__init__()
        if mlp_expand < 0:
            raise ConfigError(f"model.mlp_expand={mlp_expand} must be >= 0 (0: no MLP after each H3 layer)")
        self._build_stack(vocab_size, d_model, (
            H3Block(d_model, dropout, mlp_expand, d_state=d_state, init=init, dt_min=dt_min, dt_max=dt_max,
                    ssm_lr=ssm_lr, kernel_chunk=kernel_chunk)
            for _ in range(n_layers)
        ))

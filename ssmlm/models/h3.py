"""H3 (Hungry Hungry Hippos): a language model of shift-SSM / diagonal-SSM token mixers with multiplicative gates.

Fu, Dao, Saab, Thomas, Rudra, Re, "Hungry Hungry Hippos: Towards Language Modeling with State Space Models" (2023).
An H3 layer projects its input to Q, K, V (like attention) and mixes tokens with two SSMs instead of softmax:

    y = out_proj( Q * SSM_diag( SSM_shift(K) * V ) )

* SSM_shift has a shift matrix as A, so its state holds the last N inputs and its output is a learned causal
  convolution of length N: a short filter that lets K look at the previous few tokens (for "recall the token
  after X" patterns).
* SSM_diag is a linear time-invariant SSM (``ssm_layer``, :mod:`ssmlm.models.lti`): by default S4D's (one
  diagonal complex SSM of N/2 conjugate modes per channel, ZOH), or S4's DPLR one, or the reference's real diagonal
  recurrence: a long memory of the products K * V, read out by the gate Q.

Head dimension 1 (every channel its own SSM). Training uses convolutions (a grouped conv1d for the short filter,
an FFT convolution for the SSM kernel); generation keeps the shift register and the SSM's state.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ssmlm.errors import ConfigError
from ssmlm.models.blocks import BackboneLM, Mixer, SequenceLayer, feed_forward
from ssmlm.models.lti import make_lti_core


class H3Mixer(Mixer):
    """One H3 token mixer on (batch, L, H). State: (last N-1 values of K, the SSM's state).

    ``ssm_layer``: the SSM_diag core (diag | s4d | s4); ``init`` its initialisation (None: the core's default),
    ``ssm_kwargs`` more of its options. With s4d, C starts at 1/sqrt(N/2) of S4D's scale.
    """

    def __init__(self, d_model: int, d_state: int = 64, ssm_layer: str = "s4d", init: str | None = None,
                 dt_min: float = 1e-3, dt_max: float = 1e-1, ssm_lr: float | None = 1e-3,
                 kernel_chunk: int | None = 1024, **ssm_kwargs):
        super().__init__()
        if d_state < 2:
            raise ConfigError(f"model.d_state={d_state} must be at least 2 (the shift filter's length)")
        self.d_model, self.d_state = d_model, d_state
        self.in_proj = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        # Shift SSM: its kernel C A^l B with A the shift matrix and B = e_1 is just C, a length-N filter.
        self.shift_kernel = nn.Parameter(torch.randn(d_model, d_state) / math.sqrt(d_state))
        if ssm_layer == "diag":
            ssm_kwargs = dict(ssm_kwargs)
        else:
            ssm_kwargs = dict(dt_min=dt_min, dt_max=dt_max, ssm_lr=ssm_lr, kernel_chunk=kernel_chunk, **ssm_kwargs)
            if init is not None:  # None: the core's own default
                ssm_kwargs["init"] = init
            if ssm_layer == "s4d":
                ssm_kwargs.setdefault("c_std", 1 / math.sqrt(d_state // 2))
        self.ssm = make_lti_core(ssm_layer, d_model, d_state, **ssm_kwargs)
        self.causal = self.ssm.causal  # a bidirectional core makes the mixer non-causal (its shift SSM stays causal)

    def _qkv(self, u: torch.Tensor) -> tuple[torch.Tensor, ...]:
        hi = torch.promote_types(u.dtype, torch.float32)  # the SSMs run in fp32 at least
        return tuple(t.to(hi) for t in self.in_proj(u).chunk(3, dim=-1))

    def forward(self, u: torch.Tensor, state=None, need_state: bool = True):
        """u: (batch, L, H). With ``state`` (shift register (batch, H, N-1), SSM state) the sequence continues."""
        batch, L, H = u.shape
        need_state = need_state and self.causal
        q, k, v = self._qkv(u)  # (batch, L, H)
        shift_state, ssm_state = (None, None) if state is None else state
        if shift_state is None:
            shift_state = k.new_zeros(batch, H, self.d_state - 1)

        # Shift SSM: the register's last N-1 inputs (zeros at the start), then this sequence, through the filter.
        k_ext = torch.cat([shift_state.to(k.dtype), k.transpose(1, 2)], dim=-1)
        shifted_k = F.conv1d(k_ext, self.shift_kernel.flip(-1).to(k.dtype)[:, None, :], groups=H)  # (batch, H, L)
        y, ssm_state = self.ssm(shifted_k.transpose(1, 2) * v, ssm_state, need_state)
        out = self.out_proj((q * y).to(u.dtype))
        if not need_state:
            return out, None
        return out, (k_ext[..., k_ext.shape[-1] - (self.d_state - 1):], ssm_state)

    def allocate_state(self, batch_size: int, device=None, dtype=None):
        shift = torch.zeros(batch_size, self.d_model, self.d_state - 1, dtype=self.shift_kernel.dtype, device=device)
        return shift, self.ssm.allocate_state(batch_size, device, dtype)

    def step(self, u: torch.Tensor, state):
        """One token: u (batch, H) -> (y (batch, H), new state)."""
        shift_state, ssm_state = state
        q, k, v = self._qkv(u)  # (batch, H)
        register = torch.cat([shift_state.to(k.dtype), k[..., None]], dim=-1)  # the last N values of K
        kv = (register * self.shift_kernel.flip(-1)).sum(-1) * v
        y, ssm_state = self.ssm.step(kv, ssm_state)
        return self.out_proj((q * y).to(u.dtype)), (register[..., 1:], ssm_state)


class H3Layer(SequenceLayer):
    """One H3 token mixer as a layer: ``layer(x)`` is a tensor of x's shape. ``ssm_layer``: diag | s4d | s4;
    ``init_method`` is the core's ``init`` under the seed project's name; ``bidirectional`` goes to the core;
    ``dropout`` is on the output."""

    def __init__(self, d_model: int, d_state: int = 64, ssm_layer: str = "s4d", init_method: str | None = None,
                 dropout: float = 0.0, **mixer_kwargs):
        if init_method is not None:
            mixer_kwargs["init"] = init_method
        super().__init__(H3Mixer(d_model, d_state, ssm_layer, **mixer_kwargs), dropout)


def _add_mode_axis(C: torch.Tensor) -> torch.Tensor:
    return C[None]


class H3LM(BackboneLM):
    """Embedding -> n_layers x [x + H3(LN x), then x + MLP(LN x) when mlp_expand > 0] -> LayerNorm -> head.

    The recurrent state is a list with one (shift register, SSM state) pair per layer. ``ssm_kwargs``: more
    options of the SSM core (e.g. ``bidirectional``, which needs ``causal=False``: not a language model then);
    ``activation``: the MLP's.
    """

    # before the mixer contract the mixer held S4D's parameters itself, C without the kernels axis
    legacy_names = (r"blocks\.\d+\.mixer\.log_dt$", (
        (r"blocks\.(\d+)\.mixer\.C$", r"blocks.\1.mixer.ssm.C", _add_mode_axis),
        (r"blocks\.(\d+)\.mixer\.(log_dt|log_A_real|A_imag|D)$", r"blocks.\1.mixer.ssm.\2"),
    ))

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, d_state: int = 64, ssm_layer: str = "s4d",
                 init: str | None = None, dt_min: float = 1e-3, dt_max: float = 1e-1, mlp_expand: int = 2,
                 dropout: float = 0.1, ssm_lr: float | None = 1e-3, kernel_chunk: int | None = 1024,
                 activation: str = "gelu", ssm_kwargs: dict | None = None, causal: bool = True):
        if mlp_expand < 0:
            raise ConfigError(f"model.mlp_expand={mlp_expand} must be >= 0 (0: no MLP after each H3 layer)")
        super().__init__(
            vocab_size, d_model, n_layers,
            lambda i: H3Mixer(d_model, d_state, ssm_layer, init=init, dt_min=dt_min, dt_max=dt_max, ssm_lr=ssm_lr,
                              kernel_chunk=kernel_chunk, **(ssm_kwargs or {})),
            make_mlp=lambda i: feed_forward(d_model, mlp_expand * d_model, dropout, activation) if mlp_expand > 0
            else None, dropout=dropout, causal=causal)

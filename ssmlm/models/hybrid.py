"""Gated-MLP SSM hybrids: GSS-style blocks, with causal self-attention at chosen depths.

Mehta, Gupta, Cutkosky, Neyshabur, "Long Range Language Modeling via Gated State Spaces" (2022). A GSS block
is a gated MLP with an SSM on one branch; H3 and Mamba gate their SSMs the same way. Here, per block:

    u = act(W_u LN(x))   (ssm_dim channels)        v = act(W_v LN(x))   (d_inner = expand * d_model)
    x <- x + dropout(W_o(W_up SSM(u) * v))

W_up is there only when ``ssm_dim`` differs from d_inner: GSS runs its SSM on a narrower stream and projects
it back up. By default ``ssm_dim`` = d_inner and the SSM's output gates v directly, as in H3 and Mamba.

The SSM (``ssm``), one scalar-input SSM per channel, is one of:

* ``s4d``: S4D's diagonal complex SSM (:class:`ssmlm.models.s4d.DiagonalSSM`, the core of an S4D layer: N/2
  conjugate modes, ZOH), time-invariant: an FFT convolution in training, the recurrence in generation.
* ``selective``: Mamba's selective SSM (dt, B, C computed from the input; A real, S4D-Real init) through
  :func:`ssmlm.ops.selective_scan.selective_scan`. Mamba's short convolution is left out: the block here is
  the gated MLP, the same for both SSMs.

``attn_layers`` makes some layers Transformer blocks (causal self-attention with rotary positions, then an
MLP) from :mod:`ssmlm.models.transformer`: 0-based indices, negative ones counting from the end, so ``[-1]``
names the last layer at every depth.

Recurrent state: a list with one entry per layer, the SSM's state or, for an attention layer, a
:class:`KVCache` allocated for ``max_seq_len`` positions, written in place as the Transformer's, and grown when a
longer sequence comes (rotary positions have no table, so the capacity is no limit on the positions the model can
read). The cache's ``length`` is the position of the next token, so rotary positions continue after a prompt.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ssmlm.errors import ConfigError
from ssmlm.models.base import mark_ssm_dynamics
from ssmlm.models.blocks import Mixer, feed_forward
from ssmlm.models.cores import check_dt_range, init_selective_dynamics, selective_projections, selective_step
from ssmlm.models.s4d import DiagonalSSM
from ssmlm.models.transformer import AttentionLM, SelfAttention, attention_block_legacy_names
from ssmlm.ops.selective_scan import check_backend, selective_scan

ACTIVATIONS = {"gelu": F.gelu, "silu": F.silu}
DEFAULT_D_STATE = {"s4d": 32, "selective": 16}  # per channel; see conf/model/hybrid.yaml


class SelectiveSSM(Mixer):
    """Mamba's selective SSM alone on (batch, L, H): ``x_t = exp(dt_t A) x_{t-1} + dt_t B_t u_t``,
    ``y_t = C_t x_t + D u_t``, with dt_t, B_t, C_t projected from u_t. The state (batch, H, N) is fp32."""

    def __init__(self, dim: int, d_state: int = 16, dt_rank: int | str = "auto", dt_min: float = 1e-3,
                 dt_max: float = 1e-1, ssm_lr: float | None = 1e-3, scan_backend: str = "auto"):
        super().__init__()
        check_dt_range(dt_min, dt_max)
        if d_state < 1:
            raise ConfigError(f"model.d_state={d_state} must be positive")
        self.dim, self.d_state = dim, d_state
        self.dt_rank = math.ceil(dim / 16) if dt_rank == "auto" else int(dt_rank)
        self.scan_backend = check_backend(scan_backend)
        self.x_proj, self.dt_proj = selective_projections(dim, d_state, self.dt_rank)
        self.A_log, self.D = init_selective_dynamics(self.dt_proj, dim, d_state, dt_min, dt_max, dt_init_floor=0.0)
        mark_ssm_dynamics(self.A_log, self.dt_proj.bias, lr=ssm_lr)

    def _dt_B_C(self, u: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """dt before its bias and softplus (..., H), B and C (..., N)."""
        dt, B, C = torch.split(self.x_proj(u), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        return F.linear(dt, self.dt_proj.weight), B, C

    def forward(self, u: torch.Tensor, state: torch.Tensor | None = None, need_state: bool = True):
        """u: (batch, L, H) -> (y (batch, L, H), state (batch, H, N)); continues from ``state``."""
        delta, B, C = (t.transpose(1, 2) for t in self._dt_B_C(u))
        out = selective_scan(
            u.transpose(1, 2), delta, -torch.exp(self.A_log.float()), B.contiguous(), C.contiguous(),
            D=self.D.float(), delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
            return_last_state=need_state, backend=self.scan_backend, initial_state=state)
        y, state = out if need_state else (out, None)
        return y.transpose(1, 2), state

    def allocate_state(self, batch_size: int, device=None, dtype=None) -> torch.Tensor:
        return torch.zeros(batch_size, self.dim, self.d_state, device=device, dtype=torch.float32)

    def step(self, u: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One token: u (batch, H) -> (y (batch, H), new state), in fp32 like the scan."""
        delta, B, C = self._dt_B_C(u)
        y, state = selective_step(u, delta, self.dt_proj.bias, self.A_log, B, C, self.D, state)
        return y.to(u.dtype), state


class GatedSSMMixer(Mixer):
    """``W_o(W_up SSM(act(W_u x)) * act(W_v x))``; W_up only when ssm_dim != d_inner."""

    def __init__(self, d_model: int, d_inner: int, ssm_dim: int, ssm: Mixer, activation: str):
        super().__init__()
        self.ssm_dim, self.d_inner = ssm_dim, d_inner
        self.act = ACTIVATIONS[activation]
        self.in_proj = nn.Linear(d_model, self.ssm_dim + d_inner)  # W_u and W_v in one matmul
        self.ssm = ssm
        self.up_proj = nn.Linear(self.ssm_dim, d_inner) if self.ssm_dim != d_inner else None
        self.out_proj = nn.Linear(d_inner, d_model)

    def _branches(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u, v = self.in_proj(x).split([self.ssm_dim, self.d_inner], dim=-1)
        return self.act(u), self.act(v)

    def _output(self, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        y = y.to(v.dtype)  # S4D's SSM computes in fp32 at least
        if self.up_proj is not None:
            y = self.up_proj(y)
        return self.out_proj(y * v)

    def forward(self, x: torch.Tensor, state=None, need_state: bool = True):
        u, v = self._branches(x)
        y, state = self.ssm(u, state, need_state)
        return self._output(y, v), state

    def allocate_state(self, batch_size: int, device=None, dtype=None):
        return self.ssm.allocate_state(batch_size, device, dtype)

    def step(self, x: torch.Tensor, state):
        u, v = self._branches(x)
        y, state = self.ssm.step(u, state)
        return self._output(y, v), state


def attention_layer_indices(attn_layers, n_layers: int) -> tuple[int, ...]:
    """``model.attn_layers`` as sorted non-negative indices; a ConfigError for anything out of range."""
    valid = (f"0-based layer indices in [-{n_layers}, {n_layers - 1}] for model.n_layers={n_layers} (negative ones "
             f"count from the end)")
    indices = []
    for i in attn_layers or ():
        if isinstance(i, bool) or not isinstance(i, int) or not -n_layers <= i < n_layers:
            raise ConfigError(f"model.attn_layers={list(attn_layers)}: {i!r} is not a layer; use {valid}")
        if i % n_layers in indices:
            raise ConfigError(f"model.attn_layers={list(attn_layers)} names layer {i % n_layers} twice; use {valid}")
        indices.append(i % n_layers)
    return tuple(sorted(indices))


class HybridLM(AttentionLM):
    """Embedding -> n_layers blocks (gated-MLP SSM, or attention + MLP at ``attn_layers``) -> LayerNorm -> head.

    ``max_seq_len`` is the capacity a KV cache starts with (None without attention layers), not a limit.
    """

    # before the mixer contract a block held the gated MLP's parts itself, an attention block a "transformer"
    legacy_names = (r"blocks\.\d+\.(ssm|in_proj|transformer)\.", (
        *attention_block_legacy_names("transformer."),
        (r"blocks\.(\d+)\.(in_proj|ssm|up_proj|out_proj)\.", r"blocks.\1.mixer.\2."),
    ))

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, ssm: str = "s4d", expand: float = 2,
                 ssm_dim: int | None = None, activation: str = "gelu", d_state: int | None = None,
                 init: str = "lin", dt_min: float = 1e-3, dt_max: float = 1e-1, dt_rank: int | str = "auto",
                 ssm_lr: float | None = 1e-3, kernel_chunk: int | None = 1024, scan_backend: str = "auto",
                 attn_layers=(), head_dim: int = 8, mlp_ratio: int = 2, max_seq_len: int = 1024,
                 dropout: float = 0.1):
        if ssm not in DEFAULT_D_STATE:
            raise ConfigError(f"model.ssm={ssm!r}: use one of {', '.join(DEFAULT_D_STATE)}")
        if activation not in ACTIVATIONS:
            raise ConfigError(f"model.activation={activation!r}: use one of {', '.join(ACTIVATIONS)}")
        d_inner = int(expand * d_model)
        if d_inner < 1:
            raise ConfigError(f"model.expand={expand}: the gated MLP's width expand * d_model must be positive")
        if ssm_dim is not None and ssm_dim < 1:
            raise ConfigError(f"model.ssm_dim={ssm_dim} must be a positive width, or null for expand * d_model")
        attention = attention_layer_indices(attn_layers, n_layers)
        if attention:
            if d_model % head_dim or head_dim % 2:
                raise ConfigError(f"model.d_model={d_model} must be a multiple of model.head_dim={head_dim}, "
                                  f"an even number (rotary positions), when model.attn_layers is set")
            if max_seq_len < 1:
                raise ConfigError(f"model.max_seq_len={max_seq_len} must be positive (the KV cache's capacity)")
        d_state = DEFAULT_D_STATE[ssm] if d_state is None else d_state
        dim = d_inner if ssm_dim is None else ssm_dim

        def make_mixer(i: int) -> Mixer:
            if i in attention:
                return SelfAttention(d_model, d_model // head_dim, dropout, rope=True, capacity=max_seq_len,
                                     grow_cache=True)
            if ssm == "s4d":
                core = DiagonalSSM(dim, d_state=d_state, init=init, dt_min=dt_min, dt_max=dt_max, ssm_lr=ssm_lr,
                                   kernel_chunk=kernel_chunk)
            else:
                core = SelectiveSSM(dim, d_state=d_state, dt_rank=dt_rank, dt_min=dt_min, dt_max=dt_max,
                                    ssm_lr=ssm_lr, scan_backend=scan_backend)
            return GatedSSMMixer(d_model, d_inner, dim, core, activation)

        super().__init__(vocab_size, d_model, n_layers, make_mixer,
                         make_mlp=lambda i: feed_forward(d_model, mlp_ratio * d_model, dropout) if i in attention
                         else None, dropout=dropout)
        self.attn_layers = attention

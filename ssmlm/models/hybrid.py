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

Recurrent state: a list with one entry per layer, the SSM's state or, for an attention layer, a one-layer
:class:`KVCache` allocated for ``max_seq_len`` positions, written in place as the Transformer's, and grown when a
longer sequence comes. The cache's ``length`` is the position of the next token, so rotary positions continue
after a prompt.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ssmlm.errors import ConfigError
from ssmlm.models.base import BlockStackLM, mark_ssm_dynamics, set_optim
from ssmlm.models.s4d import DiagonalSSM
from ssmlm.models.transformer import KVCache, TransformerBlock
from ssmlm.ops.selective_scan import check_backend, selective_scan

ACTIVATIONS = {"gelu": F.gelu, "silu": F.silu}
DEFAULT_D_STATE = {"s4d": 32, "selective": 16}  # per channel; see conf/model/hybrid.yaml


class SelectiveSSM(nn.Module):
    """Mamba's selective SSM alone on (batch, L, H): ``x_t = exp(dt_t A) x_{t-1} + dt_t B_t u_t``,
    ``y_t = C_t x_t + D u_t``, with dt_t, B_t, C_t projected from u_t. The state (batch, H, N) is fp32."""

    def __init__(self, dim: int, d_state: int = 16, dt_rank: int | str = "auto", dt_min: float = 1e-3,
                 dt_max: float = 1e-1, ssm_lr: float | None = 1e-3, scan_backend: str = "auto"):
        super().__init__()
        if not 0 < dt_min <= dt_max:
            raise ConfigError(f"model.dt_min={dt_min}, model.dt_max={dt_max}: need 0 < dt_min <= dt_max")
        if d_state < 1:
            raise ConfigError(f"model.d_state={d_state} must be positive")
        self.dim, self.d_state = dim, d_state
        self.dt_rank = math.ceil(dim / 16) if dt_rank == "auto" else int(dt_rank)
        self.scan_backend = check_backend(scan_backend)
        self.x_proj = nn.Linear(dim, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, dim)
        # Mamba's init: dt starts log-uniform in [dt_min, dt_max] (dt_proj's bias is its inverse softplus),
        # A = -(1, ..., N) for every channel (S4D-Real), kept as log(-A) so that A stays negative
        nn.init.uniform_(self.dt_proj.weight, -self.dt_rank ** -0.5, self.dt_rank ** -0.5)
        dt = torch.exp(torch.rand(dim) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(dim, 1))
        self.D = nn.Parameter(torch.ones(dim))
        mark_ssm_dynamics(self.A_log, self.dt_proj.bias, lr=ssm_lr)
        set_optim(self.D, weight_decay=0.0)

    def _dt_B_C(self, u: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """dt before its bias and softplus (..., H), B and C (..., N)."""
        dt, B, C = torch.split(self.x_proj(u), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        return F.linear(dt, self.dt_proj.weight), B, C

    def forward(self, u: torch.Tensor, state: torch.Tensor | None = None, return_state: bool = False):
        """u: (batch, L, H) -> y (batch, L, H) [, state (batch, H, N)]; continues from ``state``."""
        delta, B, C = (t.transpose(1, 2) for t in self._dt_B_C(u))
        out = selective_scan(
            u.transpose(1, 2), delta, -torch.exp(self.A_log.float()), B.contiguous(), C.contiguous(),
            D=self.D.float(), delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
            return_last_state=return_state, backend=self.scan_backend, initial_state=state)
        if not return_state:
            return out.transpose(1, 2)
        y, state = out
        return y.transpose(1, 2), state

    def allocate_state(self, batch_size: int, device=None) -> torch.Tensor:
        return torch.zeros(batch_size, self.dim, self.d_state, device=device, dtype=torch.float32)

    def step(self, u: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One token: u (batch, H) -> (y (batch, H), new state), in fp32 like the scan."""
        delta, B, C = self._dt_B_C(u)
        delta = F.softplus(delta.float() + self.dt_proj.bias.float())  # (batch, H)
        u32 = u.float()
        state = (torch.exp(delta[..., None] * -torch.exp(self.A_log.float())) * state
                 + (delta * u32)[..., None] * B.float()[:, None])
        y = (state * C.float()[:, None]).sum(-1) + self.D.float() * u32
        return y.to(u.dtype), state


class GatedSSMBlock(nn.Module):
    """``x + dropout(W_o(W_up SSM(act(W_u LN x)) * act(W_v LN x)))``; W_up only when ssm_dim != d_inner."""

    def __init__(self, d_model: int, d_inner: int, ssm_dim: int, ssm: nn.Module, activation: str, dropout: float):
        super().__init__()
        self.ssm_dim, self.d_inner = ssm_dim, d_inner
        self.act = ACTIVATIONS[activation]
        self.norm = nn.LayerNorm(d_model)
        self.in_proj = nn.Linear(d_model, self.ssm_dim + d_inner)  # W_u and W_v in one matmul
        self.ssm = ssm
        self.up_proj = nn.Linear(self.ssm_dim, d_inner) if self.ssm_dim != d_inner else None
        self.out_proj = nn.Linear(d_inner, d_model)
        self.dropout = nn.Dropout(dropout)

    def _branches(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u, v = self.in_proj(self.norm(x)).split([self.ssm_dim, self.d_inner], dim=-1)
        return self.act(u), self.act(v)

    def _residual(self, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        y = y.to(v.dtype)  # S4D's SSM computes in fp32 at least
        if self.up_proj is not None:
            y = self.up_proj(y)
        return x + self.dropout(self.out_proj(y * v))

    def forward(self, x: torch.Tensor, state=None, return_state: bool = False):
        u, v = self._branches(x)
        y = self.ssm(u, state, return_state)
        if return_state:
            y, state = y
        x = self._residual(x, y, v)
        return (x, state) if return_state else x

    def allocate_state(self, batch_size: int, device=None):
        return self.ssm.allocate_state(batch_size, device)

    def step(self, x: torch.Tensor, state):
        u, v = self._branches(x)
        y, state = self.ssm.step(u, state)
        return self._residual(x, y, v), state


class AttentionBlock(nn.Module):
    """A Transformer block (x + attn(LN x) with rotary positions, then x + MLP(LN x)) whose state is a KV cache."""

    def __init__(self, d_model: int, head_dim: int, mlp_ratio: int, dropout: float):
        super().__init__()
        self.n_heads, self.head_dim = d_model // head_dim, head_dim
        self.transformer = TransformerBlock(d_model, self.n_heads, mlp_ratio, dropout, rope=True)

    def forward(self, x: torch.Tensor, state: KVCache | None = None, return_state: bool = False):
        """With ``state`` the tokens follow its ``length`` cached positions; it is written and advanced in place."""
        if state is not None:
            _make_room(state, x.shape[1])
        x = self.transformer(x, state)
        if state is not None:
            state.length += x.shape[1]
        return (x, state) if return_state else x

    def allocate_state(self, batch_size: int, capacity: int, device=None, dtype=None) -> KVCache:
        shape = (batch_size, self.n_heads, capacity, self.head_dim)
        return KVCache(keys=[torch.zeros(shape, device=device, dtype=dtype)],
                       values=[torch.zeros(shape, device=device, dtype=dtype)])

    def step(self, x: torch.Tensor, state: KVCache):
        x, state = self.forward(x[:, None], state, return_state=True)
        return x[:, 0], state


def _make_room(cache: KVCache, n_tokens: int) -> None:
    """Grow a one-layer ``cache`` in place (at least doubling it) when n_tokens more would not fit.

    Rotary positions have no table, so the capacity is no limit on the positions the model can read: a prompt or a
    generation longer than ``max_seq_len`` (e.g. the text samples after a validation on short windows) only costs
    a reallocation now and then.
    """
    needed = cache.length + n_tokens
    if needed > cache.capacity:
        extra = max(needed, 2 * cache.capacity) - cache.capacity
        cache.keys[0] = F.pad(cache.keys[0], (0, 0, 0, extra))
        cache.values[0] = F.pad(cache.values[0], (0, 0, 0, extra))


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


class HybridLM(BlockStackLM):
    """Embedding -> n_layers blocks (gated-MLP SSM, or attention at ``attn_layers``) -> LayerNorm -> head.

    ``max_seq_len`` is the capacity a KV cache starts with (None without attention layers), not a limit.
    """

    pos_emb = "rope"  # tells ssmlm-generate that raising max_seq_len (to allocate the cache once) is allowed

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, ssm: str = "s4d", expand: float = 2,
                 ssm_dim: int | None = None, activation: str = "gelu", d_state: int | None = None,
                 init: str = "lin", dt_min: float = 1e-3, dt_max: float = 1e-1, dt_rank: int | str = "auto",
                 ssm_lr: float | None = 1e-3, kernel_chunk: int | None = 1024, scan_backend: str = "auto",
                 attn_layers=(), head_dim: int = 8, mlp_ratio: int = 2, max_seq_len: int = 1024,
                 dropout: float = 0.1):
        super().__init__()
        if ssm not in DEFAULT_D_STATE:
            raise ConfigError(f"model.ssm={ssm!r}: use one of {', '.join(DEFAULT_D_STATE)}")
        if activation not in ACTIVATIONS:
            raise ConfigError(f"model.activation={activation!r}: use one of {', '.join(ACTIVATIONS)}")
        d_inner = int(expand * d_model)
        if d_inner < 1:
            raise ConfigError(f"model.expand={expand}: the gated MLP's width expand * d_model must be positive")
        if ssm_dim is not None and ssm_dim < 1:
            raise ConfigError(f"model.ssm_dim={ssm_dim} must be a positive width, or null for expand * d_model")
        self.attn_layers = attention_layer_indices(attn_layers, n_layers)
        if self.attn_layers:
            if d_model % head_dim or head_dim % 2:
                raise ConfigError(f"model.d_model={d_model} must be a multiple of model.head_dim={head_dim}, "
                                  f"an even number (rotary positions), when model.attn_layers is set")
            if max_seq_len < 1:
                raise ConfigError(f"model.max_seq_len={max_seq_len} must be positive (the KV cache's capacity)")
        self.max_seq_len = max_seq_len if self.attn_layers else None
        d_state = DEFAULT_D_STATE[ssm] if d_state is None else d_state

        dim = d_inner if ssm_dim is None else ssm_dim

        def ssm_layer() -> nn.Module:
            if ssm == "s4d":
                return DiagonalSSM(dim, d_state=d_state, init=init, dt_min=dt_min, dt_max=dt_max, ssm_lr=ssm_lr,
                                   kernel_chunk=kernel_chunk)
            return SelectiveSSM(dim, d_state=d_state, dt_rank=dt_rank, dt_min=dt_min, dt_max=dt_max, ssm_lr=ssm_lr,
                                scan_backend=scan_backend)

        self._build_stack(vocab_size, d_model, (
            AttentionBlock(d_model, head_dim, mlp_ratio, dropout) if i in self.attn_layers
            else GatedSSMBlock(d_model, d_inner, dim, ssm_layer(), activation, dropout)
            for i in range(n_layers)
        ))

    def forward(self, tokens: torch.Tensor, state=None, return_state: bool = False):
        """tokens (batch, L); continues from ``state`` (its KV caches advance in place) [and returns the next]."""
        if state is None and return_state:  # the attention layers need a cache to fill
            state = self.allocate_state(tokens.shape[0], tokens.device)
        return super().forward(tokens, state, return_state)

    def allocate_state(self, batch_size: int, device=None, dtype=None) -> list:
        """SSM states are fp32 / complex64 whatever the activations' dtype; KV caches take ``dtype``."""
        device = device if device is not None else self.embedding.weight.device
        dtype = dtype if dtype is not None else self.embedding.weight.dtype
        return [block.allocate_state(batch_size, self.max_seq_len, device, dtype) if isinstance(block, AttentionBlock)
                else block.allocate_state(batch_size, device) for block in self.blocks]

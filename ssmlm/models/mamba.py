"""Mamba-1 language model (Gu & Dao, 2023), with the switches of an "improved Mamba" study.

embedding -> n_layers x [x + mixer(norm(x))] -> final norm -> head. The mixer (one block) is
in_proj to (x, gate z) -> causal depthwise conv1d + SiLU on x -> x_proj to (dt, B, C) -> dt_proj ->
selective scan (input-dependent dt, B, C; A = -exp(A_log); skip D) -> y * SiLU(z) -> out_proj.

Parameter names and shapes are mamba_ssm's ``MambaLMHeadModel`` (``backbone.embedding``, ``backbone.layers.{i}.
{norm,mixer.*}``, ``backbone.norm_f``, ``lm_head``), so its checkpoints load as they are
(:func:`ssmlm.models.pretrained.load_pretrained_mamba` also reads Hugging Face ones).

Recurrent state per layer: ``(conv_state (batch, d_inner, d_conv - 1), ssm_state (batch, d_inner, d_state) fp32)``,
the last conv inputs and the scan state. ``forward`` continues from a given state and can return the next one.

Variants (constructor switches, all off = plain Mamba): ``residual_gate`` a learnable scalar or per-channel scale
on each block's output (initialised to 1, i.e. plain Mamba at init), ``head_norm`` a LayerNorm between the final
norm and the head, ``dropout`` on the embedding and on every block output, ``activation="gelu"`` for the conv and
gate non-linearity.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ssmlm.errors import ConfigError
from ssmlm.models.base import LanguageModel, set_optim
from ssmlm.ops.selective_scan import check_backend, resolve_backend, selective_scan

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu}


def _norm(kind: str, dim: int, eps: float) -> nn.Module:
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=eps)
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps)
    raise ConfigError(f"model.norm={kind!r}: use 'rmsnorm' or 'layernorm'")


class MambaMixer(nn.Module):
    """The selective-SSM mixer of one block (mamba_ssm's ``Mamba``): (batch, L, d_model) -> same."""

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: float = 2, dt_rank="auto",
                 dt_min: float = 1e-3, dt_max: float = 1e-1, dt_init_floor: float = 1e-4, bias: bool = False,
                 conv_bias: bool = True, activation: str = "silu", scan_backend: str = "auto"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ConfigError(f"model.activation={activation!r}: use one of {', '.join(ACTIVATIONS)}")
        if d_conv < 2:
            raise ConfigError(f"model.d_conv={d_conv}: the causal conv needs a kernel of at least 2")
        self.d_inner = int(expand * d_model)
        self.d_state, self.d_conv = d_state, d_conv
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.activation = activation
        self.scan_backend = check_backend(scan_backend)

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1,
                                bias=conv_bias)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

        # dt starts log-uniform in [dt_min, dt_max]: the bias is its inverse softplus, the weight small
        dt_init_std = self.dt_rank ** -0.5
        nn.init.uniform_(self.dt_proj.weight, -dt_init_std, dt_init_std)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        # S4D-Real: A = -(1, 2, ..., d_state) for every channel, kept as log(-A) so A stays negative
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(self.d_inner))
        for p in (self.A_log, self.D, self.dt_proj.bias):
            set_optim(p, weight_decay=0.0)

    def _act(self, x: torch.Tensor) -> torch.Tensor:
        return ACTIVATIONS[self.activation](x)

    # issue 14: fused Triton path (ssmlm.ops.mamba_inner) wherever the Triton scan runs; PyTorch path otherwise
    def _fused(self, x: torch.Tensor) -> bool:
        return (self.activation == "silu" and self.in_proj.bias is None and self.out_proj.bias is None
                and resolve_backend(self.scan_backend, x.device) == "triton")

    def forward(self, hidden: torch.Tensor, state=None):
        """hidden: (batch, L, d_model); state: (conv_state, ssm_state) or None. Returns (output, next state)."""
        if state is None and self._fused(hidden):  # issue 14
            from ssmlm.ops.mamba_inner import mamba_mixer_forward
            return mamba_mixer_forward(self, hidden)
        batch = hidden.shape[0]
        x, z = self.in_proj(hidden).transpose(1, 2).chunk(2, dim=1)  # (batch, d_inner, L) each
        history = (x.new_zeros(batch, self.d_inner, self.d_conv - 1) if state is None
                   else state[0].to(x.dtype))
        x = torch.cat([history, x], dim=-1)
        conv_state = x[..., x.shape[-1] - (self.d_conv - 1):].clone()  # a copy: a view would pin all of x
        x = self._act(F.conv1d(x, self.conv1d.weight, self.conv1d.bias, groups=self.d_inner))
        dt, B, C = torch.split(self.x_proj(x.transpose(1, 2)), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.linear(dt, self.dt_proj.weight).transpose(1, 2)  # bias and softplus are applied in the scan
        A = -torch.exp(self.A_log.float())
        gate_in_scan = self.activation == "silu"  # the scan applies y * silu(z) itself
        y, ssm_state = selective_scan(
            x, delta, A, B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous(), D=self.D.float(),
            z=z if gate_in_scan else None, delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
            return_last_state=True, backend=self.scan_backend, initial_state=None if state is None else state[1])
        if not gate_in_scan:
            y = y * self._act(z)
        return self.out_proj(y.transpose(1, 2)), (conv_state, ssm_state)

    def allocate_state(self, batch_size: int, device=None, dtype=None):
        dtype = dtype or self.conv1d.weight.dtype
        conv_state = torch.zeros(batch_size, self.d_inner, self.d_conv - 1, device=device, dtype=dtype)
        ssm_state = torch.zeros(batch_size, self.d_inner, self.d_state, device=device, dtype=torch.float32)
        return conv_state, ssm_state

    def step(self, hidden: torch.Tensor, state):
        """One token: hidden (batch, d_model) -> (output (batch, d_model), next state)."""
        if self._fused(hidden):  # issue 14
            from ssmlm.ops.mamba_inner import mamba_mixer_step
            return mamba_mixer_step(self, hidden, state)
        conv_state, ssm_state = state
        x, z = self.in_proj(hidden).chunk(2, dim=-1)  # (batch, d_inner) each
        window = torch.cat([conv_state.to(x.dtype), x[..., None]], dim=-1)  # the last d_conv inputs
        x = (window * self.conv1d.weight[:, 0]).sum(-1)
        if self.conv1d.bias is not None:
            x = x + self.conv1d.bias
        x = self._act(x)
        dt, B, C = torch.split(self.x_proj(x), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        # bias added in fp32, as the scan in `forward` does
        delta = F.softplus(F.linear(dt, self.dt_proj.weight).float() + self.dt_proj.bias.float())  # (batch, d_inner)
        A = -torch.exp(self.A_log.float())
        x32 = x.float()
        ssm_state = torch.exp(delta[..., None] * A) * ssm_state + (delta * x32)[..., None] * B.float()[:, None]
        y = (ssm_state * C.float()[:, None]).sum(-1) + self.D.float() * x32
        y = (y * self._act(z.float())).to(hidden.dtype)
        return self.out_proj(y), (window[..., 1:], ssm_state)


class MambaBlock(nn.Module):
    """Pre-norm residual block: ``x + gate * dropout(mixer(norm(x)))``."""

    def __init__(self, d_model: int, norm: str = "rmsnorm", norm_eps: float = 1e-5, residual_gate: str = "none",
                 dropout: float = 0.0, **mixer_kwargs):
        super().__init__()
        self.norm = _norm(norm, d_model, norm_eps)
        self.mixer = MambaMixer(d_model, **mixer_kwargs)
        self.dropout = nn.Dropout(dropout)
        gate_shapes = {"none": None, "scalar": (), "channel": (d_model,)}
        if residual_gate not in gate_shapes:
            raise ConfigError(f"model.residual_gate={residual_gate!r}: use one of {', '.join(gate_shapes)}")
        shape = gate_shapes[residual_gate]
        # starts at 1, so the block starts as plain Mamba; not decayed towards 0 (which would switch it off)
        self.residual_gate = None if shape is None else set_optim(nn.Parameter(torch.ones(shape)), weight_decay=0.0)

    def _residual(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        out = self.dropout(out)
        return x + (out if self.residual_gate is None else self.residual_gate * out)

    def _normed(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.norm, nn.RMSNorm) and self.mixer._fused(x):  # issue 14: one-pass Triton RMSNorm
            from ssmlm.ops.rms_norm import add_rms_norm
            dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
            eps = self.norm.eps if self.norm.eps is not None else torch.finfo(x.dtype).eps
            return add_rms_norm(x, self.norm.weight, eps=eps, out_dtype=dtype)[0]
        return self.norm(x)

    def forward(self, x: torch.Tensor, state=None):
        out, state = self.mixer(self._normed(x), state)
        return self._residual(x, out), state

    def allocate_state(self, batch_size: int, device=None, dtype=None):
        return self.mixer.allocate_state(batch_size, device=device, dtype=dtype)

    def step(self, x: torch.Tensor, state):
        out, state = self.mixer.step(self._normed(x), state)
        return self._residual(x, out), state


class MambaLM(LanguageModel):
    """Mamba-1 LM. Sizes: ``d_model`` residual width, ``d_inner = expand * d_model`` mixer width, ``d_state`` N."""

    def __init__(self, vocab_size: int, d_model: int = 128, n_layers: int = 4, d_state: int = 16, d_conv: int = 4,
                 expand: float = 2, dt_rank="auto", bias: bool = False, conv_bias: bool = True,
                 norm: str = "rmsnorm", norm_eps: float = 1e-5, tie_embeddings: bool = True,
                 residual_gate: str = "none", head_norm: bool = False, dropout: float = 0.0,
                 activation: str = "silu", scan_backend: str = "auto"):
        super().__init__()
        self.vocab_size = vocab_size
        self.backbone = nn.ModuleDict(dict(
            embedding=nn.Embedding(vocab_size, d_model),
            layers=nn.ModuleList(
                MambaBlock(d_model, norm=norm, norm_eps=norm_eps, residual_gate=residual_gate, dropout=dropout,
                           d_state=d_state, d_conv=d_conv, expand=expand, dt_rank=dt_rank, bias=bias,
                           conv_bias=conv_bias, activation=activation, scan_backend=scan_backend)
                for _ in range(n_layers)),
            norm_f=_norm(norm, d_model, norm_eps),
        ))
        self.dropout = nn.Dropout(dropout)
        self.head_norm = nn.LayerNorm(d_model) if head_norm else None
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)

        # mamba_ssm's init: small embeddings, zero linear biases (but dt_proj's), and out_proj scaled by
        # 1/sqrt(n_layers) so the residual stream's variance does not grow with depth
        nn.init.normal_(self.backbone.embedding.weight, std=0.02)
        for layer in self.backbone.layers:
            mixer = layer.mixer
            for linear in (mixer.in_proj, mixer.x_proj, mixer.out_proj):
                if linear.bias is not None:
                    nn.init.zeros_(linear.bias)
            with torch.no_grad():
                mixer.out_proj.weight /= math.sqrt(n_layers)
        if tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        x = self.backbone.norm_f(x)
        if self.head_norm is not None:
            x = self.head_norm(x)
        return self.lm_head(x)

    def forward(self, tokens: torch.Tensor, state=None, return_state: bool = False):
        x = self.dropout(self.backbone.embedding(tokens))
        next_state = []
        for i, layer in enumerate(self.backbone.layers):
            x, layer_state = layer(x, None if state is None else state[i])
            next_state.append(layer_state)
        logits = self._logits(x)
        return (logits, next_state) if return_state else logits

    def allocate_state(self, batch_size: int, device=None, dtype=None):
        return [layer.allocate_state(batch_size, device=device, dtype=dtype) for layer in self.backbone.layers]

    def step(self, tokens: torch.Tensor, state):
        x = self.dropout(self.backbone.embedding(tokens))
        next_state = []
        for layer, layer_state in zip(self.backbone.layers, state):
            x, layer_state = layer.step(x, layer_state)
            next_state.append(layer_state)
        return self._logits(x), next_state

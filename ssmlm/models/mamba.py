"""Mamba-1 language model (Gu & Dao, 2023), with the switches of an "improved Mamba" study.

embedding -> n_layers x [x + mixer(norm(x))] -> final norm -> head. The mixer (one block) is
in_proj to (x, gate z) -> causal depthwise conv1d + SiLU on x -> x_proj to (dt, B, C) -> dt_proj ->
selective scan (input-dependent dt, B, C; A = -exp(A_log); skip D) -> y * SiLU(z) -> out_proj.

The model is a :class:`ssmlm.models.blocks.BackboneLM` of :class:`MambaMixer` blocks. Its state dict uses
mamba_ssm's ``MambaLMHeadModel`` names (``backbone.embedding``, ``backbone.layers.{i}.{norm,mixer.*}``,
``backbone.norm_f``, ``lm_head``; the mixer's own are mamba_simple's), so its checkpoints load as they are
(:func:`ssmlm.models.pretrained.load_pretrained_mamba` also reads Hugging Face ones).

Recurrent state per layer: ``(conv_state (batch, d_inner, d_conv - 1), ssm_state (batch, d_inner, d_state) fp32)``,
the last conv inputs and the scan state. ``forward`` continues from a given state and can return the next one.

``init`` picks A's initialisation (default "real": S4D-Real, Mamba's). Variants (constructor switches, all off =
plain Mamba): ``residual_gate`` a learnable scalar or per-channel scale
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
from ssmlm.models.blocks import BackboneLM, Mixer, SequenceLayer
from ssmlm.models.cores import init_selective_dynamics, selective_projections, selective_step
from ssmlm.ops.selective_scan import check_backend, resolve_backend, selective_scan

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu}


class MambaMixer(Mixer):
    """The selective-SSM mixer of one block (mamba_ssm's ``Mamba``): (batch, L, d_model) -> same."""

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: float = 2, dt_rank="auto",
                 dt_min: float = 1e-3, dt_max: float = 1e-1, dt_init_floor: float = 1e-4, bias: bool = False,
                 conv_bias: bool = True, activation: str = "silu", scan_backend: str = "auto", init: str = "real"):
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
        self.x_proj, self.dt_proj = selective_projections(self.d_inner, d_state, self.dt_rank)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)
        self.A_log, self.D = init_selective_dynamics(self.dt_proj, self.d_inner, d_state, dt_min, dt_max,
                                                     dt_init_floor, A_init=init)

    def _act(self, x: torch.Tensor) -> torch.Tensor:
        return ACTIVATIONS[self.activation](x)

    def _fused(self, x: torch.Tensor) -> bool:
        """Whether the fused Triton mixer (ssmlm.ops.mamba_inner) runs: wherever the Triton scan does, for the
        plain mixer (SiLU, no projection biases); the PyTorch path around the scan otherwise."""
        return (self.activation == "silu" and self.in_proj.bias is None and self.out_proj.bias is None
                and resolve_backend(self.scan_backend, x.device) == "triton")

    def forward(self, hidden: torch.Tensor, state=None, need_state: bool = True):
        """hidden: (batch, L, d_model); state: (conv_state, ssm_state) or None. Returns (output, next state)."""
        if state is None and self._fused(hidden):
            from ssmlm.ops.mamba_inner import mamba_mixer_forward  # here: Triton is optional
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
        if self._fused(hidden):
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
        # the dt bias is added in fp32, as the scan in `forward` does
        y, ssm_state = selective_step(x, F.linear(dt, self.dt_proj.weight), self.dt_proj.bias, self.A_log, B, C,
                                      self.D, ssm_state)
        y = (y * self._act(z.float())).to(hidden.dtype)
        return self.out_proj(y), (window[..., 1:], ssm_state)


class MambaLayer(SequenceLayer):
    """One Mamba mixer as a layer: ``layer(x)`` is a tensor of x's shape; ``dropout`` on its output. The seed
    project's names: ``expand_factor`` is ``expand``, ``init_method`` is ``init`` (A's initialisation)."""

    def __init__(self, d_model: int, d_state: int = 16, expand_factor: float = 2, init_method: str = "real",
                 bidirectional: bool = False, dropout: float = 0.0, **mixer_kwargs):
        if bidirectional:
            raise ConfigError("MambaLayer(bidirectional=True): the selective scan runs forwards only; use S4Layer "
                              "or S4DLayer for a bidirectional layer")
        super().__init__(MambaMixer(d_model, d_state, expand=expand_factor, init=init_method, **mixer_kwargs),
                         dropout)


class MambaLM(BackboneLM):
    """Mamba-1 LM. Sizes: ``d_model`` residual width, ``d_inner = expand * d_model`` mixer width, ``d_state`` N."""

    external_names = (("embedding.", "backbone.embedding."), ("blocks.", "backbone.layers."),
                      ("norm_f.", "backbone.norm_f."), ("head.", "lm_head."))

    def __init__(self, vocab_size: int, d_model: int = 128, n_layers: int = 4, d_state: int = 16, d_conv: int = 4,
                 expand: float = 2, dt_rank="auto", bias: bool = False, conv_bias: bool = True,
                 norm: str = "rmsnorm", norm_eps: float = 1e-5, tie_embeddings: bool = True,
                 residual_gate: str = "none", head_norm: bool = False, dropout: float = 0.0,
                 activation: str = "silu", scan_backend: str = "auto", init: str = "real"):
        super().__init__(
            vocab_size, d_model, n_layers,
            lambda i: MambaMixer(d_model, d_state=d_state, d_conv=d_conv, expand=expand, dt_rank=dt_rank, bias=bias,
                                 conv_bias=conv_bias, activation=activation, scan_backend=scan_backend, init=init),
            norm=norm, norm_eps=norm_eps, residual_gate=residual_gate, dropout=dropout, embed_dropout=dropout,
            head_norm=head_norm, tie_embeddings=tie_embeddings)

        # mamba_ssm's init: small embeddings, zero linear biases (but dt_proj's), and out_proj scaled by
        # 1/sqrt(n_layers) so the residual stream's variance does not grow with depth
        nn.init.normal_(self.embedding.weight, std=0.02)
        for block in self.blocks:
            mixer = block.mixer
            for linear in (mixer.in_proj, mixer.x_proj, mixer.out_proj):
                if linear.bias is not None:
                    nn.init.zeros_(linear.bias)
            with torch.no_grad():
                mixer.out_proj.weight /= math.sqrt(n_layers)

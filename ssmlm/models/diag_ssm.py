"""The reference diagonal-SSM character LM, computed in parallel.

embedding -> dropout -> in projection (emb_dim -> ssm_hidden) -> n_layers x [DiagSSM -> LayerNorm -> GELU ->
dropout -> residual add] -> dropout -> linear head. A DiagSSM layer projects its input (no bias) and runs
one scalar recurrence per channel (:class:`RealDiagonalSSM`, the "diag" linear time-invariant core):
``x_t = a*x_{t-1} + b*h_t``, ``y_t = c*x_t + out_bias``.

The reference ran that recurrence as a Python loop over time; here training uses an FFT convolution
(:func:`ssmlm.ops.diag_scan.diag_scan`) and generation the O(1)-state ``step``. Both equal the loop.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ssmlm.errors import ConfigError
from ssmlm.models.base import set_optim
from ssmlm.models.blocks import BackboneLM, Mixer
from ssmlm.ops.diag_scan import diag_scan


class RealDiagonalSSM(Mixer):
    """One real scalar recurrence per channel on (batch, L, H): ``x_t = a x_{t-1} + b u_t``, ``y_t = c x_t``.

    ``a_param``: "stable" keeps a = sigmoid(raw) inside (0, 1) so the recurrence can never blow up;
    "unconstrained" learns a directly, as the reference did (init 0.9 either way).

    ``a_lr_scale``: a's learning rate as a multiple of the global one. Adam moves a parameter by about lr per
    step whatever its gradient's scale, and sigmoid's slope at a=0.9 is 0.09, so a stable a would learn ~11x
    slower than the reference's unconstrained one. "auto" undoes that: 1/(a0(1-a0)) for stable, 1 otherwise
    (measured on the small preset, 3 epochs: val ppl 10.97 without it, 9.64 with it, 9.90 unconstrained).
    """

    def __init__(self, d_model: int, a_param: str = "stable", a_init: float = 0.9, bc_std: float = 0.1,
                 backend: str = "fft", a_lr_scale: float | str = "auto"):
        super().__init__()
        if a_param not in ("stable", "unconstrained"):
            raise ConfigError(f"model.a_param={a_param!r}: use 'stable' (a in (0,1)) or 'unconstrained' (reference)")
        self.a_param, self.backend = a_param, backend
        a0 = torch.full((d_model,), a_init)
        self.a_raw = nn.Parameter(torch.logit(a0) if a_param == "stable" else a0)
        self.b = nn.Parameter(torch.randn(d_model) * bc_std)
        self.c = nn.Parameter(torch.randn(d_model) * bc_std)
        for p in (self.a_raw, self.b, self.c):
            set_optim(p, weight_decay=0.0)  # SSM dynamics are not decayed
        if a_lr_scale == "auto":
            a_lr_scale = 1.0 / (a_init * (1.0 - a_init)) if a_param == "stable" else 1.0
        set_optim(self.a_raw, lr_scale=float(a_lr_scale))

    @property
    def a(self) -> torch.Tensor:
        return torch.sigmoid(self.a_raw) if self.a_param == "stable" else self.a_raw

    def forward(self, u: torch.Tensor, state: torch.Tensor | None = None, need_state: bool = True):
        """u: (batch, L, H) -> (y, last state (batch, H) fp32, or None when not ``need_state``)."""
        if not need_state:  # training: the last state costs an extra pass over (batch, L, H)
            return diag_scan(u, self.a, self.b, self.c, x0=state, backend=self.backend), None
        return diag_scan(u, self.a, self.b, self.c, x0=state, return_last_state=True, backend=self.backend)

    def allocate_state(self, batch_size: int, device=None, dtype=None) -> torch.Tensor:
        return torch.zeros(batch_size, self.b.shape[0], device=device, dtype=torch.float32)

    def step(self, u: torch.Tensor, state: torch.Tensor):
        """u: (batch, H) -> (y (batch, H), new state)."""
        state = self.a.float() * state + self.b.float() * u.float()
        return (self.c.float() * state).to(u.dtype), state


class DiagSSMMixer(RealDiagonalSSM):
    """The reference layer: in projection (no bias) -> :class:`RealDiagonalSSM` + out_bias -> LayerNorm -> GELU."""

    def __init__(self, hidden: int, **ssm_kwargs):
        in_proj = nn.Linear(hidden, hidden, bias=False)  # drawn before b and c, as the reference does
        super().__init__(hidden, **ssm_kwargs)
        self.in_proj = in_proj
        self.out_bias = nn.Parameter(torch.zeros(hidden))
        self.out_norm = nn.LayerNorm(hidden)

    def _output(self, y: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.out_norm(y + self.out_bias))

    def forward(self, x: torch.Tensor, state=None, need_state: bool = True):
        y, state = super().forward(self.in_proj(x), state, need_state)
        return self._output(y), state

    def step(self, x: torch.Tensor, state):
        y, state = super().step(self.in_proj(x), state)
        return self._output(y), state


class DiagSSMLM(BackboneLM):
    """The reference LM: no pre-norm in the blocks (the norm follows the SSM), no final norm, a head with a bias."""

    # before the mixer contract: blocks.{i}.ssm held the projection, the SSM and out_bias, blocks.{i}.norm the norm
    legacy_names = (r"blocks\.\d+\.ssm\.", (
        (r"blocks\.(\d+)\.ssm\.", r"blocks.\1.mixer."),
        (r"blocks\.(\d+)\.norm\.", r"blocks.\1.mixer.out_norm."),
    ))

    def __init__(self, vocab_size: int, emb_dim: int = 64, ssm_hidden: int = 256, n_layers: int = 4,
                 dropout: float = 0.1, a_param: str = "stable", a_init: float = 0.9, a_lr_scale: float | str = "auto",
                 backend: str = "fft"):
        super().__init__(
            vocab_size, ssm_hidden, n_layers,
            lambda i: DiagSSMMixer(ssm_hidden, a_param=a_param, a_init=a_init, a_lr_scale=a_lr_scale,
                                   backend=backend),
            block_norm=False, dropout=dropout, emb_dim=emb_dim, embed_dropout=dropout, final_norm=False,
            head_dropout=dropout, head_bias=True)
        nn.init.normal_(self.embedding.weight, std=1.0 / math.sqrt(emb_dim))

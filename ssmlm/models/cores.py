"""Pieces every SSM family shares, written once: the time-step initialisation, the selective SSM's parameters and
recurrence (Mamba's and the hybrid's), and the GELU -> dropout -> Linear -> GLU output of S4-style layers."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ssmlm.errors import ConfigError
from ssmlm.models.base import set_optim
from ssmlm.models.hippo import INITS, init_A


def check_dt_range(dt_min: float, dt_max: float) -> None:
    if not 0 < dt_min <= dt_max:
        raise ConfigError(f"model.dt_min={dt_min}, model.dt_max={dt_max}: need 0 < dt_min <= dt_max")


def log_uniform_dt(n: int, dt_min: float, dt_max: float) -> torch.Tensor:
    """log dt for n channels (or modes), dt log-uniform in [dt_min, dt_max]: the S4 / Mamba initialisation."""
    return torch.rand(n) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)


class OutputGLU(nn.Module):
    """The output of S4-style layers on the SSM's output y: GELU -> dropout -> Linear(H, 2H) -> GLU, in ``dtype``."""

    def __init__(self, d_model: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(d_model, 2 * d_model)

    def forward(self, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return F.glu(self.out_proj(self.dropout(F.gelu(y)).to(dtype)), dim=-1)


def selective_projections(dim: int, d_state: int, dt_rank: int) -> tuple[nn.Linear, nn.Linear]:
    """x_proj (dim -> dt_rank + 2 N: dt before its projection, B, C) and dt_proj (dt_rank -> dim), mamba_ssm's."""
    return nn.Linear(dim, dt_rank + 2 * d_state, bias=False), nn.Linear(dt_rank, dim, bias=True)


def init_selective_dynamics(dt_proj: nn.Linear, dim: int, d_state: int, dt_min: float, dt_max: float,
                            dt_init_floor: float = 1e-4, A_init: str = "real") -> tuple[nn.Parameter, nn.Parameter]:
    """Mamba's initialisation: dt log-uniform in [dt_min, dt_max] (dt_proj's bias is its inverse softplus, the
    weight small); returns A_log (A real and negative, kept as log(-A)) and the skip D = 1, none weight-decayed.

    ``A_init``: "real" is Mamba's S4D-Real, A = -(1, ..., N) per channel. The selective scan's A is real, so the
    other S4D initialisations (lin | inv | legs) give A = -|lambda_n|, the decay rates of their N complex modes.
    """
    if A_init not in INITS:
        raise ConfigError(f"model.init={A_init!r} is not an S4D initialisation; use one of {', '.join(INITS)}")
    dt_rank = dt_proj.in_features
    nn.init.uniform_(dt_proj.weight, -dt_rank ** -0.5, dt_rank ** -0.5)
    dt = torch.exp(log_uniform_dt(dim, dt_min, dt_max)).clamp(min=dt_init_floor)
    with torch.no_grad():
        dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
    rates = (torch.arange(1, d_state + 1, dtype=torch.float32) if A_init == "real"
             else init_A(A_init, 2 * d_state).abs().float())
    A_log = nn.Parameter(torch.log(rates).repeat(dim, 1))
    D = nn.Parameter(torch.ones(dim))
    for p in (A_log, D, dt_proj.bias):
        set_optim(p, weight_decay=0.0)
    return A_log, D


def selective_step(x: torch.Tensor, dt: torch.Tensor, dt_bias: torch.Tensor, A_log: torch.Tensor, B: torch.Tensor,
                   C: torch.Tensor, D: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of the selective SSM, in fp32 as the scan: x, dt (before bias and softplus) (batch, dim);
    B, C (batch, N); state (batch, dim, N). Returns (y (batch, dim) fp32, next state)."""
    delta = F.softplus(dt.float() + dt_bias.float())
    x32 = x.float()
    state = torch.exp(delta[..., None] * -torch.exp(A_log.float())) * state + (delta * x32)[..., None] * B.float()[:, None]
    return (state * C.float()[:, None]).sum(-1) + D.float() * x32, state

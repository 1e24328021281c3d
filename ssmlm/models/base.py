"""The interface every ssmlm language model implements.

A model maps token ids to next-token logits in two equivalent ways:

* ``forward(tokens)`` — the parallel form used for training: (batch, L) -> (batch, L, vocab).
  With ``return_state=True`` it also returns the recurrent state after the last token, so a prompt
  can be consumed in parallel and generation continued with :meth:`step`.
* ``step(tokens, state)`` — the recurrent form used for generation: (batch,) -> (batch, vocab), with
  an O(1)-size state (a KV cache for the Transformer baseline).

``allocate_state`` returns the state before any token. ``step`` over a sequence from that state
gives the same logits as ``forward`` over it; every family has a test for this.

Optimizer hints: a parameter may carry ``_optim = {"weight_decay": 0.0, "lr": ..., "lr_scale": ...}`` (the
convention of the S4 code base; ``lr_scale`` multiplies the global lr). :func:`ssmlm.lm.build_param_groups` honours it; parameters without it get weight decay
when they are matrices (ndim >= 2) and none otherwise (biases, norm scales).
"""

from __future__ import annotations

import abc
from typing import Any

import torch
from torch import nn


def set_optim(param: nn.Parameter, **hints: Any) -> nn.Parameter:
    """Attach optimizer hints (e.g. ``weight_decay=0.0``, ``lr=1e-3``) to a parameter."""
    param._optim = dict(getattr(param, "_optim", {}), **hints)  # type: ignore[attr-defined]
    return param


def mark_ssm_dynamics(*params: nn.Parameter, lr: float | None) -> None:
    """The S4 recipe for an SSM's dynamics (A, dt, ...): no weight decay and their own learning rate (``None``:
    the global one)."""
    for p in params:
        set_optim(p, weight_decay=0.0, **({} if lr is None else {"lr": lr}))


class LanguageModel(nn.Module, abc.ABC):
    """Base class: token embedding in, logits out, with a recurrent twin of the parallel form."""

    vocab_size: int

    @abc.abstractmethod
    def forward(self, tokens: torch.Tensor, state: Any = None, return_state: bool = False):
        """(batch, L) token ids -> (batch, L, vocab) logits [, state after the last token]."""

    @abc.abstractmethod
    def allocate_state(self, batch_size: int, device=None, dtype=None) -> Any:
        """The recurrent state before any token."""

    @abc.abstractmethod
    def step(self, tokens: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        """(batch,) token ids -> ((batch, vocab) logits, next state)."""

    # Capabilities (declared here, not probed with getattr):
    causal: bool = True
    """False: positions see later tokens (bidirectional layers, for non-causal use); no recurrent form, and
    training as a language model refuses it."""

    max_positions: int | None = None
    """The positions the model can read at all (a table of learned positions); None: no limit."""

    def reserve_positions(self, n_positions: int) -> bool:
        """Size position-dependent state (KV caches) for ``n_positions`` before generating, so it is allocated
        once. Returns True when that is past what the model was configured for (it was trained on fewer)."""
        return False

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

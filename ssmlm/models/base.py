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

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


class PreNormBlock(nn.Module):
    """``x + dropout(layer(LayerNorm(x)))``; the layer's recurrent state passes through ``forward`` and ``step``."""

    def __init__(self, d_model: int, dropout: float, layer: nn.Module):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.ssm = layer
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, state=None, return_state=False):
        out = self.ssm(self.norm(x), state, return_state)
        if return_state:
            out, state = out
        x = x + self.dropout(out)
        return (x, state) if return_state else x

    def allocate_state(self, batch_size, device=None):
        return self.ssm.allocate_state(batch_size, device)

    def step(self, x, state):
        out, state = self.ssm.step(self.norm(x), state)
        return x + self.dropout(out), state


class BlockStackLM(LanguageModel):
    """embedding -> residual blocks -> LayerNorm -> linear head, for families whose blocks implement
    ``forward(x, state, return_state)`` (returning ``(x, state)`` when asked) and ``step(x, state)``.

    Subclasses build ``self.blocks`` and call ``_build_stack`` for the shared parts; the recurrent state is a
    list with one entry per block.
    """

    def _build_stack(self, vocab_size: int, d_model: int, blocks) -> None:
        self.vocab_size = vocab_size
        self.embedding = nn.Embedding(vocab_size, d_model)
        self.blocks = nn.ModuleList(blocks)
        self.norm_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor, state: Any = None, return_state: bool = False):
        x = self.embedding(tokens)
        new_state = []
        for i, block in enumerate(self.blocks):
            out = block(x, None if state is None else state[i], return_state)
            if return_state:
                out, layer_state = out
                new_state.append(layer_state)
            x = out
        logits = self.head(self.norm_f(x))
        return (logits, new_state) if return_state else logits

    def allocate_state(self, batch_size: int, device=None, dtype=None) -> list:
        """dtype is ignored: SSM states are kept in fp32 / complex64 whatever the activations' dtype."""
        device = device if device is not None else self.embedding.weight.device
        return [block.allocate_state(batch_size, device) for block in self.blocks]

    def step(self, tokens: torch.Tensor, state: list) -> tuple[torch.Tensor, list]:
        x = self.embedding(tokens)
        new_state = []
        for block, layer_state in zip(self.blocks, state):
            x, layer_state = block.step(x, layer_state)
            new_state.append(layer_state)
        return self.head(self.norm_f(x)), new_state

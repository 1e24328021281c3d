"""Next-token sampling: temperature, top-k and nucleus (top-p), combinable, seeded.

The order is the usual one: logits are divided by the temperature, top-k keeps the k most likely tokens,
top-p then keeps the smallest set of those whose probability (renormalised over the survivors) reaches p,
and one token is drawn from what is left, renormalised. Temperature 0 is greedy decoding (argmax).

Drawing uses the exponential race (``argmax p_i / E_i`` with ``E_i ~ Exp(1)`` picks token i with probability
p_i): it is exact, needs no host synchronisation, and works the same on CPU and CUDA with a
``torch.Generator``, so a seed reproduces the text.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ssmlm.errors import ConfigError


@dataclass(frozen=True)
class Sampling:
    """How to pick the next token from logits (batch, vocab). ``top_k=0`` and ``top_p=1`` switch those off."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ConfigError(f"temperature={self.temperature}: use 0 (greedy) or a positive number")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ConfigError(f"top_k={self.top_k}: use 0 (off) or a positive number of tokens")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p={self.top_p}: use a probability in (0, 1]; 1 switches nucleus sampling off")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The distribution a token is drawn from: (batch, vocab), zero outside the kept set, rows sum to 1."""
        logits = logits.float() / self.temperature
        if self.top_k:
            logits = keep_top_k(logits, self.top_k)
        if self.top_p < 1:
            logits = keep_top_p(logits, self.top_p)
        return torch.softmax(logits, dim=-1)

    def __call__(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Next tokens (batch,) long, from logits (batch, vocab)."""
        if self.greedy:
            return logits.argmax(dim=-1)
        return draw(self.probs(logits), generator)


def keep_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Logits with all but the k largest per row set to -inf (exactly k survive, ties broken by index)."""
    if k >= logits.shape[-1]:
        return logits
    kept = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, logits.topk(k, dim=-1).indices, True)
    return logits.masked_fill(~kept, float("-inf"))


def keep_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Logits outside the nucleus set to -inf. The nucleus is the smallest set of most likely tokens whose
    probability reaches p: a token is kept when the tokens ranked above it hold less than p."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    sorted_probs = torch.softmax(sorted_logits, dim=-1)
    mass_above = sorted_probs.cumsum(dim=-1) - sorted_probs
    drop_sorted = mass_above >= p
    drop_sorted[..., 0] = False  # the most likely token always survives
    drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row of ``probs`` (batch, vocab), index i with probability probs[:, i]."""
    # an Exp(1) draw can round to 0, which would let a zero-probability token win with 0/0
    race = torch.empty_like(probs).exponential_(generator=generator).clamp_min_(torch.finfo(probs.dtype).tiny)
    return (probs / race).argmax(dim=-1)

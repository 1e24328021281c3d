"""Decoder-only Transformer baseline (GPT-2 layout with pre-norm, optional rotary positions).

Parallel form: causal ``F.scaled_dot_product_attention`` over the whole sequence. Recurrent form: a
KV cache preallocated to ``max_seq_len`` positions; each step writes one key/value per layer in place
and attends to the cached prefix. The "state" is therefore O(L), unlike the SSM families' O(1) state:
that is exactly the contrast the baseline is for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ssmlm.errors import ConfigError
from ssmlm.models.base import LanguageModel

POS_EMBS = ("rope", "learned")


@dataclass
class KVCache:
    """Per-layer keys and values, each (batch, n_heads, max_seq_len, head_dim), valid up to ``length``.

    Updated in place by ``step`` and ``forward(..., state=cache)``: the cache passed in is the one returned.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int = 0

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]


def rope_rotate(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding (rotate-half form) of x (batch, heads, L, head_dim) at ``positions`` (L,)."""
    half = x.shape[-1] // 2
    inv_freq = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angles = positions.float()[:, None] * inv_freq[None, :]  # (L, half)
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x.float()[..., :half], x.float()[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float, rope: bool):
        super().__init__()
        self.n_heads, self.head_dim, self.rope = n_heads, d_model // n_heads, rope
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.attn_dropout = dropout

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        """x: (batch, L, d_model). With a cache, x follows its ``length`` cached positions and its
        keys/values are written into it (the caller advances ``length`` once all layers have run)."""
        batch, L, _ = x.shape
        q, k, v = self.qkv(x).view(batch, L, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        start = 0 if cache is None else cache.length
        if self.rope:
            positions = torch.arange(start, start + L, device=x.device)
            q, k = rope_rotate(q, positions), rope_rotate(k, positions)
        mask = None
        if cache is not None:
            cache.keys[layer][:, :, start:start + L] = k
            cache.values[layer][:, :, start:start + L] = v
            k, v = cache.keys[layer][:, :, :start + L], cache.values[layer][:, :, :start + L]
            if start > 0 and L > 1:  # queries sit after the cached prefix: query i sees keys 0..start+i
                key_pos = torch.arange(start + L, device=x.device)
                query_pos = torch.arange(start, start + L, device=x.device)
                mask = key_pos[None, :] <= query_pos[:, None]
        # is_causal aligns the mask top-left, right only when queries and keys start together (start = 0);
        # a single query after a prefix sees every key.
        causal = start == 0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.attn_dropout if self.training else 0.0)
        return self.out_proj(y.transpose(1, 2).reshape(batch, L, -1))


class TransformerBlock(nn.Module):
    """x + attn(LN(x)), then x + MLP(LN(x)); dropout on each residual branch."""

    def __init__(self, d_model: int, n_heads: int, mlp_ratio: int, dropout: float, rope: bool):
        super().__init__()
        self.norm_attn = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, dropout, rope)
        self.norm_mlp = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, mlp_ratio * d_model), nn.GELU(),
                                 nn.Linear(mlp_ratio * d_model, d_model))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, cache=None, layer=0):
        x = x + self.dropout(self.attn(self.norm_attn(x), cache, layer))
        return x + self.dropout(self.mlp(self.norm_mlp(x)))


class TransformerLM(LanguageModel):
    """Token embedding (+ learned positions) -> n_layers x TransformerBlock -> LayerNorm -> head.

    ``head_dim`` fixes the width of a head, so n_heads = d_model / head_dim and d_model can be
    chosen freely for parameter matching. ``max_seq_len`` bounds the KV cache (and learned positions).
    """

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, head_dim: int = 16, max_seq_len: int = 1024,
                 pos_emb: str = "rope", mlp_ratio: int = 4, dropout: float = 0.1, tie_embeddings: bool = False):
        super().__init__()
        if d_model % head_dim:
            raise ConfigError(f"model.d_model={d_model} is not a multiple of model.head_dim={head_dim}")
        if pos_emb not in POS_EMBS:
            raise ConfigError(f"model.pos_emb={pos_emb!r}: use one of {', '.join(POS_EMBS)}")
        if pos_emb == "rope" and head_dim % 2:
            raise ConfigError(f"model.head_dim={head_dim} must be even for rotary positions (pos_emb=rope)")
        self.vocab_size, self.max_seq_len, self.pos_emb = vocab_size, max_seq_len, pos_emb
        self.n_heads, self.head_dim = d_model // head_dim, head_dim
        self.embedding = nn.Embedding(vocab_size, d_model)
        self.positions = nn.Embedding(max_seq_len, d_model) if pos_emb == "learned" else None
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(d_model, self.n_heads, mlp_ratio, dropout, rope=pos_emb == "rope")
            for _ in range(n_layers)
        )
        self.norm_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        if tie_embeddings:
            self.head.weight = self.embedding.weight
        self._init_weights(n_layers)

    def _init_weights(self, n_layers: int):
        """GPT-2: N(0, 0.02), with the projections into the residual stream scaled by 1/sqrt(2 n_layers)."""
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(("out_proj.weight", "mlp.2.weight")) else 0.02
                nn.init.normal_(p, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def _embed(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        L = tokens.shape[-1]
        if self.positions is not None and start + L > self.max_seq_len:
            raise ConfigError(f"position {start + L} exceeds model.max_seq_len={self.max_seq_len}, the number "
                              f"of learned positions (pos_emb=learned); raise model.max_seq_len or use pos_emb=rope")
        x = self.embedding(tokens)
        if self.positions is not None:
            x = x + self.positions(torch.arange(start, start + L, device=tokens.device))
        return self.dropout(x)

    def forward(self, tokens, state=None, return_state=False):
        """tokens (batch, L). ``state`` (a KVCache) continues from it; ``return_state`` fills a cache
        (a new one when none is given) so generation can go on with :meth:`step`."""
        if state is None and return_state:
            state = self.allocate_state(tokens.shape[0], tokens.device, self.embedding.weight.dtype)
        if state is not None and state.length + tokens.shape[1] > state.capacity:
            raise ConfigError(f"KV cache full: {state.length} + {tokens.shape[1]} tokens exceed "
                              f"model.max_seq_len={state.capacity}; raise model.max_seq_len")
        start = 0 if state is None else state.length
        x = self._embed(tokens, start)
        for i, block in enumerate(self.blocks):
            x = block(x, state, i)
        logits = self.head(self.norm_f(x))
        if state is None:
            return logits
        state.length += tokens.shape[1]
        return (logits, state) if return_state else logits

    def allocate_state(self, batch_size, device=None, dtype=None) -> KVCache:
        """An empty KV cache for ``max_seq_len`` positions, allocated once."""
        device = device if device is not None else self.embedding.weight.device
        dtype = dtype if dtype is not None else self.embedding.weight.dtype
        shape = (batch_size, self.n_heads, self.max_seq_len, self.head_dim)
        layers = range(len(self.blocks))
        return KVCache(keys=[torch.zeros(shape, device=device, dtype=dtype) for _ in layers],
                       values=[torch.zeros(shape, device=device, dtype=dtype) for _ in layers])

    def step(self, tokens, state):
        logits, state = self.forward(tokens[:, None], state, return_state=True)
        return logits[:, 0], state

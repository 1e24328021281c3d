"""Decoder-only Transformer baseline (GPT-2 layout with pre-norm, optional rotary positions).

Parallel form: causal ``F.scaled_dot_product_attention`` over the whole sequence. Recurrent form: a
KV cache per layer preallocated to ``max_seq_len`` positions; each step writes one key/value per layer in place
and attends to the cached prefix. The "state" is therefore O(L), unlike the SSM families' O(1) state:
that is exactly the contrast the baseline is for.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ssmlm.errors import ConfigError
from ssmlm.models.blocks import BackboneLM, Mixer, feed_forward

POS_EMBS = ("rope", "learned")


@dataclass
class KVCache:
    """One layer's keys and values, each (batch, n_heads, capacity, head_dim), valid up to ``length``.

    Updated in place by ``step`` and ``forward(..., state=cache)``: the cache passed in is the one returned.
    """

    keys: torch.Tensor
    values: torch.Tensor
    length: int = 0

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]


def rope_rotate(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding (rotate-half form) of x (batch, heads, L, head_dim) at ``positions`` (L,)."""
    half = x.shape[-1] // 2
    inv_freq = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angles = positions.float()[:, None] * inv_freq[None, :]  # (L, half)
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x.float()[..., :half], x.float()[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class SelfAttention(Mixer):
    """Causal multi-head self-attention, a mixer whose state is a :class:`KVCache`.

    ``capacity``: the positions a cache is allocated for. ``grow_cache``: a cache that fills up is enlarged (at
    least doubled) instead of refused; right for rotary positions, which have no table, so the capacity is no
    limit on the positions the model can read.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float, rope: bool, capacity: int,
                 grow_cache: bool = False):
        super().__init__()
        self.n_heads, self.head_dim, self.rope = n_heads, d_model // n_heads, rope
        self.capacity, self.grow_cache = capacity, grow_cache
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.attn_dropout = dropout

    def allocate_state(self, batch_size: int, device=None, dtype=None) -> KVCache:
        """An empty cache for ``capacity`` positions, allocated once; ``dtype`` by default the weights'."""
        dtype = dtype if dtype is not None else self.qkv.weight.dtype
        shape = (batch_size, self.n_heads, self.capacity, self.head_dim)
        return KVCache(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    def reserve_positions(self, n_positions: int) -> bool:
        if not self.rope or n_positions <= self.capacity:
            return False
        self.capacity = n_positions
        return True

    def _make_room(self, cache: KVCache, n_tokens: int) -> None:
        needed = cache.length + n_tokens
        if needed <= cache.capacity:
            return
        if not self.grow_cache:
            raise ConfigError(f"KV cache full: {cache.length} + {n_tokens} tokens exceed "
                              f"model.max_seq_len={cache.capacity}; raise model.max_seq_len")
        extra = max(needed, 2 * cache.capacity) - cache.capacity
        cache.keys = F.pad(cache.keys, (0, 0, 0, extra))
        cache.values = F.pad(cache.values, (0, 0, 0, extra))

    def forward(self, x: torch.Tensor, state: KVCache | None = None, need_state: bool = True):
        """x: (batch, L, d_model). With a cache, x follows its ``length`` cached positions; its keys and values
        are written into it and it advances (in place). Without one, a cache is filled when ``need_state``."""
        batch, L, _ = x.shape
        if state is None and need_state:
            state = self.allocate_state(batch, x.device)
        q, k, v = self.qkv(x).view(batch, L, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        start = 0 if state is None else state.length
        if self.rope:
            positions = torch.arange(start, start + L, device=x.device)
            q, k = rope_rotate(q, positions), rope_rotate(k, positions)
        mask = None
        if state is not None:
            self._make_room(state, L)
            if torch.is_grad_enabled():  # writing in place would change what autograd saved from earlier calls
                state.keys, state.values = state.keys.clone(), state.values.clone()
            state.keys[:, :, start:start + L] = k
            state.values[:, :, start:start + L] = v
            k, v = state.keys[:, :, :start + L], state.values[:, :, :start + L]
            state.length += L
            if start > 0 and L > 1:  # queries sit after the cached prefix: query i sees keys 0..start+i
                key_pos = torch.arange(start + L, device=x.device)
                query_pos = torch.arange(start, start + L, device=x.device)
                mask = key_pos[None, :] <= query_pos[:, None]
        # is_causal aligns the mask top-left, right only when queries and keys start together (start = 0);
        # a single query after a prefix sees every key.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=start == 0,
                                           dropout_p=self.attn_dropout if self.training else 0.0)
        return self.out_proj(y.transpose(1, 2).reshape(batch, L, -1)), state

    def step(self, x: torch.Tensor, state: KVCache):
        y, state = self.forward(x[:, None], state)
        return y[:, 0], state


# Before the mixer contract a Transformer block held norm_attn, attn, norm_mlp and mlp (Linear, GELU, Linear).
def attention_block_legacy_names(inside: str = "") -> tuple:
    """Renames of an old Transformer block's parameters, ``inside`` the block's submodule (the hybrid's
    "transformer.")."""
    old = r"blocks\.(\d+)\." + re.escape(inside)
    return ((old + r"norm_attn\.", r"blocks.\1.norm."), (old + r"attn\.", r"blocks.\1.mixer."),
            (old + r"norm_mlp\.", r"blocks.\1.mlp.0."), (old + r"mlp\.0\.", r"blocks.\1.mlp.1."),
            (old + r"mlp\.2\.", r"blocks.\1.mlp.3."))


class AttentionLM(BackboneLM):
    """A backbone with self-attention layers: ``max_seq_len`` reads and sets their KV caches' capacity."""

    def _attention(self) -> list[SelfAttention]:
        return [block.mixer for block in self.blocks if isinstance(block.mixer, SelfAttention)]

    @property
    def max_seq_len(self) -> int | None:
        """The positions a KV cache is allocated for (None without attention layers)."""
        layers = self._attention()
        return layers[0].capacity if layers else None

    @max_seq_len.setter
    def max_seq_len(self, capacity: int) -> None:
        for layer in self._attention():
            layer.capacity = capacity


class TransformerLM(AttentionLM):
    """Token embedding (+ learned positions) -> n_layers x [attention, MLP] -> LayerNorm -> head.

    ``head_dim`` fixes the width of a head, so n_heads = d_model / head_dim and d_model can be
    chosen freely for parameter matching. ``max_seq_len`` bounds the KV cache (and learned positions).
    """

    legacy_names = (r"\.norm_attn\.", attention_block_legacy_names())

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, head_dim: int = 16, max_seq_len: int = 1024,
                 pos_emb: str = "rope", mlp_ratio: int = 4, dropout: float = 0.1, tie_embeddings: bool = False):
        if d_model % head_dim:
            raise ConfigError(f"model.d_model={d_model} is not a multiple of model.head_dim={head_dim}")
        if pos_emb not in POS_EMBS:
            raise ConfigError(f"model.pos_emb={pos_emb!r}: use one of {', '.join(POS_EMBS)}")
        if pos_emb == "rope" and head_dim % 2:
            raise ConfigError(f"model.head_dim={head_dim} must be even for rotary positions (pos_emb=rope)")
        n_heads = d_model // head_dim
        super().__init__(
            vocab_size, d_model, n_layers,
            lambda i: SelfAttention(d_model, n_heads, dropout, rope=pos_emb == "rope", capacity=max_seq_len),
            make_mlp=lambda i: feed_forward(d_model, mlp_ratio * d_model, dropout), dropout=dropout,
            max_positions=max_seq_len if pos_emb == "learned" else None, embed_dropout=dropout,
            tie_embeddings=tie_embeddings)
        self._init_weights(n_layers)

    def _init_weights(self, n_layers: int):
        """GPT-2: N(0, 0.02), with the projections into the residual stream scaled by 1/sqrt(2 n_layers)."""
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(("out_proj.weight", "mlp.3.weight")) else 0.02
                nn.init.normal_(p, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def _embed(self, tokens: torch.Tensor, state: Any) -> torch.Tensor:
        """Token embeddings, plus learned positions from the position the caches have reached."""
        x = self.embedding(tokens)
        if self.positions is None:
            return x
        L = tokens.shape[1] if tokens.dim() == 2 else 1  # (batch, L) in parallel, (batch,) in a step
        start = 0 if state is None else state[0].length
        if start + L > self.max_positions:
            raise ConfigError(f"position {start + L} exceeds model.max_seq_len={self.max_positions}, the number "
                              f"of learned positions (pos_emb=learned); raise model.max_seq_len or use pos_emb=rope")
        return x + self.positions(torch.arange(start, start + L, device=tokens.device))


class Attention(nn.Module):
    """Multi-head attention of queries from x over keys and values from ``memory`` (x itself for self-attention).
    ``mask``: boolean, True where a query may attend, broadcastable to (batch, heads, L_x, L_memory)."""

    def __init__(self, d_model: int, num_heads: int, dropout: float):
        super().__init__()
        if d_model % num_heads:
            raise ConfigError(f"d_model={d_model} is not a multiple of num_heads={num_heads}")
        self.num_heads, self.dropout = num_heads, dropout
        self.q_proj = nn.Linear(d_model, d_model)
        self.kv_proj = nn.Linear(d_model, 2 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # (batch, heads, L, head_dim)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        k, v = self.kv_proj(memory).chunk(2, dim=-1)
        y = F.scaled_dot_product_attention(self._heads(self.q_proj(x)), self._heads(k), self._heads(v),
                                           attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(y.transpose(1, 2).flatten(2))


class EncoderLayer(nn.Module):
    """Pre-norm: x + self-attention(LN x), then x + MLP(LN x)."""

    def __init__(self, d_model: int, num_heads: int, d_ff: int, dropout: float, attention_dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.attn = Attention(d_model, num_heads, attention_dropout)
        self.dropout = nn.Dropout(dropout)
        self.mlp = feed_forward(d_model, d_ff, dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        h = self.norm(x)
        x = x + self.dropout(self.attn(h, h, mask))
        return x + self.mlp(x)


class DecoderLayer(EncoderLayer):
    """An encoder layer with cross-attention to the encoder's output between self-attention and the MLP."""

    def __init__(self, d_model: int, num_heads: int, d_ff: int, dropout: float, attention_dropout: float):
        super().__init__(d_model, num_heads, d_ff, dropout, attention_dropout)
        self.cross_norm = nn.LayerNorm(d_model)
        self.cross_attn = Attention(d_model, num_heads, attention_dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor | None,
                memory_mask: torch.Tensor | None) -> torch.Tensor:
        h = self.norm(x)
        x = x + self.dropout(self.attn(h, h, mask))
        x = x + self.dropout(self.cross_attn(self.cross_norm(x), memory, memory_mask))
        return x + self.mlp(x)


class TransformerModel(nn.Module):
    """Encoder-decoder Transformer (Vaswani et al. 2017, pre-norm) for sequence-to-sequence tasks.

    ``transformer(src, tgt, src_mask=None, tgt_mask=None)``: src (batch, L_src) and tgt (batch, L_tgt) token ids when
    ``vocab_size`` is set (the output is then logits, (batch, L_tgt, vocab_size)), else (batch, L, d_model) vectors
    (the output is (batch, L_tgt, d_model)). Learned positions up to ``max_seq_len``.

    Masks are boolean, True where attention is allowed. ``src_mask``: (batch, L_src), True on real tokens (padding is
    False): hidden from the encoder's self-attention and from the decoder's cross-attention; or any mask
    broadcastable to (batch, heads, L_src, L_src), for the encoder only. ``tgt_mask``: broadcastable to
    (batch, heads, L_tgt, L_tgt); None is the causal mask (:meth:`causal_mask`), what teacher forcing needs.
    """

    def __init__(self, d_model: int = 512, num_encoder_layers: int = 6, num_decoder_layers: int = 6,
                 num_heads: int = 8, d_ff: int = 2048, dropout: float = 0.1, attention_dropout: float = 0.1,
                 max_seq_len: int = 2048, vocab_size: int | None = None):
        super().__init__()
        self.max_seq_len = max_seq_len
        self.embedding = None if vocab_size is None else nn.Embedding(vocab_size, d_model)
        self.positions = nn.Embedding(max_seq_len, d_model)
        self.dropout = nn.Dropout(dropout)
        self.encoder = nn.ModuleList(EncoderLayer(d_model, num_heads, d_ff, dropout, attention_dropout)
                                     for _ in range(num_encoder_layers))
        self.decoder = nn.ModuleList(DecoderLayer(d_model, num_heads, d_ff, dropout, attention_dropout)
                                     for _ in range(num_decoder_layers))
        self.encoder_norm = nn.LayerNorm(d_model)
        self.decoder_norm = nn.LayerNorm(d_model)
        self.head = None if vocab_size is None else nn.Linear(d_model, vocab_size)

    @staticmethod
    def causal_mask(length: int, device=None) -> torch.Tensor:
        """(length, length) boolean: position i attends to positions <= i."""
        return torch.ones(length, length, dtype=torch.bool, device=device).tril()

    def _embed(self, seq: torch.Tensor) -> torch.Tensor:
        x = seq if self.embedding is None else self.embedding(seq)
        L = x.shape[1]
        if L > self.max_seq_len:
            raise ConfigError(f"a sequence of {L} positions exceeds max_seq_len={self.max_seq_len}")
        return self.dropout(x + self.positions(torch.arange(L, device=x.device)))

    @staticmethod
    def _padding(src_mask: torch.Tensor | None, shape: torch.Size) -> torch.Tensor | None:
        """A (batch, L_src) padding mask as (batch, 1, 1, L_src): the keys every query may see; else None."""
        if src_mask is None or src_mask.shape != shape:
            return None
        return src_mask[:, None, None, :]

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self._embed(src)
        padding = self._padding(src_mask, x.shape[:2])
        for layer in self.encoder:
            x = layer(x, src_mask if padding is None else padding)
        return self.encoder_norm(x)

    def decode(self, tgt: torch.Tensor, memory: torch.Tensor, tgt_mask: torch.Tensor | None = None,
               src_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self._embed(tgt)
        if tgt_mask is None:
            tgt_mask = self.causal_mask(x.shape[1], x.device)
        memory_mask = self._padding(src_mask, memory.shape[:2])
        for layer in self.decoder:
            x = layer(x, memory, tgt_mask, memory_mask)
        x = self.decoder_norm(x)
        return x if self.head is None else self.head(x)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor, src_mask: torch.Tensor | None = None,
                tgt_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.decode(tgt, self.encode(src, src_mask), tgt_mask, src_mask)

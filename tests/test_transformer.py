"""Transformer baseline: KV-cache generation equals the parallel forward; positions; config sizing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ssmlm.errors import ConfigError
from ssmlm.models.transformer import TransformerLM, rope_rotate
from conftest import reference_presets

REPO = Path(__file__).resolve().parents[1]
PRESETS = reference_presets()


def small_lm(**kwargs):
    torch.manual_seed(0)
    defaults = dict(vocab_size=17, d_model=16, n_layers=2, head_dim=8, max_seq_len=32, dropout=0.0)
    return TransformerLM(**{**defaults, **kwargs}).eval()


@pytest.mark.parametrize("pos_emb", ["rope", "learned"])
def test_a_prompt_fills_one_kv_cache_per_layer(pos_emb):
    """(step == forward: tests/test_contract.py)"""
    model = small_lm(pos_emb=pos_emb)
    with torch.no_grad():
        _, cache = model(torch.randint(0, 17, (2, 9)), return_state=True)
    assert all(layer.length == 9 and layer.capacity == 32 for layer in cache)  # one KV cache per layer


def test_full_cache_is_a_clear_error():
    model = small_lm(max_seq_len=8)
    tokens = torch.randint(0, 17, (1, 8))
    with torch.no_grad():
        _, cache = model(tokens, return_state=True)
        with pytest.raises(ConfigError, match="KV cache full.*max_seq_len"):
            model.step(tokens[:, 0], cache)
        with pytest.raises(ConfigError, match="max_seq_len"):
            model(torch.randint(0, 17, (1, 9)), return_state=True)


def test_positions_beyond_max_seq_len():
    tokens = torch.randint(0, 17, (1, 40))
    with pytest.raises(ConfigError, match="learned positions"):
        small_lm(pos_emb="learned")(tokens)
    assert small_lm(pos_emb="rope")(tokens).shape == (1, 40, 17)  # rotary needs no table


def test_rope_scores_depend_on_relative_position_only():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    score = lambda i, j: (rope_rotate(q, torch.tensor([i])) * rope_rotate(k, torch.tensor([j]))).sum()
    torch.testing.assert_close(score(3, 1), score(10, 8))
    assert not torch.allclose(score(3, 1), score(3, 2))


def test_gradients_reach_every_parameter():
    model = small_lm(pos_emb="learned", tie_embeddings=True).train()
    tokens = torch.randint(0, 17, (2, 12))
    torch.nn.functional.cross_entropy(model(tokens).reshape(-1, 17), tokens.reshape(-1)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert model.head.weight is model.embedding.weight


def test_bad_config_values():
    with pytest.raises(ConfigError, match="model.head_dim"):
        TransformerLM(17, d_model=20, n_layers=1, head_dim=8)
    with pytest.raises(ConfigError, match="model.pos_emb"):
        TransformerLM(17, d_model=16, n_layers=1, head_dim=8, pos_emb="alibi")


@pytest.mark.parametrize("vocab", [141, 257])
def test_config_matches_reference_param_count(vocab):
    model_cfg = OmegaConf.load(REPO / "conf/model/transformer.yaml")
    for e, h, n in PRESETS.values():
        cfg = OmegaConf.create({"size": {"emb_dim": e, "hidden": h, "n_layers": n, "dropout": 0.1},
                                "data": {"seq_len": 512}, "model": model_cfg})
        model = instantiate(cfg.model, vocab_size=vocab)
        reference = vocab * e + e * h + n * (h * h + 4 * h) + h * vocab
        assert 0.85 < model.num_params() / reference < 1.15, (h, model.num_params(), reference)
        assert model.max_seq_len == 512 and len(model.blocks) == n


def test_rope_cache_can_be_sized_past_the_training_length_for_generation():
    """ssmlm-generate raises max_seq_len of a rope model to fit prompt + new tokens: only the cache grows."""
    torch.manual_seed(0)
    model = TransformerLM(vocab_size=30, d_model=32, n_layers=2, head_dim=16, max_seq_len=8, dropout=0.0).eval()
    tokens = torch.randint(0, 30, (2, 20))
    model.max_seq_len = 20
    with torch.no_grad():
        full = model(tokens)
        state = model.allocate_state(2)
        stepped = []
        for t in range(20):
            logits, state = model.step(tokens[:, t], state)
            stepped.append(logits)
    torch.testing.assert_close(torch.stack(stepped, 1), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("pos_emb", ["rope", "learned"])
def test_generation_past_the_training_length(pos_emb):
    """The validation samples continue a prompt past the training windows: a rotary model's cache grows to fit,
    a model with learned positions generates up to its last one (ssmlm-generate refuses that with a ConfigError)."""
    from ssmlm.generate import Decoder, room_for
    from ssmlm.sampling import Sampling

    model = small_lm(pos_emb=pos_emb, max_seq_len=16)
    n_new = room_for(model, 10, 20)
    assert (n_new, model.max_seq_len) == ((20, 29) if pos_emb == "rope" else (7, 16))
    decoder = Decoder(model)
    with torch.no_grad():
        logits, state = decoder.prefill(torch.randint(0, 17, (1, 10)))
        tokens = decoder.tokens(logits, state, n_new, Sampling(temperature=0.0), torch.Generator().manual_seed(0))
    assert len(list(tokens)) == n_new

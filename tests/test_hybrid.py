"""Gated-MLP SSM hybrids: step == forward with SSM states and KV caches, causality, gradients, attn_layers
validation, config sizing, and a short training run on the real data through the composed config."""

from __future__ import annotations

import itertools
import logging

import hydra
import pytest
import torch

from ssmlm.errors import ConfigError
from ssmlm.models.hybrid import GatedSSMMixer, HybridLM
from ssmlm.models.transformer import KVCache, SelfAttention
from ssmlm.train import train
from conftest import reference_presets
from tiny_runs import TINY, tiny_data

PRESETS = reference_presets()
# (ssm, attn_layers, ssm_dim): each SSM pure and interleaved with attention; one GSS-style narrow SSM stream
VARIANTS = {
    "s4d": ("s4d", [], None),
    "s4d-attn-middle-narrow": ("s4d", [1], 6),
    "selective": ("selective", [], None),
    "selective-attn-first-last": ("selective", [0, -1], None),
}


def small_lm(ssm="s4d", attn_layers=(), **kwargs):
    torch.manual_seed(0)
    # max_seq_len 8 < the 23 tokens below: the KV caches have to grow on the way
    defaults = dict(vocab_size=17, d_model=16, n_layers=3, d_state=6, dropout=0.0, kernel_chunk=5, max_seq_len=8,
                    scan_backend="chunked")
    return HybridLM(ssm=ssm, attn_layers=attn_layers, **{**defaults, **kwargs}).eval()


@pytest.mark.parametrize("variant", VARIANTS)
def test_layer_kinds_and_kv_caches_after_a_sequence(variant):
    """(step == forward, causality, gradients: tests/test_contract.py)"""
    ssm, attn_layers, ssm_dim = VARIANTS[variant]
    model = small_lm(ssm, attn_layers, ssm_dim=ssm_dim)
    kinds = [type(b.mixer) for b in model.blocks]
    assert kinds.count(SelfAttention) == len(attn_layers) and kinds.count(GatedSSMMixer) == 3 - len(attn_layers)
    tokens = torch.randint(0, 17, (2, 23))
    with torch.no_grad():
        _, last = model(tokens, return_state=True)
    for layer_state in last:
        if isinstance(layer_state, KVCache):
            assert layer_state.length == 23 and layer_state.capacity >= 23


@pytest.mark.parametrize("ssm", ["s4d", "selective"])
def test_ssm_dynamics_get_their_hints(ssm):
    model = small_lm(ssm, [1], ssm_dim=6, ssm_lr=2e-3)
    dynamics = {"s4d": ("log_dt", "log_A_real", "A_imag"), "selective": ("A_log", "dt_proj.bias")}[ssm]
    hinted = {name.split(".ssm.")[-1] for name, p in model.named_parameters()
              if getattr(p, "_optim", {}).get("lr") == 2e-3}
    assert hinted == set(dynamics)


@pytest.mark.parametrize("attn_layers, message", [
    ([3], r"model.attn_layers=\[3\]: 3 is not a layer; use 0-based layer indices in \[-3, 2\]"),
    ([-4], r"\[-3, 2\] for model.n_layers=3"),
    ([1, -2], "names layer 1 twice"),
    (["last"], "'last' is not a layer"),
])
def test_bad_attn_layers_are_config_errors(attn_layers, message):
    with pytest.raises(ConfigError, match=message):
        HybridLM(17, d_model=16, n_layers=3, attn_layers=attn_layers)


def test_other_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="model.ssm"):
        HybridLM(17, d_model=16, n_layers=2, ssm="s5")
    with pytest.raises(ConfigError, match="model.head_dim"):
        HybridLM(17, d_model=20, n_layers=2, attn_layers=[0])
    with pytest.raises(ConfigError, match="model.activation"):
        HybridLM(17, d_model=16, n_layers=2, activation="relu")
    with pytest.raises(ConfigError, match="model.d_state"):
        HybridLM(17, d_model=16, n_layers=2, d_state=5)
    with pytest.raises(ConfigError, match="hardware.scan_backend"):
        HybridLM(17, d_model=16, n_layers=2, ssm="selective", scan_backend="cuda")
    HybridLM(17, d_model=20, n_layers=2)  # without attention layers any width goes


def test_configs_match_reference_param_count_at_every_preset(make_cfg):
    for model in ("hybrid", "hybrid_attn"):
        for preset, (e, h, n) in PRESETS.items():
            cfg = make_cfg(f"model={model}", f"experiment={preset}", "hardware=gtx1080ti")
            for ssm, vocab in itertools.product(("s4d", "selective"), (141, 257)):
                cfg.model.ssm = ssm
                net = hydra.utils.instantiate(cfg.model, vocab_size=vocab)
                reference = vocab * e + e * h + n * (h * h + 6 * h) + h * vocab + vocab
                assert 0.85 < net.num_params() / reference < 1.15, (model, ssm, preset, net.num_params(), reference)
                assert len(net.blocks) == n and net.attn_layers == ((n - 1,) if model == "hybrid_attn" else ())
                ssm_layer = net.blocks[0].mixer.ssm
                assert ssm_layer.d_state == (32 if ssm == "s4d" else 16)
                if ssm == "selective":
                    assert ssm_layer.scan_backend == "chunked"  # from hardware.scan_backend
                assert net.max_seq_len == (cfg.data.seq_len if model == "hybrid_attn" else None)


def test_trains_on_real_data_through_the_composed_config(make_cfg, shared_data, tmp_path, caplog):
    """A few steps of the attention-interleaved selective hybrid (SSM layer, then attention) on the Hindi text.
    The text samples after the validation continue a 24-token prompt past the 32-token training windows, so the
    KV cache grows for them."""
    cfg = make_cfg("model=hybrid_attn", "model.ssm=selective", "hardware=cpu", "logger=csv", *TINY,
                   *tiny_data(tmp_path / "data", shared_data), "size.hidden=64", "size.n_layers=2",
                   "trainer.max_steps=40", "trainer.val_check_interval=40", "trainer.check_val_every_n_epoch=null",
                   "optim.lr=1e-2", "optim.warmup_steps=5")
    with caplog.at_level(logging.INFO, logger="ssmlm"):
        results = train(cfg)
    assert results["global_step"] == 40
    assert any("sample at step 40" in record.getMessage() for record in caplog.records)
    dm = hydra.utils.instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    assert results["test_bpt"] < dm.unigram_entropy_bits(), results

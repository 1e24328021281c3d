"""S5 family: HiPPO-N init, convolution/recurrence equivalence, causality, gradients, config sizing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ssmlm.errors import ConfigError
from ssmlm.models.hippo import dplr
from ssmlm.models.s5 import S5Layer, S5LM, causal_mode_conv, hippo_n_init
from conftest import reference_presets

REPO = Path(__file__).resolve().parents[1]
PRESETS = reference_presets()


def small_lm(**kwargs):
    torch.manual_seed(0)
    defaults = dict(vocab_size=17, d_model=8, n_layers=2, d_state=8, dropout=0.0)
    return S5LM(**{**defaults, **kwargs}).eval()


def test_causal_mode_conv_matches_recurrence():
    torch.manual_seed(0)
    bu = torch.randn(2, 19, 5, dtype=torch.complex128)
    log_dA = torch.complex(-torch.rand(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64))
    x, expected = torch.zeros(2, 5, dtype=torch.complex128), []
    for t in range(19):
        x = torch.exp(log_dA) * x + bu[:, t]
        expected.append(x)
    torch.testing.assert_close(causal_mode_conv(bu, log_dA), torch.stack(expected, 1))


@pytest.mark.parametrize("blocks", [1, 2])
def test_hippo_n_init_is_block_diagonal_legs_normal_part(blocks):
    Lambda, V = hippo_n_init(16, blocks)
    size = 16 // blocks
    block_Lambda = dplr("legs", size)[0][size // 2:]
    torch.testing.assert_close(Lambda, block_Lambda.repeat(blocks))
    assert V.shape == (16, 8) and torch.allclose(Lambda.real, torch.tensor(-0.5, dtype=torch.float64))
    # columns are orthonormal eigenvectors, zero outside their own block
    torch.testing.assert_close(V.conj().T @ V, torch.eye(8, dtype=torch.complex128), atol=1e-10, rtol=0)
    if blocks == 2:
        assert V[:8, 4:].abs().max() == 0 and V[8:, :4].abs().max() == 0


def test_dt_log_uniform_and_optimizer_hints():
    layer = S5Layer(4, d_state=4096, blocks=64, dt_min=1e-3, dt_max=1e-1, ssm_lr=2e-3)
    dt = layer.log_dt.exp()
    assert dt.shape == (2048,) and dt.min() >= 1e-3 and dt.max() <= 1e-1
    assert 0.45 < (dt < 1e-2).float().mean() < 0.55
    for p in (layer.log_dt, layer.log_Lambda_real, layer.Lambda_imag):
        assert p._optim == {"weight_decay": 0.0, "lr": 2e-3}
    assert getattr(layer.B, "_optim", None) is None
    assert S5Layer(4, d_state=8, ssm_lr=None).log_dt._optim == {"weight_decay": 0.0}


def test_bad_sizes_are_config_errors():
    with pytest.raises(ConfigError, match="model.d_state"):
        S5Layer(4, d_state=6, blocks=2)
    with pytest.raises(ConfigError, match="model.dt_min"):
        S5Layer(4, d_state=8, dt_min=0.2, dt_max=0.1)


@pytest.mark.parametrize("vocab", [141, 257])
def test_config_matches_reference_param_count(vocab):
    model_cfg = OmegaConf.load(REPO / "conf/model/s5.yaml")
    for e, h, n in PRESETS.values():
        cfg = OmegaConf.create({"size": {"emb_dim": e, "hidden": h, "n_layers": n, "dropout": 0.1},
                                "model": model_cfg})
        model = instantiate(cfg.model, vocab_size=vocab)
        reference = vocab * e + e * h + n * (h * h + 6 * h) + h * vocab + vocab
        assert 0.85 < model.num_params() / reference < 1.15, (h, model.num_params(), reference)
        assert isinstance(model, S5LM) and len(model.blocks) == n

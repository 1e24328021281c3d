"""H3 family: shift filter, convolution/recurrence equivalence, causality, gradients, config sizing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ssmlm.errors import ConfigError
from ssmlm.models.h3 import H3Layer, H3LM
from conftest import reference_presets

REPO = Path(__file__).resolve().parents[1]
PRESETS = reference_presets()


def small_lm(**kwargs):
    torch.manual_seed(0)
    defaults = dict(vocab_size=17, d_model=8, n_layers=2, d_state=6, dropout=0.0, kernel_chunk=5)
    return H3LM(**{**defaults, **kwargs}).eval()


def test_shift_ssm_is_a_causal_filter_over_the_last_n_inputs():
    torch.manual_seed(0)
    layer = H3Layer(3, d_state=4).double()
    with torch.no_grad():  # isolate the shift filter: Q = V = 1, K = u, diagonal SSM = identity (C = 0, D = 1)
        layer.in_proj.weight.zero_()
        layer.in_proj.weight[3:6] = torch.eye(3)  # in_proj rows: [0:3] -> Q, [3:6] -> K, [6:9] -> V
        layer.in_proj.bias.copy_(torch.tensor([1.0] * 3 + [0.0] * 3 + [1.0] * 3))
        layer.C.zero_()
        layer.D.fill_(1)
        layer.out_proj.weight.copy_(torch.eye(3))
        layer.out_proj.bias.zero_()
        u = torch.randn(2, 9, 3, dtype=torch.float64)
        y = layer(u)
    w = layer.shift_kernel.detach()
    expected = torch.zeros_like(u)
    for t in range(9):
        for j in range(min(4, t + 1)):
            expected[:, t] += w[:, j] * u[:, t - j]
    torch.testing.assert_close(y, expected)


def test_optimizer_hints_and_bad_sizes():
    layer = H3Layer(4, d_state=8, ssm_lr=2e-3)
    for p in (layer.log_dt, layer.log_A_real, layer.A_imag):
        assert p._optim == {"weight_decay": 0.0, "lr": 2e-3}
    assert getattr(layer.shift_kernel, "_optim", None) is None
    with pytest.raises(ConfigError, match="model.d_state"):
        H3Layer(4, d_state=5)
    with pytest.raises(ConfigError, match="model.init"):
        H3Layer(4, d_state=8, init="hippo")
    with pytest.raises(ConfigError, match="model.mlp_expand"):
        H3LM(17, 8, 1, mlp_expand=-1)


@pytest.mark.parametrize("vocab", [141, 257])
def test_config_matches_reference_param_count(vocab):
    model_cfg = OmegaConf.load(REPO / "conf/model/h3.yaml")
    for e, h, n in PRESETS.values():
        cfg = OmegaConf.create({"size": {"emb_dim": e, "hidden": h, "n_layers": n, "dropout": 0.1},
                                "model": model_cfg})
        model = instantiate(cfg.model, vocab_size=vocab)
        reference = vocab * e + e * h + n * (h * h + 6 * h) + h * vocab + vocab
        assert 0.85 < model.num_params() / reference < 1.15, (h, model.num_params(), reference)
        assert isinstance(model, H3LM) and len(model.blocks) == n


@pytest.mark.parametrize("ssm_layer", ["s4d", "s4"])
def test_null_ssm_lr_and_kernel_chunk_reach_the_core(ssm_layer):
    """null is a value here (the global lr; kernels all at once), not "the core's default"."""
    core = H3LM(17, 8, 1, d_state=4, ssm_layer=ssm_layer, ssm_lr=None, kernel_chunk=None).blocks[0].mixer.ssm
    assert core.kernel_chunk is None and "lr" not in core.log_dt._optim
    core = H3LM(17, 8, 1, d_state=4, ssm_layer=ssm_layer).blocks[0].mixer.ssm
    assert core.kernel_chunk == 1024 and core.log_dt._optim["lr"] == 1e-3

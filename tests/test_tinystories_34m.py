"""The tinystories_34m preset (the "improved Mamba" study's scale) and the sweep over its four variant switches."""

from __future__ import annotations

import hydra
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from torch import nn

SWITCHES = ("residual_gate", "head_norm", "dropout", "activation")


def test_preset_is_a_34m_byte_level_mamba_on_tinystories(make_cfg):
    cfg = make_cfg("experiment=tinystories_34m")
    assert cfg.model._target_ == "ssmlm.models.mamba.MambaLM"
    assert cfg.data._target_ == "ssmlm.data.ByteDataModule" and cfg.data.seq_len == 1024
    assert cfg.batch_size == 16 and cfg.resume is True
    assert [cfg.model[k] for k in SWITCHES] == ["none", False, 0.0, "silu"]  # plain Mamba
    net = hydra.utils.instantiate(cfg.model, vocab_size=257)
    assert 33.5e6 < net.num_params() < 34.5e6
    assert len(net.blocks) == 20 and net.blocks[0].mixer.d_inner == 1024


def test_variant_sweep_is_every_combination_of_the_four_switches(make_cfg):
    params = make_cfg("experiment=tinystories_34m", "sweep=tinystories_34m_variants").hydra.sweeper.params
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    cells = BasicSweeper.split_arguments(parsed, None)[0]
    combos = {tuple(sorted(cell)) for cell in cells}
    assert len(cells) == len(combos) == 16
    assert {o.split("=")[0] for cell in cells for o in cell} == {f"model.{k}" for k in SWITCHES}
    # the cell with every switch on builds the model those switches describe
    cfg = make_cfg("experiment=tinystories_34m", "model.residual_gate=channel", "model.head_norm=true",
                   "model.dropout=0.1", "model.activation=gelu")
    net = hydra.utils.instantiate(cfg.model, vocab_size=257)
    block = net.blocks[0]
    assert block.residual_gate is not None and block.residual_gate.shape == (512,)
    assert isinstance(net.head_norm, nn.LayerNorm) and block.dropout.p == 0.1 and block.mixer.activation == "gelu"

"""Shared fixtures: the real data directory and Hydra config composition like the entry point does it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from ssmlm import resolvers

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"
resolvers.register()


def data_dir() -> Path:
    return (REPO / os.environ.get("SSMLM_DATA_DIR", "../shared/data")).resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    d = data_dir()
    if not (d / "hindi" / "premchand" / "train.txt").exists():
        pytest.skip(f"real data not found under {d} (set SSMLM_DATA_DIR)")
    return d


def compose_cfg(overrides: list[str], output_dir: Path):
    """The config ssmlm-train would run with these overrides, with its run dir set to ``output_dir``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.data_dir={data_dir()}", *overrides], return_hydra_config=True)
    OmegaConf.set_readonly(cfg.hydra, False)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.paths.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    return cfg


@pytest.fixture
def make_cfg(tmp_path):
    def _make(*overrides: str, output_dir: Path | None = None):
        return compose_cfg(list(overrides), output_dir or tmp_path / "run")

    return _make


@pytest.fixture(scope="session")
def compose_config():
    """``compose(overrides, output_dir)`` for fixtures wider than one test."""
    return compose_cfg


def run_steps(model, tokens, state):
    """Feed ``tokens`` (batch, L) through ``model.step`` one position at a time: (logits (batch, L, V), state)."""
    import torch

    logits = []
    for t in range(tokens.shape[1]):
        out, state = model.step(tokens[:, t], state)
        logits.append(out)
    return torch.stack(logits, dim=1), state

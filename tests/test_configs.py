"""Every config group combination composes, resolves and instantiates (Hydra compose API, as the CLI does)."""

from __future__ import annotations

import itertools
from pathlib import Path

import hydra
import pytest
from omegaconf import OmegaConf

CONF = Path(__file__).resolve().parents[1] / "conf"


def options(group: str) -> list[str]:
    """The options of a config group; files starting with _ are what the options share, not options."""
    return sorted(p.stem for p in (CONF / group).glob("[!_]*.yaml"))


MODELS, DATA, HARDWARE, EXPERIMENTS = options("model"), options("data"), options("hardware"), options("experiment")
GRID = {"tiny": (128, 32, 64, 128, 2, 100), "small": (256, 16, 64, 256, 4, 100),
        "medium": (512, 8, 128, 512, 6, 50), "large": (1024, 4, 256, 768, 8, 100)}


def test_groups_hold_what_the_docs_promise():
    assert {"diag_ssm"} <= set(MODELS)
    assert {"indic_chars", "tinystories_bytes"} <= set(DATA)
    assert set(HARDWARE) == {"auto", "cpu", "gtx1080ti", "cluster"}
    assert set(EXPERIMENTS) >= set(GRID)


@pytest.mark.parametrize("model,data,hardware,experiment",
                         list(itertools.product(MODELS, DATA, HARDWARE, [None, *EXPERIMENTS])))
def test_every_combination_composes_and_resolves(make_cfg, model, data, hardware, experiment):
    overrides = [f"model={model}", f"data={data}", f"hardware={hardware}"]
    if experiment:
        overrides.append(f"experiment={experiment}")
    cfg = make_cfg(*overrides)
    resolved = OmegaConf.to_container(cfg, resolve=True)  # every interpolation and resolver works
    assert resolved["model"]["_target_"].startswith("ssmlm.models.")
    assert resolved["data"]["seq_len"] > 0
    micro, accum = resolved["data"]["batch_size"], resolved["trainer"]["accumulate_grad_batches"]
    world = resolved["hardware"]["devices"] * resolved["hardware"]["num_nodes"]
    assert micro * accum * world == resolved["batch_size"]  # the global batch is what the experiment says
    if experiment in GRID:
        seq_len, batch, emb, hidden, layers, epochs = GRID[experiment]
        assert (resolved["data"]["seq_len"], resolved["batch_size"]) == (seq_len, batch)
        assert (resolved["size"]["emb_dim"], resolved["size"]["hidden"], resolved["size"]["n_layers"]) == (
            emb, hidden, layers)
        assert resolved["trainer"]["max_epochs"] == epochs


@pytest.mark.parametrize("model,experiment", list(itertools.product(MODELS, ["tiny", "small"])))
def test_models_instantiate_at_presets(make_cfg, model, experiment):
    cfg = make_cfg(f"model={model}", f"experiment={experiment}")
    net = hydra.utils.instantiate(cfg.model, vocab_size=141)
    assert net.num_params() > 0


def test_diag_ssm_matches_the_reference_architecture_size(make_cfg):
    cfg = make_cfg("model=diag_ssm", "experiment=small")
    net = hydra.utils.instantiate(cfg.model, vocab_size=141)
    V, E, H, n = 141, 64, 256, 4
    expected = V * E + (E * H + H) + n * (H * H + 4 * H + 2 * H) + (H * V + V)
    assert net.num_params() == expected


@pytest.mark.parametrize("data", DATA)
def test_datamodules_instantiate(make_cfg, data):
    cfg = make_cfg(f"data={data}", "experiment=small")
    dm = hydra.utils.instantiate(cfg.data)  # constructed without reading any file yet
    assert (dm.seq_len, dm.batch_size) == (256, 16)


@pytest.mark.parametrize("hardware", ["auto", "cpu"])
def test_trainer_instantiates_on_this_machine(make_cfg, hardware):
    cfg = make_cfg(f"hardware={hardware}", "logger=csv")
    trainer = hydra.utils.instantiate(cfg.trainer)
    assert trainer.max_steps == cfg.trainer.max_steps


def test_cluster_profile_derives_accumulation_from_world_size(make_cfg):
    cfg = make_cfg("hardware=cluster", "experiment=small", "hardware.devices=4", "hardware.num_nodes=2",
                   "hardware.micro_batch_size=1")
    assert cfg.data.batch_size == 1 and cfg.trainer.accumulate_grad_batches == 2  # 16 = 4 * 2 * 1 * 2
    with pytest.raises(Exception, match="not a multiple"):
        make_cfg("hardware=cluster", "experiment=large", "hardware.devices=3").trainer.accumulate_grad_batches


def test_gtx1080ti_never_selects_triton_or_half_precision(make_cfg):
    cfg = make_cfg("hardware=gtx1080ti", "model=diag_ssm")
    assert cfg.hardware.scan_backend == "chunked" and cfg.trainer.precision == "32-true" and not cfg.compile

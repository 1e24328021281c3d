"""Sweeps: the grid preset's cells and their run dirs, a multirun that goes on past a failed cell, relaunching
it (finished cells skipped, unfinished ones resumed), the summary and the report, and sweeps that name keys or
presets that do not exist."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra._internal.utils import create_config_search_path
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from ssmlm import report
from ssmlm.resolvers import run_id
from tiny_runs import REPO, TINY, cli_env, run_cli, tiny_data

def preset_batch(name: str) -> int:
    return OmegaConf.load(REPO / "conf" / "experiment" / f"{name}.yaml").batch_size


def sweep_cells(params: dict, *extra: str) -> list[list[str]]:
    """The cells of a sweep, as the multirun's sweeper expands them (glob() reads the config groups)."""
    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(REPO / "conf")))
    overrides = OverridesParser.create(config_loader=loader).parse_overrides(
        [f"{k}={v}" for k, v in params.items()] + list(extra))
    return BasicSweeper.split_arguments(overrides, None)[0]


def test_grid_sweep_is_every_size_at_every_context_length_each_in_its_own_dir(make_cfg):
    params = make_cfg("sweep=grid").hydra.sweeper.params
    cells = sweep_cells(params, "sweep=grid")
    names = set()
    for cell in cells:
        cfg = make_cfg(*cell)
        overrides = dict(o.split("=", 1) for o in cell)
        assert cfg.data.seq_len == int(overrides["data.seq_len"])  # the axis wins over the preset's own seq_len
        assert cfg.batch_size == preset_batch(overrides["experiment"])
        name = run_id(cfg.hydra.job.override_dirname)
        assert name == f"data.seq_len={overrides['data.seq_len']},experiment={overrides['experiment']}"
        assert Path(cfg.hydra.sweep.dir).parts[-2:] == ("multirun", "grid")  # one folder for the whole sweep
        names.add(name)
    assert len(cells) == len(names) == 16
    # more axes on the command line multiply the cells
    assert len(sweep_cells(params, "model=diag_ssm,s4d", "data=indic_chars,tinystories_bytes")) == 64


def summary_line(stdout: str) -> str:
    return next(line for line in stdout.splitlines() if line.startswith("sweep ") and "cell(s)" in line)


def test_multirun_goes_on_past_a_failed_cell_then_a_relaunch_skips_resumes_and_reports(tmp_path, shared_data):
    out = tmp_path / "out"
    args = ["-m", "hardware=cpu", "logger=csv", *[a for a in TINY if not a.startswith("data.seq_len")],
            *tiny_data(tmp_path / "data", shared_data), f"paths.log_dir={out}", "sweep_name=demo",
            "trainer.max_steps=12", "trainer.val_check_interval=6", "trainer.check_val_every_n_epoch=null",
            "data.seq_len=16,32,100000"]
    first = run_cli(*args)
    assert first.returncode == 1, first.stderr[-3000:]  # a cell failed: the multirun says so in its status
    assert "3 cell(s): 2 done, 1 failed" in summary_line(first.stdout), first.stdout[-3000:]
    assert "data.seq_len=100000" in first.stdout and "Traceback" not in first.stderr
    sweep_dir = out / "multirun" / "demo"
    cells = {int(p.name.split("data.seq_len=")[1].split(",")[0]): p for p in sweep_dir.glob("*data.seq_len=*")}
    assert sorted(cells) == [16, 32, 100000]
    failed = json.loads((cells[100000] / "status.json").read_text())
    assert failed["state"] == "failed" and "data.seq_len=100000" in failed["error"]
    for seq_len in (16, 32):
        assert (cells[seq_len] / "DONE").exists() and (cells[seq_len] / "results.json").exists()

    # the seq_len=32 cell stopped after its last checkpoint; the same command again
    (cells[32] / "DONE").unlink()
    (cells[32] / "results.json").unlink()
    second = run_cli(*args)
    assert second.returncode == 1, second.stderr[-3000:]
    assert "3 cell(s): 1 resumed, 1 skipped, 1 failed" in summary_line(second.stdout), second.stdout[-3000:]
    assert [e["event"] for e in json.loads((cells[16] / "status.json").read_text())["history"]] == [
        "started", "done", "skipped"]
    assert (cells[32] / "DONE").exists()

    report.main([str(sweep_dir)])
    with open(sweep_dir / "report.csv", newline="") as f:
        rows = {int(r["seq_len"]): r for r in csv.DictReader(f)}
    assert sorted(rows) == [16, 32, 100000]
    assert rows[100000]["status"] == "failed" and rows[16]["status"] == "done"
    assert float(rows[32]["best_val_ppl"]) > 1 and int(rows[32]["steps"]) == 12 and int(rows[32]["params"]) > 0
    assert (sweep_dir / "report.png").stat().st_size > 10_000
    assert "| cell | experiment |" in (sweep_dir / "report.md").read_text()


def test_sweep_over_a_key_that_does_not_exist_stops_before_training(tmp_path):
    proc = run_cli("-m", "hardware=cpu", "logger=csv", f"paths.log_dir={tmp_path}", "data.seq_lenn=16,32")
    assert proc.returncode != 0
    assert "Could not override 'data.seq_lenn'" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not list(tmp_path.glob("multirun/*/*/status.json"))  # no cell started


def test_local_multirun_of_ddp_cells_keeps_the_global_batch_and_one_dir_per_cell(tmp_path, shared_data):
    """scripts/ddp_check.py on CPU processes: a 1-device and a 2-process DDP cell in one local multirun (the
    second cell must start its own ranks, in its own dir), same global batch, agreeing loss curves."""
    small = ["size.emb_dim=16", "size.hidden=32", "size.n_layers=1", "batch_size=8", "data.seq_len=32",
             "callbacks.rich_summary=null", *tiny_data(tmp_path / "data", shared_data)]
    proc = subprocess.run([sys.executable, "scripts/ddp_check.py", "--accelerator", "cpu", "--steps", "12",
                           "--out", str(tmp_path / "out"), *small], cwd=REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "global batch (sequences per optimizer step): {1: 8, 2: 8}" in proc.stdout
    assert "Starting with 2 processes" in proc.stderr  # the second cell started its own second rank
    assert len(list((tmp_path / "out" / "multirun" / "ddp_check").glob("*/train.rank1.log"))) == 1

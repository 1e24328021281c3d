"""Resuming: a run killed with SIGKILL mid-epoch continues from its last checkpoint when the same command runs
again, exactly as if never stopped; a damaged last.ckpt falls back to the one before; a checkpoint of another
configuration is refused unless forced."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from ssmlm.errors import CheckpointError
from ssmlm.plots import read_metrics
from ssmlm.train import train
from tiny_runs import REPO, TINY, cli_env, command, tiny_data
from wandb_records import history, offline_runs

TRAIN = ["hardware=cpu", *TINY, "size.dropout=0", "trainer.max_epochs=20", "trainer.check_val_every_n_epoch=null",
         "trainer.log_every_n_steps=1"]


def checkpoint_step(path: Path) -> int | None:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])
    except Exception:  # not written yet
        return None


def events(run: Path) -> list[tuple[str, int]]:
    return [(e["event"], e["step"]) for e in json.loads((run / "status.json").read_text())["history"]]


def test_run_killed_mid_epoch_resumes_exactly_where_its_checkpoint_left_off(tmp_path, shared_data, make_cfg):
    # 117 batches per epoch; last.ckpt every 5 steps; validation every 50
    args = [*TRAIN, *tiny_data(tmp_path / "data", shared_data), "trainer.max_steps=300",
            "trainer.val_check_interval=50", "callbacks.last_checkpoint.every_n_train_steps=5"]
    run = tmp_path / "run"
    cli = command(*args, "logger=default", f"hydra.run.dir={run}")
    with open(tmp_path / "killed.log", "w") as out:
        # own session: SIGKILL reaches the wandb service process too, as an OOM kill or a node failure would
        proc = subprocess.Popen(cli, cwd=REPO, env=cli_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        deadline = time.monotonic() + 300
        while (checkpoint_step(run / "checkpoints" / "last.ckpt") or 0) < 10:  # kill at once: before its row
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    saved = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    resumed_at = saved["global_step"]
    assert 10 <= resumed_at < 300 and saved["CharDataModule"]["batches_done"] > 0  # killed mid-epoch
    sent_before = int((run / "wandb_step.txt").read_text())  # the last step the killed session sent to wandb

    again = subprocess.run(cli, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert events(run) == [("started", 0), ("resumed", resumed_at), ("done", 300)]
    results = json.loads((run / "results.json").read_text())
    assert results["global_step"] == 300 and (run / "DONE").exists()
    assert not list((run / "checkpoints").glob("*.tmp")), "a torn temporary checkpoint was left behind"
    torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)

    # the same run, never stopped: every step's training loss is the same (no sample skipped or repeated)
    train(make_cfg(*args, "logger=csv", output_dir=tmp_path / "reference"))
    expected = dict(read_metrics(tmp_path / "reference")["train/loss"])
    got = read_metrics(run)["train/loss"]
    assert [s for s, _ in got] == sorted(expected), "steps missing or logged twice in metrics.csv"
    for step, loss in got:
        assert math.isclose(loss, expected[step], rel_tol=1e-5), (step, loss, expected[step])

    # wandb: both sessions wrote to one run id; the resumed one logs nothing the killed one had sent (the rows
    # the killed wandb service had not flushed yet are lost), and the steps only ever go up
    files = offline_runs(run)
    assert len(files) == 2 and len({f.name for f in files}) == 1
    resumed_steps = [row["_step"] for row in history(files[1])]
    assert resumed_steps[0] == max(sent_before + 1, resumed_at) and resumed_steps[-1] == 300
    steps = [row["_step"] for f in files for row in history(f)]
    assert all(a < b for a, b in zip(steps, steps[1:])), steps


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, shared_data, compose_config):
    """A finished in-process run: last.ckpt at step 30, last.prev.ckpt at step 20."""
    tmp = tmp_path_factory.mktemp("finished")
    args = [*TRAIN, *tiny_data(tmp / "data", shared_data), "logger=csv", "trainer.max_steps=30",
            "callbacks.last_checkpoint.every_n_train_steps=10", "test_after_fit=false"]
    train(compose_config(args, tmp / "run"))
    return args, tmp / "run"


def unfinished_copy(run: Path, tmp_path: Path) -> Path:
    """A copy of ``run`` as if it had stopped after its last checkpoint."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "DONE").unlink()
    (copy / "results.json").unlink()
    return copy


def test_unreadable_last_checkpoint_falls_back_to_the_one_before(finished_run, make_cfg, tmp_path, caplog):
    args, run = finished_run
    copy = unfinished_copy(run, tmp_path)
    last = copy / "checkpoints" / "last.ckpt"
    assert checkpoint_step(last) == 30 and checkpoint_step(copy / "checkpoints" / "last.prev.ckpt") == 20
    last.write_bytes(last.read_bytes()[:5000])  # cut short, as by a full disk
    with caplog.at_level(logging.WARNING, logger="ssmlm.train"):
        results = train(make_cfg(*args, output_dir=copy))
    assert "cannot read" in caplog.text and "last.prev.ckpt (step 20)" in caplog.text
    assert events(copy)[-2:] == [("resumed", 20), ("done", 30)] and results["global_step"] == 30
    assert (copy / "checkpoints" / "last.ckpt.unreadable").stat().st_size == 5000  # kept, not destroyed
    assert checkpoint_step(last) == 30


def test_checkpoint_of_another_configuration_is_refused_unless_forced(finished_run, make_cfg, tmp_path):
    args, run = finished_run
    copy = unfinished_copy(run, tmp_path)
    before = (copy / "checkpoints" / "last.ckpt").read_bytes()
    other = [*args, "size.dropout=0.2", "trainer.max_steps=40"]
    with pytest.raises(CheckpointError, match="(?s)different model config.*force_resume=true"):
        train(make_cfg(*other, output_dir=copy))
    assert (copy / "checkpoints" / "last.ckpt").read_bytes() == before
    assert events(copy)[-1] == ("failed", None)
    results = train(make_cfg(*other, "force_resume=true", output_dir=copy))
    assert events(copy)[-2:] == [("resumed", 30), ("done", 40)] and results["global_step"] == 40


def test_rotation_keeps_last_checkpoint_in_place_until_the_next_one_replaces_it(tmp_path):
    """A kill between the rotation and the next save must still find last.ckpt (the resume's first choice)."""
    from ssmlm import run_dir

    first = {"global_step": 5, "state_dict": {"w": torch.ones(3)}, "hyper_parameters": {}}
    run_dir.save_checkpoint(first, tmp_path / "last.ckpt")
    run_dir.rotate_last(tmp_path)
    for name in ("last.ckpt", "last.prev.ckpt"):  # the moment a kill could land: both there, both verified
        assert run_dir.is_verified(tmp_path / name), name
        assert run_dir.read_checkpoint(tmp_path / name)["global_step"] == 5
    run_dir.save_checkpoint({**first, "global_step": 10}, tmp_path / "last.ckpt")
    assert run_dir.read_checkpoint(tmp_path / "last.ckpt")["global_step"] == 10
    assert run_dir.read_checkpoint(tmp_path / "last.prev.ckpt")["global_step"] == 5  # a separate file now
    assert not list(tmp_path.glob("*.tmp"))


def test_row_lightning_logs_after_the_checkpoint_comes_back_on_resume(finished_run, make_cfg, tmp_path):
    """A kill after last.ckpt is saved and before Lightning writes that step's metrics row (its next lines): the
    checkpoint carries the row and the resumed run writes it; metrics.csv ends up as the uninterrupted run's."""
    args, run = finished_run
    copy = unfinished_copy(run, tmp_path)
    checkpoints = copy / "checkpoints"
    for suffix in ("", ".sha256"):  # the state of step 20, when last.ckpt was the step-20 one
        os.replace(checkpoints / f"last.prev.ckpt{suffix}", checkpoints / f"last.ckpt{suffix}")
    metrics = copy / "csv" / "metrics.csv"
    lines = metrics.read_text().splitlines(keepends=True)
    step_column = lines[0].rstrip("\r\n").split(",").index("step")
    kept = [line for line in lines[1:] if int(float(line.split(",")[step_column])) < 19]
    assert len(kept) < len(lines) - 1
    metrics.write_text(lines[0] + "".join(kept))  # the step-19 row (logged after step 20's save) never written
    results = train(make_cfg(*args, output_dir=copy))
    assert events(copy)[-2:] == [("resumed", 20), ("done", 30)] and results["global_step"] == 30
    assert read_metrics(copy)["train/loss"] == read_metrics(run)["train/loss"]
    # resumed again, with the row present: it is not written twice
    (copy / "DONE").unlink()
    for suffix in ("", ".sha256"):
        shutil.copy(checkpoints / f"last.prev.ckpt{suffix}", checkpoints / f"last.ckpt{suffix}")
    train(make_cfg(*args, output_dir=copy))
    assert read_metrics(copy)["train/loss"] == read_metrics(run)["train/loss"]


def test_rotation_on_a_filesystem_without_hard_links_renames(tmp_path, monkeypatch):
    import errno

    from ssmlm import run_dir

    def no_links(*args):
        raise OSError(errno.EPERM, "hard links not supported")

    run_dir.save_checkpoint({"global_step": 5, "state_dict": {}, "hyper_parameters": {}}, tmp_path / "last.ckpt")
    monkeypatch.setattr(run_dir.os, "link", no_links)
    run_dir.rotate_last(tmp_path)
    assert not (tmp_path / "last.ckpt").exists() and not (tmp_path / "last.ckpt.sha256").exists()
    assert run_dir.read_checkpoint(tmp_path / "last.prev.ckpt")["global_step"] == 5
    assert not list(tmp_path.glob("*.tmp"))

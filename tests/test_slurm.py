"""SLURM end to end on a one-node cluster started for the tests (tests/slurm_cluster.py; skipped when slurm-wlm
and munge are not installed): a two-cell sweep through the submitit launcher (hardware=cluster on the CPU, each
job two DDP ranks started by srun); one job gets SLURM's pre-timeout signal (USR2: checkpoint at the next step,
submitit requeues it), the other is requeued by the scheduler (SIGTERM: checkpoint at the next step, stop); both
come back in the same run dir and wandb run, resume from their checkpoint and finish; the relaunched sweep skips
both. A sweep that sbatch refuses stops before submitting anything, with sbatch's own message."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import torch

from slurm_cluster import LocalSlurm, missing
from ssmlm.plots import read_metrics
from ssmlm.sweep import cell_dirs, read_status
from tiny_runs import REPO, TINY, cli_env, command, run_cli, tiny_data
from wandb_records import history, offline_runs, run_info

pytestmark = pytest.mark.skipif(missing() is not None, reason=str(missing()))

CPU_CLUSTER = ["hardware=cluster", "hardware.accelerator=cpu", "hardware.devices=2", "hardware.precision=32-true",
               "hardware.strategy=ddp", "hardware.num_workers=0", "hydra.launcher.gpus_per_node=null",
               "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=60"]


@pytest.fixture(scope="module")
def cluster():
    local = LocalSlurm()
    local.start()
    yield local
    local.stop()


def slurm(cluster: LocalSlurm, *cmd: str) -> str:
    return subprocess.run(cmd, env=cluster.env(), capture_output=True, text=True, timeout=60, check=True).stdout


def checkpoint_step(path: Path) -> int:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])
    except Exception:  # not written yet
        return 0


def wandb_has_rows(cell: Path) -> bool:
    """Whether the cell's wandb run has written history rows yet (read while it is written: a torn tail is not)."""
    try:
        return any(history(f) for f in offline_runs(cell))
    except Exception:
        return False


def test_preempted_jobs_come_back_resume_and_finish_then_a_relaunch_skips_them(cluster, tmp_path, shared_data):
    out = tmp_path / "out"
    args = ["-m", *CPU_CLUSTER, *[a for a in TINY if not a.startswith("data.seq_len")],
            *tiny_data(tmp_path / "data", shared_data), f"paths.log_dir={out}", "sweep_name=e2e",
            "trainer.max_steps=80", "trainer.max_epochs=10", "trainer.val_check_interval=40",
            "trainer.check_val_every_n_epoch=null", "trainer.log_every_n_steps=2",
            "callbacks.last_checkpoint.every_n_train_steps=10", "data.seq_len=16,32"]
    env = cluster.env(cli_env())
    sweep_dir = out / "multirun" / "e2e"
    preempted: dict[Path, tuple[str, str, int]] = {}  # cell -> (job id, how, last.ckpt step when preempted)
    with open(tmp_path / "sweep.log", "w") as log:
        sweep = subprocess.Popen(command(*args), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 420
        while sweep.poll() is None:
            assert time.monotonic() < deadline, "the sweep did not finish in time"
            for cell in cell_dirs(sweep_dir):
                status = read_status(cell)
                step = checkpoint_step(cell / "checkpoints" / "last.ckpt")
                if cell in preempted or not status or status["state"] != "started" or step < 10:
                    continue
                job = status["history"][-1]["job"]
                sent = {how for _, how, _ in preempted.values()}
                # the pre-timeout signal: checkpoint, then submitit requeues the job. It reaches wandb's service
                # too, so it goes to a cell whose wandb run has written rows (a loaded machine starts it late).
                if "USR2" not in sent and wandb_has_rows(cell):
                    slurm(cluster, "scancel", "--signal=USR2", job)
                    preempted[cell] = (job, "USR2", step)
                elif "requeue" not in sent:  # the scheduler requeues the job: SIGTERM, then the job starts over
                    slurm(cluster, "scontrol", "requeue", job)
                    preempted[cell] = (job, "requeue", step)
            for job, _, _ in preempted.values():
                # SLURM holds a requeued job back for ~2 minutes (BeginTime): let it start now
                if slurm(cluster, "squeue", "-h", "-j", job, "-o", "%T %r").split() == ["PENDING", "BeginTime"]:
                    slurm(cluster, "scontrol", "update", f"JobId={job}", "StartTime=now")
            time.sleep(0.3)
    output = (tmp_path / "sweep.log").read_text()
    assert sweep.returncode == 0, output[-4000:]
    assert sorted(how for _, how, _ in preempted.values()) == ["USR2", "requeue"], output[-4000:]
    assert "2 cell(s): 2 resumed" in output, output[-4000:]

    for cell, (job, how, step_seen) in preempted.items():
        status = read_status(cell)
        events = [(e["event"], e["step"], e["job"]) for e in status["history"]]
        assert [e for e, _, _ in events] == ["started", "stopped", "resumed", "done"], (how, events)
        stopped_at, resumed_at = events[1][1], events[2][1]
        # saved at the step the signal arrived (not only at the periodic checkpoints), and resumed from there
        assert resumed_at == stopped_at >= step_seen, (how, events)
        assert {j for _, _, j in events} == {job}  # the same SLURM job came back
        results = json.loads((cell / "results.json").read_text())
        assert results["global_step"] == 80 and results["global_batch"] == 8 and (cell / "DONE").exists()
        assert (cell / "train.rank1.log").exists() and not list(cell.parent.glob("*/.pl_hydra*"))  # 2 ranks, 1 dir
        files = offline_runs(cell)
        assert len(files) == 2 and len({f.name for f in files}) == 1, (how, files)  # one wandb run, resumed
        steps = [row["_step"] for f in files for row in history(f)]
        assert all(a < b for a, b in zip(steps, steps[1:])) and steps[-1] == 80, (how, steps)
        first_session = [row["_step"] for row in history(files[0])]
        if how == "USR2":  # a clean stop: wandb flushed everything the first session logged
            assert first_session and max(first_session) < resumed_at, (how, first_session, resumed_at)
        else:
            # SLURM's SIGTERM also reaches wandb's own service process, which may die before writing the first
            # session's last rows (the CSV keeps them); whatever it wrote must still lie before the resume point
            assert not first_session or max(first_session) < resumed_at, (how, first_session, resumed_at)
        assert resumed_at <= history(files[1])[0]["_step"]
        # the CSV holds every row an uninterrupted run logs (trainer.log_every_n_steps=2: steps 1, 3, ..., 79),
        # once: also the one due at the step the signal stopped, which the stop left to the resumed run
        assert [s for s, _ in read_metrics(cell)["train/loss"]] == list(range(1, 80, 2)), how
        # the run as wandb knows it; after SLURM's SIGTERM the first session's service may have died before
        # writing even its run record, so the requeued cell reads it from the session that came back
        info = run_info(files[0] if how == "USR2" else files[1])
        assert {"model=diag_ssm", "data=indic_chars", "hardware=cluster"} <= set(info["tags"]), info
        assert info["group"] == "e2e" and info["name"] == cell.name and {"params", "model", "data"} <= info["config"]
        assert any("samples/_type" in row for f in files for row in history(f))  # generated text, per validation

    again = run_cli(*args, env=env, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "2 cell(s): 2 skipped" in again.stdout, again.stdout[-3000:]


def test_a_sweep_sbatch_refuses_stops_with_sbatchs_message(cluster, tmp_path):
    proc = run_cli("-m", *CPU_CLUSTER, "hydra.launcher.partition=no_such_partition", f"paths.log_dir={tmp_path}",
                   env=cluster.env(cli_env()), timeout=120)
    assert proc.returncode == 2
    assert "sbatch refused" in proc.stderr and "no_such_partition" in proc.stderr, proc.stderr[-2000:]
    assert "hydra.launcher.partition" in proc.stderr and "Traceback" not in proc.stderr
    assert not slurm(cluster, "squeue", "-h").strip()  # nothing was submitted

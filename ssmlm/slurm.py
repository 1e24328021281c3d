"""Running under SLURM: who requeues a job, and how a job stops cleanly when it is told to.

Requeueing belongs to submitit, the launcher of ``hardware=cluster`` (``hydra/launcher: submitit_slurm``): its job
wrapper catches SLURM's pre-timeout signal (``--signal=USR2@<signal_delay_s>``, also what ``scancel --signal=USR2``
sends), re-pickles the Hydra job and runs ``scontrol requeue``; the requeued job runs the same cell again, in the
same run dir, and training resumes from ``last.ckpt``. Lightning's own SLURM auto-requeue is switched off
(:func:`cluster_plugins`), so exactly one mechanism requeues.

During training, :class:`StopSignal` stands in front of both ways a job is told to stop: submitit's handler of
USR2 (which would requeue and exit on the spot, possibly in the middle of an optimizer step) and Lightning's
SIGTERM handler (which runs a collective inside the signal handler, and can deadlock DDP ranks). Its handlers
only note the signal; ``LastCheckpoint`` then agrees across ranks, writes ``last.ckpt`` at the next optimizer-step
boundary, and calls :meth:`StopSignal.stop`: after USR2, submitit's own handler requeues the job; after SIGTERM
(preemption, ``scancel``, ``scontrol requeue``, a plain ``kill``) the process exits, and SLURM requeues a
preempted job itself.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import tempfile
import threading
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ssmlm.errors import SsmlmError

log = logging.getLogger(__name__)

# what a process was asked to do, in increasing strength (ranks agree on the strongest)
CONTINUE, EXIT, REQUEUE = 0, 1, 2


def job_id() -> str | None:
    """This SLURM job's id (``<array job>_<task>`` for an array task), or None outside SLURM."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array:
        return f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID')}"
    return os.environ.get("SLURM_JOB_ID")


def cluster_plugins() -> list:
    """Trainer plug-ins for a SLURM job: the SLURM environment (ranks from srun) with Lightning's requeue off."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    if SLURMEnvironment.detect():
        return [SLURMEnvironment(auto_requeue=False)]
    return []


def _submitit_requeue_handler():
    """(signal, submitit's handler of it) inside a submitit job, else (None, None)."""
    try:
        from submitit.core.job_environment import JobEnvironment, SignalHandler
    except ImportError:
        return None, None
    signum = JobEnvironment._usr_sig()
    handler = signal.getsignal(signum)
    return (signum, handler) if isinstance(getattr(handler, "__self__", None), SignalHandler) else (None, None)


class StopSignal:
    """Installed when training starts, SIGTERM and submitit's requeue signal only set :attr:`asked` (``EXIT`` or
    ``REQUEUE``); :meth:`stop` then leaves the process the way the signal asked. Lightning puts back the handlers
    of before ``fit`` when it ends (normally or not), so nothing here needs undoing; until then a late signal (the
    SIGTERM of our own requeue, say) only sets the flag again, instead of running Lightning's collective."""

    def __init__(self) -> None:
        self.asked = CONTINUE
        self._requeue_signal, self._submitit_handler = None, None

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        self._requeue_signal, self._submitit_handler = _submitit_requeue_handler()
        signal.signal(signal.SIGTERM, self._noting(EXIT))
        if self._requeue_signal is not None:
            signal.signal(self._requeue_signal, self._noting(REQUEUE))

    def _noting(self, request: int):
        def note(signum, frame):
            log.warning("received %s: saving a checkpoint at the next optimizer step, then %s",
                        signal.Signals(signum).name, "requeueing" if request == REQUEUE else "stopping")
            self.asked = max(self.asked, request)

        return note

    def stop(self, request: int) -> None:
        """Leaves the process once the checkpoint is written. ``REQUEUE`` (agreed across ranks) runs submitit's
        handler, which on rank 0 requeues the job and exits; every other case exits with 128 + SIGTERM."""
        if request == REQUEUE and self._submitit_handler is not None:
            self._submitit_handler(self._requeue_signal, None)
        raise SystemExit(128 + signal.SIGTERM)


class SubmissionError(SsmlmError):
    """SLURM would not take the jobs."""


def check_submission(launcher: DictConfig, sweep_dir: Path) -> None:
    """Asks ``sbatch --test-only`` whether SLURM would accept the jobs of a sweep, built exactly as the submitit
    launcher builds them, so that a wrong partition, account, time limit or resource request stops the sweep at
    once with sbatch's own message, before anything is submitted. Does nothing for other launchers."""
    if not str(launcher.get("_target_", "")).endswith("SlurmLauncher"):
        return
    if shutil.which("sbatch") is None:
        raise SubmissionError("hardware=cluster submits SLURM jobs, but sbatch is not on PATH: run the command on a "
                              "login node of the cluster, or pick another hardware profile.")
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    params = OmegaConf.to_container(launcher, resolve=True)
    params.pop("_target_", None)
    folder = Path(params.pop("submitit_folder"))
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm",
                                     slurm_max_num_timeout=params.pop("max_num_timeout", 0))
    common = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in common else f"slurm_{k}": v for k, v in params.items()})
    script = executor._executor._make_submission_file_text("true", "check")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=sweep_dir, prefix=".sbatch-check-", suffix=".sh") as f:
        f.write(script)
        f.flush()
        try:
            result = subprocess.run(["sbatch", "--test-only", f.name], capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired:
            raise SubmissionError("sbatch --test-only did not answer within 120 s: is the SLURM controller "
                                  "reachable from here (try `sinfo`)?") from None
    if result.returncode != 0:
        said = (result.stderr.strip() or result.stdout.strip()).replace("\n", "\n  ")
        raise SubmissionError(
            f"sbatch refused the sweep's jobs:\n  {said}\n"
            f"Fix the SLURM settings (hydra.launcher.partition, account, qos, timeout_min, gpus_per_node, mem_gb, "
            f"additional_parameters) on the command line or in conf/local/slurm.yaml; the same command without -m "
            f"and with --cfg hydra prints them.")

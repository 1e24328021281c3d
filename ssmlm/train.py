"""`ssmlm-train`: compose the config, train, test the best checkpoint, write results.json.

    ssmlm-train                                   # quick default run (diag SSM on Hindi characters)
    ssmlm-train experiment=small data=tinystories_bytes
    ssmlm-train -m sweep=grid                     # the reference grid: 4 sizes x 4 context lengths
    ssmlm-train -m sweep=grid hardware=cluster    # the same grid as SLURM jobs (docs/cluster.md)

Running the same command again resumes each unfinished run from <run dir>/checkpoints/last.ckpt (falling back to
the previous checkpoint if that one cannot be read) and skips finished ones (DONE). Every run keeps status.json
(ssmlm.sweep); a multirun goes on past a failed cell and prints a summary of its cells at the end.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import NamedTuple

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from ssmlm import resolvers, slurm, sweep
from ssmlm.callbacks import AtomicCheckpointIO, LastCheckpoint, ResumableCSVLogger, RunInfo, TokenThroughput
from ssmlm.conf_dir import config_dir
from ssmlm.errors import CheckpointError, SsmlmError
from ssmlm.lm import LMModule
from ssmlm.sparsity import SparsityConfig, callbacks_for, sparsity_report

resolvers.register()
log = logging.getLogger("ssmlm.train")
CONF_DIR = config_dir()
STEP_IN_NAME = re.compile(r"step(\d+)")


def _instantiate_dict(node: DictConfig | None, **kwargs) -> list:
    """Instantiate every non-null entry of a named dict of configs (callbacks, loggers)."""
    return [hydra.utils.instantiate(c, **kwargs) for c in (node or {}).values() if c is not None and "_target_" in c]


def _hydra() -> DictConfig | None:
    """Hydra's own config of this job, or None (e.g. a config composed by hand)."""
    return HydraConfig.get() if HydraConfig.initialized() else None


def is_multirun() -> bool:
    hc = _hydra()
    return hc is not None and hc.get("mode") == RunMode.MULTIRUN


# --- resuming ------------------------------------------------------------------------------------------------
class Resume(NamedTuple):
    path: Path
    step: int
    info: dict  # what RunInfo stored in the checkpoint (the wandb run id)


def candidate_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Where a run can resume from, best first: last.ckpt, the one before it, then the top-k, newest first."""
    top_k = sorted(ckpt_dir.glob("epoch*-step*.ckpt"),
                   key=lambda p: int(m[1]) if (m := STEP_IN_NAME.search(p.name)) else -1, reverse=True)
    paths = [ckpt_dir / LastCheckpoint.FILE, ckpt_dir / LastCheckpoint.PREVIOUS, *top_k]
    return [p for p in paths if p.is_file()]


def resume_checkpoint(cfg: DictConfig, output_dir: Path, tokenizer: dict | None) -> Resume | None:
    """The checkpoint to resume from, after checking it belongs to this run (same model, same vocabulary).

    An unreadable last.ckpt (a disk that filled up, a copy cut short) is set aside as ``last.ckpt.unreadable`` and
    the run resumes from the newest readable checkpoint, saying so. A checkpoint of another model is refused.
    """
    if not cfg.resume:
        return None
    unreadable = []
    for path in candidate_checkpoints(output_dir / "checkpoints"):
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
            hparams, step = ckpt["hyper_parameters"], int(ckpt["global_step"])
        except Exception as e:  # a torn or foreign file: try the one before it
            unreadable.append((path, f"{type(e).__name__}: {e}"))
            continue
        if not cfg.force_resume:
            check_checkpoint_belongs(cfg, path, hparams, tokenizer)
        if unreadable:
            for bad, why in unreadable:
                if bad.name in (LastCheckpoint.FILE, LastCheckpoint.PREVIOUS):
                    os.replace(bad, bad.with_name(bad.name + ".unreadable"))  # or it would rotate into last.prev
            log.warning("cannot read %s; resuming from %s (step %d) instead; the unreadable file is kept as "
                        "<name>.unreadable", "; ".join(f"{p} ({why})" for p, why in unreadable), path, step)
        return Resume(path, step, ckpt.get("ssmlm") or {})
    if unreadable:
        listed = "; ".join(f"{p} ({why})" for p, why in unreadable)
        raise CheckpointError(f"cannot read any checkpoint of this run: {listed}. Move them away to start over, "
                              f"or set resume=false.")
    return None


def check_checkpoint_belongs(cfg: DictConfig, ckpt: Path, hparams: dict, tokenizer: dict | None) -> None:
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    if hparams.get("model_cfg") != model_cfg:
        raise CheckpointError(
            f"{ckpt} was trained with a different model config (another experiment's run dir?):\n"
            f"  checkpoint: {hparams.get('model_cfg')}\n  this run:   {model_cfg}\n"
            f"Use another run dir (hydra.run.dir=...) or force_resume=true.")
    if SparsityConfig.from_dict(hparams.get("sparsity")) != SparsityConfig.from_dict(sparsity_node(cfg)):
        raise CheckpointError(
            f"{ckpt} was trained with a different sparsity config:\n  checkpoint: {hparams.get('sparsity')}\n"
            f"  this run:   {sparsity_node(cfg)}\nUse another run dir (hydra.run.dir=...).")
    if tokenizer is not None and hparams.get("tokenizer") not in (None, tokenizer):
        raise CheckpointError(
            f"{ckpt} was trained with a different vocabulary than {cfg.data.get('vocab_path') or 'the data'} "
            f"builds now. Point data.vocab_path at the run's vocab.json or use another run dir.")


def sparsity_node(cfg: DictConfig) -> dict | None:
    return OmegaConf.to_container(cfg.sparsity, resolve=True) if cfg.get("sparsity") is not None else None


# --- loggers -------------------------------------------------------------------------------------------------
def run_tags(cfg: DictConfig) -> list[str]:
    """wandb tags: the config choices (model, data, experiment, hardware), from Hydra when it composed the config."""
    hc = _hydra()
    choices = dict(hc.runtime.choices) if hc is not None and "choices" in hc.runtime else {}
    if not choices:  # composed without Hydra's runtime info: name what the config says
        choices = {"model": cfg.model._target_.rsplit(".", 1)[-1], "data": cfg.data._target_.rsplit(".", 1)[-1],
                   "experiment": cfg.get("run_name")}
    return [f"{group}={choices[group]}" for group in ("model", "data", "experiment", "hardware") if choices.get(group)]


def make_loggers(cfg: DictConfig, output_dir: Path, params: int, resume: Resume | None) -> list:
    loggers = []
    for node in (cfg.get("logger") or {}).values():
        if node is None or "_target_" not in node:
            continue
        if not issubclass(hydra.utils.get_class(node._target_), WandbLogger):
            loggers.append(hydra.utils.instantiate(node))
            continue
        id_file = output_dir / "wandb_id.txt"
        if resume and resume.info.get("wandb_id") and not id_file.exists():
            id_file.write_text(resume.info["wandb_id"] + "\n")  # the run dir lost it; the checkpoint kept it
        group = node.get("group") or (cfg.get("sweep_name") if is_multirun() else cfg.get("run_name"))
        logger = hydra.utils.instantiate(node, group=group, tags=run_tags(cfg),
                                         name=node.get("name") or output_dir.name)
        logger.log_hyperparams({"params": params, **OmegaConf.to_container(cfg, resolve=True)})  # rank 0 only
        loggers.append(logger)
    return loggers


# --- training ------------------------------------------------------------------------------------------------
def train(cfg: DictConfig) -> dict:
    """Trains (or resumes, or skips) the run of ``cfg`` and returns its results; status.json follows along."""
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    hc = _hydra()
    launch = sweep.launch_id(hc.sweep.dir) if is_multirun() else None
    status = sweep.CellStatus(output_dir, launch=launch, rank=rank_zero_only.rank)
    progress: dict = {}  # what _train got to: the step it resumed from, its trainer
    try:
        with _cell_of_a_local_multirun():
            return _train(cfg, output_dir, status, progress)
    except SsmlmError as e:
        status.record("failed", step=_step(progress), error=str(e))
        raise
    except Exception as e:
        status.record("failed", step=_step(progress), error=f"{type(e).__name__}: {e}")
        raise
    except BaseException:  # SIGTERM, submitit's requeue, Ctrl-C: the same command resumes
        status.record("stopped", step=_step(progress))
        raise


def _step(progress: dict) -> int | None:
    trainer = progress.get("trainer")
    return trainer.global_step if trainer is not None else progress.get("resumed_step")


def _train(cfg: DictConfig, output_dir: Path, status: sweep.CellStatus, progress: dict) -> dict:
    done = output_dir / "DONE"
    if cfg.resume and done.exists() and (output_dir / "results.json").exists():
        log.info("%s is complete (DONE); skipping. Delete DONE or set resume=false to train again.", output_dir)
        results = json.loads((output_dir / "results.json").read_text())
        status.record("skipped", step=results.get("global_step"))
        return results
    L.seed_everything(cfg.seed, workers=True)

    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    tokenizer = datamodule.tokenizer.to_dict()
    resume = resume_checkpoint(cfg, output_dir, tokenizer)
    progress["resumed_step"] = resume.step if resume else 0

    module = LMModule(
        model_cfg=OmegaConf.to_container(cfg.model, resolve=True),
        vocab_size=datamodule.vocab_size,
        optim=OmegaConf.to_container(cfg.optim, resolve=True),
        tokenizer=tokenizer,
        compile=bool(cfg.compile),
        sparsity=sparsity_node(cfg),
    )
    params = module.model.num_params()
    log.info("model %s: %.3fM parameters; run dir %s", cfg.model._target_, params / 1e6, output_dir)

    if not cfg.resume:  # training over: a new wandb run too
        for name in ("wandb_id.txt", "wandb_step.txt"):
            (output_dir / name).unlink(missing_ok=True)
    callbacks = _instantiate_dict(cfg.get("callbacks")) + callbacks_for(sparsity_node(cfg))
    loggers = make_loggers(cfg, output_dir, params, resume)
    wandb = next((lg for lg in loggers if isinstance(lg, WandbLogger)), None)
    callbacks.append(RunInfo(wandb_id=wandb.version if wandb is not None else None))
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers, plugins=[AtomicCheckpointIO(), *slurm.cluster_plugins()])
    progress["trainer"] = trainer

    if resume:
        log.info("resuming from %s (step %d)", resume.path, resume.step)
    for lg in loggers:
        if isinstance(lg, ResumableCSVLogger):
            lg.truncate(resume.step if resume else 0)  # rows logged past the checkpoint come again
    status.record("resumed" if resume else "started", step=resume.step if resume else 0, params=params)
    start = time.time()
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume.path if resume else None)
    results = {
        "global_step": trainer.global_step,
        "epoch": trainer.current_epoch,
        "params": params,
        # sequences per optimizer step, as trained: micro-batch x accumulation x ranks (= batch_size)
        "global_batch": datamodule.batch_size * trainer.accumulate_grad_batches * trainer.world_size,
        "wall_time_s_this_session": round(time.time() - start, 1),
    }
    last = next((c for c in callbacks if isinstance(c, LastCheckpoint)), None)
    if last is not None:
        results["train_time_s"] = round(last.train_time_s, 1)
    top_k = next((c for c in trainer.checkpoint_callbacks if getattr(c, "monitor", None)), None)
    if top_k is not None and top_k.best_model_score is not None:
        results["best_val_ppl"] = float(top_k.best_model_score)
        results["best_checkpoint"] = str(top_k.best_model_path)
    if SparsityConfig.from_dict(sparsity_node(cfg)).enabled:  # the final weights, before testing the best ones
        results["sparsity"] = sparsity_report(module.model)
    throughput = next((c for c in callbacks if isinstance(c, TokenThroughput)), None)
    if throughput is not None and throughput.tokens_per_s:
        results["train_tokens_per_s"] = round(throughput.tokens_per_s, 1)

    if cfg.test_after_fit:
        best = results.get("best_checkpoint") or None
        metrics = trainer.test(module, datamodule=datamodule, ckpt_path=best, verbose=False)[0]
        results.update({k.replace("/", "_"): float(v) for k, v in metrics.items()})
    if trainer.is_global_zero:
        tmp = output_dir / "results.json.tmp"
        tmp.write_text(json.dumps(results, indent=2) + "\n")
        tmp.replace(output_dir / "results.json")
        done.touch()
        log.info("results: %s", json.dumps(results))
    status.record("done", step=trainer.global_step)
    return results


class _cell_of_a_local_multirun:
    """For the duration of one cell of a local multirun (does nothing otherwise):

    - Lightning's local DDP starts ranks 1.. by re-running the command line with ``hydra.run.dir`` set to Hydra's
      run dir: the command line becomes this cell's overrides and the run dir this cell's dir, so the ranks train
      this cell in its dir (not the whole sweep again, and no extra output dirs);
    - DDP leaves its process group and its environment (LOCAL_RANK, WORLD_SIZE, MASTER_PORT, ...) behind: both are
      cleared after the cell, or the next cell would take its ranks for already started.
    """

    def __enter__(self):
        self.saved = None
        if not is_multirun() or slurm.job_id() is not None:
            return self
        hc = _hydra()
        self.saved = (list(sys.argv), hc.run.dir, dict(os.environ))
        sys.argv = [sys.argv[0], *hc.overrides.task]
        with read_write(hc), open_dict(hc):
            hc.run.dir = hc.runtime.output_dir
        return self

    def __exit__(self, *exc):
        if self.saved is None:
            return False
        argv, run_dir, environ = self.saved
        sys.argv = argv
        with read_write(_hydra()), open_dict(_hydra()):
            _hydra().run.dir = run_dir
        os.environ.clear()
        os.environ.update(environ)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        return False


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    multirun = is_multirun()
    try:
        results = train(cfg)
    except SsmlmError as e:
        log.error("%s", e)
        if multirun:  # the other cells go on; the summary at the end lists this one as failed
            print(f"\nssmlm-train: cell {Path(cfg.paths.output_dir).name} failed: {e}", file=sys.stderr)
            return None
        print(f"\nssmlm-train: error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:
        if not multirun:
            raise
        log.exception("cell %s failed", Path(cfg.paths.output_dir).name)
        print(f"\nssmlm-train: cell {Path(cfg.paths.output_dir).name} failed: {type(e).__name__}: {e}",
              file=sys.stderr)
        return None
    return results.get("best_val_ppl")  # a sweeper can minimise it


if __name__ == "__main__":
    main()

"""`ssmlm-train`: compose the config, train, test the best checkpoint, write results.json.

    ssmlm-train                                   # quick default run (diag SSM on Hindi characters)
    ssmlm-train experiment=small data=tinystories_bytes
    ssmlm-train -m sweep=grid                     # the reference grid: 4 sizes x 4 context lengths
    ssmlm-train -m sweep=grid hardware=cluster    # the same grid as SLURM jobs (docs/cluster.md)

Running the same command again resumes each unfinished run from its newest verified checkpoint (last.ckpt, else
the one before, ...: ssmlm.run_dir) and skips finished ones (DONE). The run dir is locked while it trains, and a
command whose model, data or vocabulary differ from the run's fingerprint is refused. Every run keeps status.json;
a multirun goes on past a failed cell and prints a summary of its cells at the end. Errors a user can fix are one
line and exit status 2 (docs/reliability.md).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import OmegaConfBaseException

from ssmlm import resolvers, slurm, sweep
from ssmlm.callbacks import AtomicCheckpointIO, LastCheckpoint, ResumableCSVLogger, RunInfo, TokenThroughput
from ssmlm.conf_dir import config_dir
from ssmlm.errors import CheckpointError, DataError, SsmlmError, number
from ssmlm.lm import LMModule
from ssmlm.run_dir import (FINGERPRINT_FILE, WANDB_ID_FILE, WANDB_STEP_FILE, WRITE_ERRNOS, CellStatus, Resume, RunDir,
                           atomic_write, config_fingerprint, data_file_fingerprint, differences, require_file,
                           sparsity_node, tokenizer_digest, write_error)
from ssmlm.sparsity import SparsityConfig, callbacks_for, sparsity_report

resolvers.register()
log = logging.getLogger("ssmlm.train")
CONF_DIR = config_dir()


def _instantiate_dict(node: DictConfig | None, **kwargs) -> list:
    """Instantiate every non-null entry of a named dict of configs (callbacks, loggers)."""
    return [instantiate(c, **kwargs) for c in (node or {}).values() if c is not None and "_target_" in c]


def _hydra() -> DictConfig | None:
    """Hydra's own config of this job, or None (e.g. a config composed by hand)."""
    return HydraConfig.get() if HydraConfig.initialized() else None


def is_multirun() -> bool:
    hc = _hydra()
    return hc is not None and hc.get("mode") == RunMode.MULTIRUN


def instantiate(node, **kwargs):
    """hydra.utils.instantiate, with an SsmlmError raised by the constructor passed on as it is (Hydra wraps it)."""
    try:
        return hydra.utils.instantiate(node, **kwargs)
    except hydra.errors.InstantiationException as e:
        cause = e.__cause__
        while cause is not None and not isinstance(cause, SsmlmError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise


# --- resuming ------------------------------------------------------------------------------------------------
def check_fingerprint(cfg: DictConfig, run: RunDir, recorded: dict | None, current: dict) -> None:
    """Refuses to resume a run whose recorded fingerprint differs from this command's (unless force_resume),
    listing the differing keys. Nothing has been written into the run dir when this refuses."""
    if recorded is None or not cfg.resume:
        return
    def comparable(fingerprint: dict) -> dict:
        """The parts known so far; a touched file of the same content is the same data (mtime aside)."""
        parts = {k: v for k, v in fingerprint.items() if k in current}
        if isinstance(parts.get("train_data"), dict):
            parts["train_data"] = {k: v for k, v in parts["train_data"].items() if k != "mtime_ns"}
        return parts

    diffs = differences(comparable(recorded), comparable(current))
    if not diffs:
        return
    if cfg.force_resume:
        log.warning("force_resume=true: resuming %s although its fingerprint differs: %s", run.path, "; ".join(diffs))
        return
    kinds = []
    if any(d.startswith("config.model") for d in diffs):
        kinds.append("a different model config")
    if any(d.startswith("config.sparsity") for d in diffs):
        kinds.append("a different sparsity config")
    if any(d.startswith(("config.data", "config.batch_size")) for d in diffs):
        kinds.append("a different data config")
    if any(d.startswith(("train_data", "vocabulary")) for d in diffs):
        kinds.append("a different vocabulary or training data")
    raise CheckpointError(
        f"{run.path} was trained with {' and '.join(kinds)} than this command's ({run.path / FINGERPRINT_FILE} "
        f"differs): {'; '.join(diffs)}. Use another run dir (hydra.run.dir=...), restore the original files, or "
        f"pass force_resume=true to resume anyway.")


def check_checkpoint_belongs(cfg: DictConfig, ckpt: Path, hparams: dict, tokenizer: dict | None) -> None:
    """For a run dir without fingerprint.json (older runs): the checkpoint's own model, sparsity and vocabulary."""
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


def resume_checkpoint(cfg: DictConfig, run: RunDir, tokenizer: dict | None, fingerprinted: bool) -> Resume | None:
    """The newest verified checkpoint to resume from (None: start from scratch). Checkpoints that fail their
    check (digest, loading, finite weights) are set aside as ``<name>.unreadable`` and the run says so."""
    if not cfg.resume:
        return None

    def accept(path: Path, ckpt: dict) -> None:
        if not cfg.force_resume and not fingerprinted:
            check_checkpoint_belongs(cfg, path, ckpt["hyper_parameters"], tokenizer)

    resume = run.newest_verified(accept)
    if resume is not None and resume.set_aside:
        log.warning("cannot read %s; resuming from %s (step %d) instead; the unreadable file is kept as "
                    "<name>.unreadable", "; ".join(f"{p} ({why})" for p, why in resume.set_aside), resume.path,
                    resume.step)
    return resume


def check_numbers(cfg: DictConfig) -> None:
    """The top-level numbers train() reads itself (the others are checked by whoever reads them)."""
    number("seed", cfg.seed, minimum=0, integer=True)
    number("batch_size", cfg.batch_size, minimum=1, integer=True)


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
            loggers.append(instantiate(node))
            continue
        id_file = output_dir / WANDB_ID_FILE
        if resume and resume.info.get("wandb_id") and not id_file.exists():
            atomic_write(id_file, resume.info["wandb_id"] + "\n")  # the run dir lost it; the checkpoint kept it
        group = node.get("group") or (cfg.get("sweep_name") if is_multirun() else cfg.get("run_name"))
        logger = instantiate(node, group=group, tags=run_tags(cfg), name=node.get("name") or output_dir.name)
        logger.log_hyperparams({"params": params, **OmegaConf.to_container(cfg, resolve=True)})  # rank 0 only
        loggers.append(logger)
    return loggers


# --- training ------------------------------------------------------------------------------------------------
def train(cfg: DictConfig) -> dict:
    """Trains (or resumes, or skips) the run of ``cfg`` and returns its results; status.json follows along.
    The run dir is locked for the whole time: a second process on it is refused before it writes anything."""
    run = RunDir(cfg.paths.output_dir, create=True)
    rank = rank_zero_only.rank
    with run.lock(rank):
        hc = _hydra()
        launch = sweep.launch_id(hc.sweep.dir) if is_multirun() else None
        status = CellStatus(run.path, launch=launch, rank=rank)
        progress: dict = {}  # what _train got to: the step it resumed from, its trainer
        try:
            with _cell_of_a_local_multirun():
                return _train(cfg, run, status, progress)
        except SsmlmError as e:
            _record_quietly(status, "failed", step=_step(progress), error=str(e))
            raise
        except OSError as e:
            if e.errno not in WRITE_ERRNOS:
                _record_quietly(status, "failed", step=_step(progress), error=f"{type(e).__name__}: {e}")
                raise
            error = write_error(Path(e.filename) if e.filename else run.path, e)  # e.g. a logger's full disk
            _record_quietly(status, "failed", step=_step(progress), error=str(error))
            raise error from e
        except Exception as e:
            _record_quietly(status, "failed", step=_step(progress), error=f"{type(e).__name__}: {e}")
            raise
        except BaseException:  # SIGTERM, submitit's requeue, Ctrl-C: the same command resumes
            _record_quietly(status, "stopped", step=_step(progress))
            raise


def _record_quietly(status: CellStatus, event: str, **fields) -> None:
    """Records a failure unless that write fails too (a full disk): the error being raised says more."""
    try:
        status.record(event, **fields)
    except SsmlmError:
        pass


def _step(progress: dict) -> int | None:
    trainer = progress.get("trainer")
    return trainer.global_step if trainer is not None else progress.get("resumed_step")


def _train(cfg: DictConfig, run: RunDir, status: CellStatus, progress: dict) -> dict:
    output_dir = run.path
    if cfg.resume and run.is_done():
        log.info("%s is complete (DONE); skipping. Delete DONE or set resume=false to train again.", output_dir)
        results = run.results()
        status.record("skipped", step=results.get("global_step"))
        return results
    check_numbers(cfg)
    L.seed_everything(cfg.seed, workers=True)

    # what defines the run, checked against the run dir's record before anything is written into it
    recorded = run.fingerprint() if cfg.resume else None
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    # the files actually read: data.*_path, or the built-in / downloaded copy found in its place
    files = {f"{split}_path": path for split, path in datamodule.files.items()}
    fingerprint = {"config": config_fingerprint(cfg),
                   "train_data": data_file_fingerprint(files.get("train_path", cfg.data.get("train_path")),
                                                       "data.train_path", (recorded or {}).get("train_data"))}
    for key in ("val_path", "test_path"):
        require_file(files.get(key, cfg.data.get(key)), f"data.{key}")
    check_fingerprint(cfg, run, recorded, fingerprint)
    datamodule.setup("fit")
    tokenizer = datamodule.tokenizer.to_dict()
    fingerprint["vocabulary"] = tokenizer_digest(tokenizer)
    check_fingerprint(cfg, run, recorded, fingerprint)
    check_splits(datamodule)
    resume = resume_checkpoint(cfg, run, tokenizer, fingerprinted=recorded is not None)
    progress["resumed_step"] = resume.step if resume else 0
    if rank_zero_only.rank == 0:  # accepted: the run dir now records this command's run
        run.reopen()
        run.save_fingerprint(fingerprint)
        run.save_config(cfg)

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
        for name in (WANDB_ID_FILE, WANDB_STEP_FILE):
            (output_dir / name).unlink(missing_ok=True)
    callbacks = _instantiate_dict(cfg.get("callbacks")) + callbacks_for(sparsity_node(cfg))
    loggers = make_loggers(cfg, output_dir, params, resume)
    wandb = next((lg for lg in loggers if isinstance(lg, WandbLogger)), None)
    callbacks.append(RunInfo(wandb_id=wandb.version if wandb is not None else None))
    trainer: L.Trainer = instantiate(
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
    if trainer.interrupted:  # Ctrl-C: Lightning returns from fit, but the run is not done
        log.warning("interrupted at step %d; the same command resumes it", trainer.global_step)
        raise SystemExit(130)
    last = next((c for c in callbacks if isinstance(c, LastCheckpoint)), None)
    top_k = next((c for c in trainer.checkpoint_callbacks if getattr(c, "monitor", None)), None)
    validate_last_step(trainer, module, datamodule, last, top_k)
    results = {
        "global_step": trainer.global_step,
        "epoch": trainer.current_epoch,
        "params": params,
        # sequences per optimizer step, as trained: micro-batch x accumulation x ranks (= batch_size)
        "global_batch": datamodule.batch_size * trainer.accumulate_grad_batches * trainer.world_size,
        "wall_time_s_this_session": round(time.time() - start, 1),
    }
    if last is not None:
        results["train_time_s"] = round(last.train_time_s, 1)
    best = run.best_verified() if top_k is not None else None
    if best is not None:
        results["best_val_ppl"] = float(best[1])
        results["best_checkpoint"] = str(best[0])
    if SparsityConfig.from_dict(sparsity_node(cfg)).enabled:  # the final weights, before testing the best ones
        results["sparsity"] = sparsity_report(module.model)
    throughput = next((c for c in callbacks if isinstance(c, TokenThroughput)), None)
    if throughput is not None and throughput.tokens_per_s:
        results["train_tokens_per_s"] = round(throughput.tokens_per_s, 1)

    if cfg.test_after_fit:
        metrics = trainer.test(module, datamodule=datamodule, ckpt_path=best[0] if best else None, verbose=False)[0]
        results.update({k.replace("/", "_"): float(v) for k, v in metrics.items()})
    if trainer.is_global_zero:
        run.finish(results)
        log.info("results: %s", json.dumps(results))
    status.record("done", step=trainer.global_step)
    return results


def check_splits(datamodule) -> None:
    """Evaluation splits must hold one window of seq_len; all-<unk> text is scored but worth a warning."""
    unk_id = getattr(datamodule.tokenizer, "unk_id", None)
    for name, split in getattr(datamodule, "splits", {}).items():  # generated tasks (data=synthetic) have none
        if name != "train" and len(split) - 1 < datamodule.seq_len:
            raise DataError(f"data.seq_len={datamodule.seq_len} is longer than the {name} split "
                            f"({datamodule._describe(name)}: {len(split)} tokens). Lower data.seq_len or use a "
                            f"longer {name} file.")
        if name != "train" and unk_id is not None and bool((split.data == unk_id).all()):
            log.warning("every token of the %s split (%s) is <unk>: its text shares no character with the "
                        "training split, so its scores say nothing", name, datamodule._describe(name))


def validate_last_step(trainer: L.Trainer, module, datamodule, last: LastCheckpoint | None, top_k) -> None:
    """The final validation, unless fit already validated the last step: a run killed during it (or one whose
    schedule never validated at its end) is validated now, its top-k and last.ckpt updated, before the test."""
    if last is None or last.validated_step == trainer.global_step or not trainer.limit_val_batches:
        return
    log.info("validating the final step %d", trainer.global_step)
    trainer.validate(module, datamodule=datamodule, verbose=False)
    if top_k is not None:
        # ModelCheckpoint saves only inside fit; this is the save it would have made at the end of fit
        top_k._save_topk_checkpoint(trainer, top_k._monitor_candidates(trainer))
    last.validated_step = trainer.global_step
    last.save(trainer)


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
def hydra_main(cfg: DictConfig) -> float | None:
    multirun = is_multirun()
    try:
        results = train(cfg)
    except Exception as e:
        message = user_error(e)
        if message is None and not multirun:
            raise
        if message is None:
            log.exception("cell %s failed", Path(cfg.paths.output_dir).name)
            message = f"{type(e).__name__}: {e}"
        log.error("%s", message)
        if multirun:  # the other cells go on; the summary at the end lists this one as failed
            print(f"\nssmlm-train: cell {Path(cfg.paths.output_dir).name} failed: {message}", file=sys.stderr)
            return None
        exit_with(message)
    return results.get("best_val_ppl")  # a sweeper can minimise it


def exit_with(message: str) -> None:
    print(f"\nssmlm-train: error: {message}", file=sys.stderr)
    sys.exit(2)


def user_error(error: BaseException) -> str | None:
    """The one-line message of an error the user can fix, found anywhere in its chain of causes: an SsmlmError,
    a write that failed (full disk, no permission), a bad Hydra override or config value, a Trainer argument
    Lightning refuses. None for anything else (a bug: its traceback is shown)."""
    seen, chain = set(), []
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        chain.append(error)
        error = error.__cause__ or error.__context__
    for e in chain:
        if isinstance(e, SsmlmError):
            return str(e)
    for e in chain:
        if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
            return str(write_error(Path(e.filename or "."), e))
    for e in chain:
        if isinstance(e, (HydraException, OmegaConfBaseException, MisconfigurationException)):
            where = f"override {e.override!r}: " if getattr(e, "override", None) else ""  # a malformed override
            return where + " ".join(str(e).split("\n")[0:3]).strip()
    return None


def main() -> None:
    """``ssmlm-train``: Hydra's main, with errors a user can fix printed as one line and exit status 2."""
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra passes exceptions on instead of printing its own traceback
    logging.raiseExceptions = False  # a log line that cannot be written (full disk) must not print a traceback
    try:
        hydra_main()
    except Exception as e:
        message = user_error(e)
        if message is None:
            raise
        exit_with(message)


if __name__ == "__main__":
    main()

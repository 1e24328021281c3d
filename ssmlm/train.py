"""`ssmlm-train`: compose the config, train, test the best checkpoint, write results.json.

    ssmlm-train                                   # quick default run (diag SSM on Hindi characters)
    ssmlm-train experiment=small data=tinystories_bytes
    ssmlm-train -m experiment=tiny,small data.seq_len=128,256

Running the same command again resumes the run from <run dir>/checkpoints/last.ckpt.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from ssmlm import resolvers
from ssmlm.callbacks import AtomicCheckpointIO, TokenThroughput
from ssmlm.errors import CheckpointError, SsmlmError
from ssmlm.lm import LMModule

resolvers.register()
log = logging.getLogger("ssmlm.train")
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def _instantiate_dict(node: DictConfig | None, **kwargs) -> list:
    """Instantiate every non-null entry of a named dict of configs (callbacks, loggers)."""
    return [hydra.utils.instantiate(c, **kwargs) for c in (node or {}).values() if c is not None and "_target_" in c]


def resume_checkpoint(cfg: DictConfig, output_dir: Path, tokenizer: dict | None) -> Path | None:
    """The checkpoint to resume from, after checking it belongs to this run (same model, same vocabulary)."""
    ckpt = output_dir / "checkpoints" / "last.ckpt"
    if not (cfg.resume and ckpt.exists()):
        return None
    try:
        hparams = torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)["hyper_parameters"]
    except Exception as e:  # a torn or foreign file: say which, and how to get past it
        raise CheckpointError(f"cannot read {ckpt} ({type(e).__name__}: {e}). Move it away to start over, or "
                              f"set resume=false.") from e
    if cfg.force_resume:
        return ckpt
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    if hparams.get("model_cfg") != model_cfg:
        raise CheckpointError(
            f"{ckpt} was trained with a different model config:\n  checkpoint: {hparams.get('model_cfg')}\n"
            f"  this run:   {model_cfg}\nUse another run dir (hydra.run.dir=...) or force_resume=true.")
    if tokenizer is not None and hparams.get("tokenizer") not in (None, tokenizer):
        raise CheckpointError(
            f"{ckpt} was trained with a different vocabulary than {cfg.data.get('vocab_path') or 'the data'} "
            f"builds now. Point data.vocab_path at the run's vocab.json or use another run dir.")
    return ckpt


def train(cfg: DictConfig) -> dict:
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    done = output_dir / "DONE"
    if cfg.resume and done.exists() and (output_dir / "results.json").exists():
        log.info("%s is complete (DONE); skipping. Delete DONE or set resume=false to train again.", output_dir)
        return json.loads((output_dir / "results.json").read_text())
    L.seed_everything(cfg.seed, workers=True)

    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    tokenizer = datamodule.tokenizer.to_dict()
    ckpt_path = resume_checkpoint(cfg, output_dir, tokenizer)

    module = LMModule(
        model_cfg=OmegaConf.to_container(cfg.model, resolve=True),
        vocab_size=datamodule.vocab_size,
        optim=OmegaConf.to_container(cfg.optim, resolve=True),
        tokenizer=tokenizer,
        compile=bool(cfg.compile),
    )
    params = module.model.num_params()
    log.info("model %s: %.3fM parameters; run dir %s", cfg.model._target_, params / 1e6, output_dir)

    callbacks = _instantiate_dict(cfg.get("callbacks"))
    loggers = _instantiate_dict(cfg.get("logger"))
    for lg in loggers:
        if isinstance(lg, L.pytorch.loggers.WandbLogger):
            lg.experiment.config.update(
                {"params": params, **OmegaConf.to_container(cfg, resolve=True)}, allow_val_change=True)
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers, plugins=[AtomicCheckpointIO()])

    if ckpt_path:
        log.info("resuming from %s", ckpt_path)
    start = time.time()
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    results = {
        "global_step": trainer.global_step,
        "epoch": trainer.current_epoch,
        "params": params,
        "wall_time_s_this_session": round(time.time() - start, 1),
    }
    ckpt_cb = trainer.checkpoint_callback
    if ckpt_cb is not None and ckpt_cb.best_model_score is not None:
        results["best_val_ppl"] = float(ckpt_cb.best_model_score)
        results["best_checkpoint"] = str(ckpt_cb.best_model_path)
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
    return results


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    try:
        results = train(cfg)
    except SsmlmError as e:
        log.error("%s", e)
        print(f"\nssmlm-train: error: {e}", file=sys.stderr)
        sys.exit(2)
    return results.get("best_val_ppl")  # a sweeper can minimise it


if __name__ == "__main__":
    main()

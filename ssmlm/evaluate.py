"""`ssmlm-eval`: score a run's checkpoint(s) on a whole split, written to ``<run>/eval/<name>.json``.

    ssmlm-eval run_dir=RUN                         # best checkpoint on the test split
    ssmlm-eval run_dir=RUN split=val ckpt=last
    ssmlm-eval run_dir=RUN ensemble=5              # average the predicted probabilities of the 5 best
    ssmlm-eval run_dir=RUN average=5               # average the weights of the 5 best (checkpoints/averaged-top5.ckpt)
    ssmlm-eval run_dir=RUN data.test_path=other.txt  # another text file, with the run's vocabulary
    ssmlm-eval run_dir=RUN plots=true              # also redraw <run>/curves.png

"Best" is by the validation perplexity ModelCheckpoint recorded. Metrics: loss (nats/token), perplexity,
bits per token (per character or per byte, by the vocabulary's unit) and next-token accuracy, summed over
every target of the split exactly once (the data module's evaluation windows), in float64.
Keys and defaults: conf/eval.yaml.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import hydra
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from ssmlm.errors import ConfigError, SsmlmError
from ssmlm.lm import IGNORE_INDEX
from ssmlm.run_dir import (VOCAB_FILE, RunDir, average_checkpoints, build_model, pick_device, read_checkpoint,
                           tool_config, write_json)

SPLIT_STAGES = {"val": "validate", "test": "test"}


class Score:
    """Running sums of one predictor's negative log-likelihood and top-1 hits."""

    def __init__(self):
        self.nll, self.correct, self.tokens = 0.0, 0, 0

    def update(self, log_probs: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> None:
        picked = log_probs.gather(-1, targets.clamp_min(0)[..., None])[..., 0]
        self.nll -= picked[mask].double().sum().item()
        self.correct += (log_probs.argmax(-1) == targets)[mask].sum().item()
        self.tokens += int(mask.sum())

    def metrics(self, unit: str) -> dict[str, float]:
        loss = self.nll / self.tokens
        return {"loss": loss, "ppl": math.exp(loss), f"bits_per_{unit}": loss / math.log(2),
                "acc": self.correct / self.tokens, "tokens": self.tokens}


@torch.inference_mode()
def score(models: list, loader, device: torch.device, unit: str) -> tuple[dict, list[dict]]:
    """Metrics of the ensemble of ``models`` (mean of their probabilities) and of each model alone."""
    ensemble, members = Score(), [Score() for _ in models]
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        mask = y != IGNORE_INDEX
        mixture = None
        for model, member in zip(models, members):
            log_probs = F.log_softmax(model(x).float(), dim=-1)
            member.update(log_probs, y, mask)
            mixture = log_probs if mixture is None else torch.logaddexp(mixture, log_probs)
        ensemble.update(mixture - math.log(len(models)), y, mask)
    return ensemble.metrics(unit), [m.metrics(unit) for m in members]


def build_datamodule(run: RunDir, cfg, tokenizer):
    """The run's data module (its config, this machine's paths), with the run's own vocabulary and any
    ``data.*`` overrides from the command line."""
    run_cfg = run.config()
    vocab_path = run.path / VOCAB_FILE
    if not vocab_path.exists():  # the checkpoint's vocabulary, so the data module does not build a new one
        vocab_path = write_json(run.path / "eval" / VOCAB_FILE, tokenizer.to_dict())
    OmegaConf.update(run_cfg, "data.vocab_path", str(vocab_path), force_add=True)
    OmegaConf.update(run_cfg, "data.progress", False, force_add=True)
    for key, value in (cfg.get("data") or {}).items():
        OmegaConf.update(run_cfg, f"data.{key}", value, force_add=True)
    try:
        datamodule = hydra.utils.instantiate(run_cfg.data)
    except hydra.errors.InstantiationException as e:
        if isinstance(e.__cause__, SsmlmError):
            raise e.__cause__ from None
        raise ConfigError(f"cannot build the run's data module from {run.path}/.hydra/config.yaml: {e}") from e
    datamodule.prepare_data()
    datamodule.setup(SPLIT_STAGES[cfg.split])
    if datamodule.tokenizer != tokenizer:
        raise ConfigError(f"the data module built a different vocabulary than the run's ({vocab_path}); "
                          f"do not override data.vocab_path")
    return datamodule


def result_name(cfg, ckpt_label: str) -> str:
    if cfg.name:
        return str(cfg.name)
    test_path = (cfg.get("data") or {}).get("test_path")
    split = Path(str(test_path)).stem if cfg.split == "test" and test_path else cfg.split
    return f"{split}-{ckpt_label}"


def evaluate(cfg) -> dict:
    """Runs ``ssmlm-eval`` for a config from conf/eval.yaml; returns what it writes to the JSON file."""
    if not cfg.run_dir:
        raise ConfigError("pass run_dir=<directory of a training run> (e.g. outputs/runs/default)")
    if cfg.split not in SPLIT_STAGES:
        raise ConfigError(f"split={cfg.split}: use val or test (data.test_path=<file> scores another text file)")
    ensemble, average = int(cfg.ensemble or 0), int(cfg.average or 0)
    if ensemble and average:
        raise ConfigError("pass ensemble=K or average=K, not both")
    run = RunDir(cfg.run_dir)
    device = pick_device(str(cfg.device))

    if ensemble or average:
        top = run.top_checkpoints(ensemble or average)
        member_paths, val_scores = [path for path, _ in top], [val for _, val in top]
    else:
        member_paths, val_scores = [run.checkpoint(cfg.ckpt)], [None]
    checkpoints = [read_checkpoint(p) for p in member_paths]
    tokenizer = run.tokenizer(checkpoints[0])
    datamodule = build_datamodule(run, cfg, tokenizer)
    loader = datamodule.val_dataloader() if cfg.split == "val" else datamodule.test_dataloader()

    members = [build_model(c, device, p) for c, p in zip(checkpoints, member_paths)]
    if average:
        averaged_path = average_checkpoints(member_paths, run.checkpoint_dir / f"averaged-top{average}.ckpt")
        averaged = build_model(read_checkpoint(averaged_path), device, averaged_path)
        models = [averaged, *members] if cfg.members else [averaged]
        per_model = score(models, loader, device, tokenizer.unit)[1]
        metrics, member_metrics, label = per_model[0], per_model[1:], f"average-top{average}"
    elif ensemble:
        metrics, member_metrics = score(members, loader, device, tokenizer.unit)
        label = f"ensemble-top{ensemble}"
    else:
        metrics, member_metrics = score(members, loader, device, tokenizer.unit)[0], []
        label = str(cfg.ckpt) if cfg.ckpt in ("best", "last") else member_paths[0].stem
    data_file = datamodule.paths[cfg.split]
    result = {
        "run_dir": str(run.path),
        "split": cfg.split,
        "data_file": str(data_file) if data_file else f"carved from {datamodule.paths['train']}",
        "method": "average" if average else "ensemble" if ensemble else "single",
        "checkpoints": [p.name for p in member_paths],
        "unit": tokenizer.unit,
        **metrics,
        "bpt": metrics["loss"] / math.log(2),
    }
    if average:
        result["averaged_checkpoint"] = str(averaged_path)
    unk_id = getattr(tokenizer, "unk_id", None)
    if unk_id is not None:
        data = datamodule.splits[cfg.split].data
        result["unk_tokens"] = int((data == unk_id).sum())
        if result["unk_tokens"] == len(data):
            result["warning"] = (f"every token of {result['data_file']} is <unk>: its text shares no character with "
                                 f"the run's training data, so these scores say nothing about the model")
            print(f"ssmlm-eval: warning: {result['warning']}", file=sys.stderr)
    if member_metrics:
        result["members"] = [{"checkpoint": p.name, "val_score": v, **m}
                             for p, v, m in zip(member_paths, val_scores, member_metrics)]

    out = write_json(run.path / "eval" / f"{result_name(cfg, label)}.json", result)
    result["output"] = str(out)
    if cfg.plots:
        from ssmlm.plots import plot_run_curves

        result["curves"] = str(plot_run_curves(run.path))
    return result


def main(argv: list[str] | None = None) -> None:
    try:
        result = evaluate(tool_config("eval", sys.argv[1:] if argv is None else argv, open_keys=("data",)))
    except SsmlmError as e:
        print(f"ssmlm-eval: error: {e}", file=sys.stderr)
        sys.exit(2)
    unit = result["unit"]
    print(f"{result['method']} {', '.join(result['checkpoints'])} on {result['split']} ({result['data_file']}): "
          f"loss {result['loss']:.4f}  ppl {result['ppl']:.4f}  bits/{unit} {result[f'bits_per_{unit}']:.4f}  "
          f"acc {result['acc']:.4f}  ({result['tokens']} tokens)")
    for m in result.get("members", []):
        print(f"  member {m['checkpoint']}: loss {m['loss']:.4f}  ppl {m['ppl']:.4f}  acc {m['acc']:.4f}")
    print(f"written to {result['output']}" + (f"; curves: {result['curves']}" if "curves" in result else ""))


if __name__ == "__main__":
    main()

"""The one LightningModule: next-token cross-entropy for any ``LanguageModel``.

Metrics (torchmetrics): ``{split}/loss`` (nats/token), ``{split}/ppl``, ``{split}/bpt`` (bits per token: per
character or per byte), ``{split}/acc`` (next-token top-1). Padding targets are -100 and ignored.
"""

from __future__ import annotations

import math
from typing import Any

import hydra
import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics
from torchmetrics.text import Perplexity

from ssmlm.errors import ConfigError, number
from ssmlm.models.base import LanguageModel
from ssmlm.sparsity import attach_masks

IGNORE_INDEX = -100


def build_param_groups(model: torch.nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay matrices only, never biases/norm scales; parameters' ``_optim`` hints override
    (``weight_decay``, an absolute ``lr``, or ``lr_scale`` times the global lr)."""
    groups: dict[tuple, list] = {}
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        hints = dict(getattr(p, "_optim", {}))
        wd = hints.get("weight_decay", weight_decay if p.ndim >= 2 else 0.0)
        group_lr = hints.get("lr") or lr * hints.get("lr_scale", 1.0)
        groups.setdefault((wd, group_lr), []).append(p)
    return [{"params": ps, "weight_decay": wd, "lr": glr} for (wd, glr), ps in groups.items()]


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup to 1, then cosine decay to ``min_ratio`` at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class SplitMetrics(torch.nn.Module):
    def __init__(self, vocab_size: int):
        super().__init__()
        self.loss = torchmetrics.MeanMetric()
        self.ppl = Perplexity(ignore_index=IGNORE_INDEX)
        self.acc = torchmetrics.classification.MulticlassAccuracy(
            num_classes=vocab_size, ignore_index=IGNORE_INDEX, average="micro")


def check_optim(o: dict) -> None:
    """The optim.* numbers configure_optimizers reads: a bad one is one ConfigError naming the key."""
    number("optim.lr", o.get("lr"), above=0)
    number("optim.weight_decay", o.get("weight_decay"), minimum=0)
    number("optim.warmup_steps", o.get("warmup_steps", 0), minimum=0, integer=True)
    number("optim.min_lr_ratio", o.get("min_lr_ratio", 0.0), minimum=0, maximum=1)
    number("optim.gradient_clip_val", o.get("gradient_clip_val"), minimum=0, optional=True)
    betas = o.get("betas", (0.9, 0.999))
    if not isinstance(betas, (list, tuple)) or len(betas) != 2:
        raise ConfigError(f"optim.betas={betas!r}: expected two numbers in [0, 1), e.g. optim.betas=[0.9,0.999]")
    for beta in betas:
        number("optim.betas", beta, minimum=0, maximum=0.999999)


class LMModule(L.LightningModule):
    """Wraps a model built from its config, so a checkpoint alone rebuilds it (``load_from_checkpoint``), with
    the masks of its ``sparsity`` config (ssmlm.sparsity) as buffers for the checkpoint's masks to load into."""

    def __init__(self, model_cfg: dict, vocab_size: int, optim: dict, tokenizer: dict | None = None,
                 compile: bool = False, sparsity: dict | None = None):
        super().__init__()
        check_optim(optim)
        self.save_hyperparameters()
        self.model: LanguageModel = hydra.utils.instantiate(model_cfg, vocab_size=vocab_size)
        if not self.model.causal:  # next-token prediction is trivial for a model that sees the next token
            raise ConfigError(f"model {model_cfg.get('_target_')} is bidirectional: a language model must be causal; "
                              "set model.bidirectional=false (and model.causal=true)")
        attach_masks(self.model, sparsity)
        self.compile_model = compile
        self.metrics = torch.nn.ModuleDict({s: SplitMetrics(vocab_size) for s in ("val", "test")})

    def configure_model(self) -> None:
        if self.compile_model and not isinstance(self.model.forward, torch._dynamo.eval_frame.OptimizedModule):
            self.model = torch.compile(self.model)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens)

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.model(x)
        loss = self._loss(logits, y)
        with torch.no_grad():
            mask = y != IGNORE_INDEX
            acc = (logits.argmax(-1)[mask] == y[mask]).float().mean()
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/ppl", loss.detach().exp())
        self.log("train/bpt", loss.detach() / math.log(2))
        self.log("train/acc", acc)
        return loss

    def _eval_step(self, batch, split: str):
        x, y = batch
        logits = self.model(x).float()
        loss = self._loss(logits, y)
        n_tokens = (y != IGNORE_INDEX).sum()
        m = self.metrics[split]
        m.loss.update(loss, weight=n_tokens)
        m.ppl.update(logits, y)
        m.acc.update(logits.flatten(0, 1), y.flatten())

    def _log_eval(self, split: str):
        m = self.metrics[split]
        loss = m.loss.compute()
        self.log_dict({f"{split}/loss": loss, f"{split}/ppl": m.ppl.compute(), f"{split}/bpt": loss / math.log(2),
                       f"{split}/acc": m.acc.compute()}, prog_bar=(split == "val"), sync_dist=False)
        for metric in (m.loss, m.ppl, m.acc):
            metric.reset()

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self):
        self._log_eval("val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test")

    def on_test_epoch_end(self):
        self._log_eval("test")

    def configure_optimizers(self):
        o = self.hparams.optim
        groups = build_param_groups(self.model, o["lr"], o["weight_decay"])
        optimizer = torch.optim.AdamW(groups, lr=o["lr"], betas=tuple(o.get("betas", (0.9, 0.999))))
        total = int(self.trainer.estimated_stepping_batches)
        warmup = min(int(o.get("warmup_steps", 0)), max(0, total // 10)) if total > 0 else 0
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: warmup_cosine(s, warmup, total, float(o.get("min_lr_ratio", 0.0))))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

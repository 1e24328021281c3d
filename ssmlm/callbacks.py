"""Lightning plug-ins of the project: atomic checkpoints, RNG state in checkpoints, throughput, run artefacts."""

from __future__ import annotations

import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins import TorchCheckpointIO


_UMASK = os.umask(0)
os.umask(_UMASK)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file beside it, fsyncs, then renames over the target.

    A kill during the save leaves the previous checkpoint intact (plus a stray ``.tmp`` that the next save
    replaces), never a truncated ``last.ckpt``.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the usual permissions
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


class RNGStateCallback(L.Callback):
    """Saves the Python, NumPy and torch RNG states with each checkpoint and restores them on resume."""

    def state_dict(self) -> dict[str, Any]:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        # tensors and plain numbers only, so checkpoints load with torch.load(weights_only=True)
        state = {"python": random.getstate(), "torch": torch.get_rng_state(),
                 "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        random.setstate(state_dict["python"])
        kind, keys, pos, has_gauss, cached = state_dict["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(state_dict["torch"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])


class TokenThroughput(L.Callback):
    """Logs training tokens per second (all devices), measured between batch starts, excluding validation."""

    def __init__(self) -> None:
        self.tokens = 0
        self.seconds = 0.0
        self._t0: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._t0 is None:
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        dt = time.perf_counter() - self._t0
        n = batch[0].numel() * trainer.world_size
        # the first batches include compilation and allocator warm-up: leave them out of the average
        if trainer.global_step >= 3:
            self.tokens += n
            self.seconds += dt
        pl_module.log("train/tokens_per_s", n / max(dt, 1e-9), on_step=True, on_epoch=False)

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens / self.seconds if self.seconds > 0 else None


class RunArtifacts(L.Callback):
    """At the end of fit, draws the training curves from the run's metrics CSV into ``curves.png``."""

    def __init__(self, output_dir: str) -> None:
        self.output_dir = Path(output_dir)

    def on_fit_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            from ssmlm.plots import plot_run_curves

            plot_run_curves(self.output_dir)

"""Lightning plug-ins of the project: verified atomic checkpoints, the resumable ``last.ckpt``, RNG state in
checkpoints, a guard against a non-finite loss, throughput, text samples, run artefacts, and loggers whose history
survives restarts of a run. Every file goes through the run dir's owner (:mod:`ssmlm.run_dir`)."""

from __future__ import annotations

import csv
import io
import logging
import random
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.apply_func import convert_tensors_to_scalars
from lightning.fabric.utilities.logger import _add_prefix
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from ssmlm import run_dir, slurm
from ssmlm.errors import ConfigError, TrainingDiverged, number
from ssmlm.generate import Decoder, encode_prompt, never_sampled, room_for
from ssmlm.sampling import Sampling

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O through the run dir's owner: each checkpoint is written atomically (a kill leaves
    the previous file intact, never a torn one) with its digest beside it; each load checks the digest and the
    weights first (:func:`ssmlm.run_dir.read_checkpoint`), so a damaged file is never resumed from or tested."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        run_dir.save_checkpoint(checkpoint, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        return run_dir.read_checkpoint(Path(path))

    def remove_checkpoint(self, path) -> None:
        run_dir.remove_checkpoint(path)


class RNGStateCallback(L.Callback):
    """Saves the Python, NumPy and torch RNG states with each checkpoint and restores them on resume, right before
    the first training batch: what Lightning does in between (the sanity check, creating the loaders' iterators,
    which draw a seed from torch's RNG) must not shift dropout's draws from those of an uninterrupted run."""

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        if self._pending is not None:  # saved before training went on: the state it resumed with is still due
            return self._pending
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        # tensors and plain numbers only, so checkpoints load with torch.load(weights_only=True)
        state = {"python": random.getstate(), "torch": torch.get_rng_state(),
                 "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._pending is None:
            return
        self._restore(self._pending)
        self._pending = None
        loader = trainer.train_dataloader
        if batch_idx == 0 and trainer.current_epoch > 0 and getattr(loader, "generator", 0) is None:
            # resumed at an epoch boundary: an uninterrupted run created this epoch's loader iterator after the
            # checkpoint, which drew its base seed from torch's RNG (torch.utils.data's _BaseDataLoaderIter)
            torch.empty((), dtype=torch.int64).random_()

    @staticmethod
    def _restore(state_dict: dict[str, Any]) -> None:
        random.setstate(state_dict["python"])
        kind, keys, pos, has_gauss, cached = state_dict["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(state_dict["torch"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])


class TokenThroughput(L.Callback):
    """Training tokens per second (all ranks), from the wall time between consecutive training-batch starts.

    That interval holds everything a step costs (data loading, forward, backward, optimizer, logging) without a
    device sync per step; intervals that contain a validation or an epoch boundary are left out, and so are the
    first steps (compilation, allocator warm-up).
    """

    warmup_steps = 3

    def __init__(self) -> None:
        self.tokens = 0
        self.seconds = 0.0
        self._last: tuple[float, int] | None = None  # (start time, tokens) of the batch in flight

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        now = time.perf_counter()
        if self._last is not None:
            started, n = self._last
            dt = now - started
            if trainer.global_step >= self.warmup_steps:
                self.tokens += n
                self.seconds += dt
            pl_module.log("train/tokens_per_s", n / max(dt, 1e-9), on_step=True, on_epoch=False)
        self._last = (now, batch[0].numel() * trainer.world_size)

    def _interrupt(self, *args) -> None:
        self._last = None

    on_validation_start = on_train_epoch_end = _interrupt

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


class LastCheckpoint(Checkpoint):
    """Keeps ``last.ckpt``, the state a restarted run resumes from; needs no metric, unlike ModelCheckpoint.

    Saved every ``every_n_train_steps`` optimizer steps and/or ``every_n_minutes`` minutes of training, after each
    validation (after the top-k ModelCheckpoint, so their scores travel with it), at the end of training, and when
    the job is told to stop (SIGTERM, or SLURM's pre-timeout signal under submitit: see :mod:`ssmlm.slurm`), always
    at an optimizer-step boundary. The previous one is kept as ``last.prev.ckpt``, the fallback should the newest
    ever be unreadable (only a verified last.ckpt replaces it: :func:`ssmlm.run_dir.rotate_last`). Also records the
    training time of the run so far, across restarts, and the last step validated in fit (``validated_step``:
    a run whose final step was never validated is validated before it is tested).

    Lightning logs a step's metrics row just after the ``on_train_batch_end`` hooks that save this checkpoint, so
    a kill in between would lose that row: the checkpoint carries it (``pending_row``), and the resumed run logs it
    to each logger that lacks it (``ResumableCSVLogger``: unless the row is there; wandb: unless that step was sent).
    """

    FILE, PREVIOUS = run_dir.LAST, run_dir.PREVIOUS

    def __init__(self, dirpath: str, every_n_train_steps: int | None = None, every_n_minutes: float | None = None):
        self.dirpath = Path(dirpath)
        self.every_n_train_steps = number("callbacks.last_checkpoint.every_n_train_steps", every_n_train_steps,
                                          minimum=1, integer=True, optional=True) or 0
        self.every_n_seconds = number("callbacks.last_checkpoint.every_n_minutes", every_n_minutes, above=0,
                                      optional=True) or 0.0
        self.every_n_seconds *= 60
        self.validated_step = -1
        self.stop_signal = slurm.StopSignal()
        self.train_time_before = 0.0  # seconds trained by earlier sessions, restored from the checkpoint
        self._session_start = time.monotonic()
        self._last_save_time = time.monotonic()
        self._saved_step = -1
        self._seen_step = -1
        self._pending_row: dict | None = None  # what save() stores: the row Lightning logs just after it
        self._restored_row: dict | None = None  # the checkpoint's: logged again on resume where it is missing

    @property
    def path(self) -> Path:
        return self.dirpath / self.FILE

    @property
    def train_time_s(self) -> float:
        return self.train_time_before + time.monotonic() - self._session_start

    def state_dict(self) -> dict[str, Any]:
        return {"train_time_s": self.train_time_s, "validated_step": self.validated_step,
                "pending_row": self._pending_row}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.train_time_before = float(state_dict.get("train_time_s", 0.0))
        self.validated_step = int(state_dict.get("validated_step", -1))
        self._restored_row = state_dict.get("pending_row")
        self._session_start = time.monotonic()

    def on_train_start(self, trainer, pl_module):
        self._seen_step = self._saved_step = trainer.global_step
        self._last_save_time = time.monotonic()
        self.stop_signal.install()  # after Lightning's own handlers, which it installs before training starts
        if self._restored_row is not None:
            step, metrics = int(self._restored_row["step"]), dict(self._restored_row["metrics"])
            for logger in trainer.loggers:
                if isinstance(logger, ResumableCSVLogger) and logger.has_row(step, metrics):
                    continue  # the killed session wrote it after all
                logger.log_metrics(metrics, step=step)
                logger.save()
            self._restored_row = None

    @staticmethod
    def _row_logged_after_this_hook(trainer) -> dict | None:
        """The step's metrics row exactly as Lightning's logger connector logs it once the on_train_batch_end
        hooks return (the same metrics, ``epoch`` added, at step ``_batches_that_stepped``), or None when this
        step logs no row (``trainer.log_every_n_steps``). A stop signal's save never gets there (the process
        leaves from this hook), so its step's row, if one is due, comes back only this way."""
        try:  # Lightning's private logger connector: another Lightning version may lack it
            connector = trainer._logger_connector
            if not trainer.loggers or not connector.should_update_logs:
                return None
            metrics = convert_tensors_to_scalars(connector.metrics["log"])
            step = trainer.fit_loop.epoch_loop._batches_that_stepped
        except (AttributeError, KeyError) as e:
            log.warning("cannot keep this step's metrics row in the checkpoint with this Lightning version (%s): "
                        "a kill right after this checkpoint may lose that one row", e)
            return None
        if not metrics:
            return None
        metrics.setdefault("epoch", trainer.current_epoch)
        return {"step": step, "metrics": metrics}

    def on_train_end(self, trainer, pl_module):
        if trainer.global_step != self._saved_step:
            self.save(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self._seen_step:
            return  # mid-way through gradient accumulation: not a step boundary
        self._seen_step = trainer.global_step
        due = self.every_n_train_steps and trainer.global_step % self.every_n_train_steps == 0
        due = due or (self.every_n_seconds and time.monotonic() - self._last_save_time >= self.every_n_seconds)
        asked = self.stop_signal.asked
        if trainer.world_size > 1:  # ranks agree on the strongest request of any rank and on rank 0's clock:
            # saving is collective, and a signal reaches the ranks at slightly different times
            local = torch.tensor([asked, bool(due and trainer.is_global_zero)], dtype=torch.float32,
                                 device=pl_module.device)
            asked, due = (int(v) for v in trainer.strategy.reduce(local, reduce_op="max").tolist())
        if asked or due:
            self.save(trainer, row=self._row_logged_after_this_hook(trainer))
        if asked:
            self.stop_signal.stop(asked)

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self.validated_step = trainer.global_step
            self.save(trainer)

    def save(self, trainer, row: dict | None = None) -> None:
        """Saves last.ckpt; ``row``: the metrics row not yet logged at this moment (None: all rows are logged)."""
        # a second save at the same step (after a validation) replaces last.ckpt: last.prev.ckpt stays an
        # earlier step, a fallback that differs from last.ckpt
        if trainer.is_global_zero and trainer.global_step != self._saved_step:
            run_dir.rotate_last(self.dirpath)
        self._pending_row = row
        trainer.save_checkpoint(self.path, weights_only=False)
        self._pending_row = None
        self._saved_step, self._last_save_time = trainer.global_step, time.monotonic()


class NonFiniteLossGuard(L.Callback):
    """A training loss that is NaN or infinite never trains on. ``policy=stop`` (default) stops the run before
    that optimizer step, with a message naming the step: the weights and every checkpoint stay finite.
    ``policy=skip`` drops that optimizer step (its gradients are discarded, so AdamW leaves the weights and its
    moments alone) and stops after ``max_skips`` such steps in a row."""

    POLICIES = ("stop", "skip")

    def __init__(self, policy: str = "stop", max_skips: int = 10) -> None:
        if policy not in self.POLICIES:
            raise ConfigError(f"callbacks.nonfinite_loss.policy={policy!r}: use one of {', '.join(self.POLICIES)}")
        self.policy = policy
        self.max_skips = number("callbacks.nonfinite_loss.max_skips", max_skips, minimum=1, integer=True)
        self.skipped_in_a_row = 0
        self._drop_step = False

    def on_before_backward(self, trainer, pl_module, loss):
        if bool(torch.isfinite(loss.detach()).all()):
            return
        step = trainer.global_step + 1
        if self.policy == "skip" and self.skipped_in_a_row < self.max_skips:
            if not self._drop_step:
                self.skipped_in_a_row += 1
                log.warning("training loss %s at step %d: that optimizer step is skipped (%d in a row, at most %d)",
                            float(loss), step, self.skipped_in_a_row, self.max_skips)
            self._drop_step = True
            return
        skipped = f" after {self.skipped_in_a_row} skipped steps in a row" if self.policy == "skip" else ""
        raise TrainingDiverged(
            f"the training loss is {float(loss)} at step {step}{skipped}: training stopped before that step, so the "
            f"weights and checkpoints stay finite. Lower optim.lr or raise optim.warmup_steps (or set "
            f"callbacks.nonfinite_loss.policy=skip), then run the same command again: it resumes from the last "
            f"checkpoint.")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self._drop_step:
            optimizer.zero_grad(set_to_none=True)  # no gradient: AdamW skips the parameters entirely
            self._drop_step = False
        else:
            self.skipped_in_a_row = 0


class RunInfo(L.Callback):
    """Stores facts about the run (e.g. its wandb id) in every checkpoint, as ``checkpoint["ssmlm"]``."""

    def __init__(self, **info: Any) -> None:
        self.info = info

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        checkpoint["ssmlm"] = dict(self.info)


class TextSamples(L.Callback):
    """After each validation, continues a fixed prompt (greedy and sampled) and logs the text: to the run's log
    and, when wandb is on, as a ``samples`` table. The prompt defaults to the first tokens of the validation split;
    a seeded generator keeps the samples comparable across validations and leaves the training RNG untouched."""

    def __init__(self, prompt: str | None = None, prompt_tokens: int = 24, max_new_tokens: int = 100,
                 temperatures: tuple[float, ...] = (0.0, 0.8), seed: int = 0) -> None:
        self.prompt, self.prompt_tokens, self.max_new_tokens = prompt, prompt_tokens, max_new_tokens
        self.temperatures, self.seed = tuple(temperatures), seed

    def _prompt_ids(self, datamodule) -> list[int]:
        if self.prompt is not None:
            return encode_prompt(datamodule.tokenizer, self.prompt, allow_unk=True)
        val = datamodule.splits.get("val")
        return [int(t) for t in val.data[: self.prompt_tokens]] if val is not None else encode_prompt(
            datamodule.tokenizer, "", allow_unk=True)

    @rank_zero_only
    def on_validation_end(self, trainer, pl_module):
        datamodule = trainer.datamodule
        if trainer.sanity_checking or datamodule is None or getattr(datamodule, "tokenizer", None) is None:
            return
        model = getattr(pl_module.model, "_orig_mod", pl_module.model)
        was_training = model.training
        tokenizer = datamodule.tokenizer
        ids = self._prompt_ids(datamodule)
        prompt = torch.tensor([ids], dtype=torch.long, device=pl_module.device)
        max_new_tokens = room_for(model, len(ids), self.max_new_tokens)
        rows = []
        try:
            decoder = Decoder(model, banned=never_sampled(tokenizer))
            logits, state = decoder.prefill(prompt)
            for temperature in self.temperatures:
                generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)
                tokens = decoder.tokens(logits, state, max_new_tokens, Sampling(temperature=temperature),
                                        generator)
                text = tokenizer.decode(int(t[0]) for t in tokens)
                rows.append([trainer.global_step, temperature, tokenizer.decode(ids), text])
        finally:
            model.train(was_training)
        for step, temperature, prompt_text, text in rows:
            log.info("sample at step %d, temperature %g: %r -> %r", step, temperature, prompt_text, text)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_text(key="samples", columns=["step", "temperature", "prompt", "sample"], data=rows,
                                step=trainer.global_step)


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing metrics.csv; this one appends to it (a resumed run)."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = sorted(next(csv.reader(f), []))


class ResumableCSVLogger(CSVLogger):
    """CSVLogger whose metrics.csv keeps the history of earlier sessions of the run (Lightning's starts the
    file over); on resume, :meth:`truncate` drops the rows the resumed run is about to log again."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment

    @rank_zero_only
    def truncate(self, from_step: int) -> None:
        """Drops the rows logged at step ``from_step`` or later: a session that died after its last checkpoint
        logged them, and the run resumed from that checkpoint logs them again."""
        path = Path(self.log_dir) / ExperimentWriter.NAME_METRICS_FILE
        if not path.exists():
            return
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header, rows = reader.fieldnames or [], list(reader)
        kept = [r for r in rows if not r.get("step") or int(float(r["step"])) < from_step]
        if len(kept) == len(rows):
            return

        def write(f) -> None:
            text = io.TextIOWrapper(f, newline="", encoding="utf-8")
            writer = csv.DictWriter(text, fieldnames=header)
            writer.writeheader()
            writer.writerows(kept)
            text.flush()
            text.detach()

        run_dir.atomic_write(path, write)

    @rank_zero_only
    def has_row(self, step: int, metrics: dict[str, Any]) -> bool:
        """Whether metrics.csv holds a row at ``step`` with any of the keys of ``metrics``."""
        path = Path(self.log_dir) / ExperimentWriter.NAME_METRICS_FILE
        if not path.exists():
            return False
        with open(path, newline="") as f:
            return any(r.get("step") and int(float(r["step"])) == step and any(r.get(k) not in (None, "")
                                                                              for k in metrics)
                       for r in csv.DictReader(f))


class ResumableWandbLogger(WandbLogger):
    """WandbLogger whose history continues across restarts of a run, never logging a step twice or backwards.

    The run id is created once and kept in the run dir (``${ssmlm.wandb_id:...}``); every restart resumes that run.
    Each row is logged at wandb step = the trainer's global step (also the x-axis, ``trainer/global_step``), so
    sessions line up. A session killed after its last checkpoint may have logged steps the resumed run is about
    to redo: the highest step ever sent is kept in ``step_file`` (written before the row is sent), and rows at or
    below it are dropped until training passes it. This works offline too, where wandb itself cannot know what an
    earlier session logged.

    SLURM's SIGTERM (preemption, requeue) reaches the wandb service process too, which exits at once: the rows
    of the last ``flush_interval_s`` seconds are lost with it (1 s here; wandb's default is 15 s), and the rest of
    the session goes to the CSV only instead of failing the run. The restarted run resumes logging to wandb.
    """

    def __init__(self, *args: Any, step_file: str, flush_interval_s: float = 1.0, **kwargs: Any) -> None:
        settings = dict(kwargs.pop("settings", None) or {}, x_transaction_log_flush_interval=flush_interval_s)
        super().__init__(*args, settings=settings, **kwargs)
        self.step_file = Path(step_file)
        try:
            self.logged_before = int(self.step_file.read_text().strip())
        except (OSError, ValueError):
            self.logged_before = -1  # no earlier session
        self._highest = self.logged_before
        self._service_lost = False

    @rank_zero_only
    def log_metrics(self, metrics, step: int | None = None) -> None:
        if self._service_lost:
            return
        if step is None:
            return super().log_metrics(metrics, step)
        if step <= self.logged_before:
            return
        if step > self._highest:
            run_dir.atomic_write(self.step_file, f"{step}\n")
            self._highest = step
        metrics = _add_prefix(metrics, self._prefix, self.LOGGER_JOIN_CHAR)
        try:
            self.experiment.log({**metrics, "trainer/global_step": step}, step=step)
        except OSError as e:  # the wandb service process is gone (e.g. SIGTERM): keep training, log to CSV
            self._service_lost = True
            log.warning("wandb stopped taking rows at step %d (%s: %s); the rest of this session is in the CSV "
                        "only, the restarted run logs to the same wandb run again", step, type(e).__name__, e)

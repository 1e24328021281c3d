"""The run directory and its one owner: every file a run keeps is named, written and read here.

A run dir, as ``ssmlm-train`` writes it::

    .hydra/                       Hydra's composed config and overrides of the latest launch
    config.yaml                   the config the run was accepted with (what ssmlm-eval/-generate rebuild from)
    fingerprint.json              what defines the run: model/data config, vocabulary, training data size + digest
    run.lock                      held (fcntl) by the process training the run; records host, PID, start time
    status.json                   started / resumed / stopped / failed / done, with a history (ssmlm.sweep)
    vocab.json                    the vocabulary (character runs)
    checkpoints/last.ckpt         the latest state; last.prev.ckpt the one before it
    checkpoints/epoch*-step*-ppl*.ckpt   the top-k checkpoints by validation perplexity
    checkpoints/<name>.sha256     the digest written with each checkpoint, checked before it is ever loaded
    checkpoints/<name>.unreadable a checkpoint that failed its check, kept aside for inspection
    results.json, DONE            the finished run's numbers; DONE once fit, final validation and test are all done

Every write goes through :func:`atomic_write` (temporary file, fsync, rename): a kill never leaves a torn file,
and a full disk is reported as one line naming the file and the free space.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import shutil
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, NamedTuple

import torch
import yaml
from omegaconf import DictConfig, OmegaConf

from ssmlm import slurm
from ssmlm.conf_dir import config_dir
from ssmlm.data.files import atomic_file, sha256_of
from ssmlm.data.tokenizers import tokenizer_from_dict
from ssmlm.errors import CheckpointError, ConfigError, DataError, RunDirError

log = logging.getLogger(__name__)
CONF_DIR = config_dir()
# the score ModelCheckpoint writes into the file name (conf/callbacks/default.yaml), "-v1" on a name clash
SCORE_IN_NAME = re.compile(r"ppl(?P<score>[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?|nan|inf)(?:-v\d+)?\.ckpt$")
STEP_IN_NAME = re.compile(r"step(\d+)")
# torch.compile wraps the model; its checkpoints name parameters "model._orig_mod.<name>"
COMPILED_PREFIX = "_orig_mod."

LAST, PREVIOUS = "last.ckpt", "last.prev.ckpt"
DIGEST_SUFFIX, SET_ASIDE_SUFFIX = ".sha256", ".unreadable"
STATUS_FILE, RESULTS_FILE, DONE_FILE, LOCK_FILE = "status.json", "results.json", "DONE", "run.lock"
VOCAB_FILE, FINGERPRINT_FILE, CONFIG_FILE = "vocab.json", "fingerprint.json", "config.yaml"
WANDB_ID_FILE, WANDB_STEP_FILE = "wandb_id.txt", "wandb_step.txt"

# --- writing ------------------------------------------------------------------------------------------------
def atomic_write(path: str | Path, content: bytes | str | Callable[[BinaryIO], None],
                 before_rename: Callable[[Path], None] | None = None) -> Path:
    """Writes ``content`` (bytes, text, or a function writing to a binary file) to ``path`` atomically
    (:func:`ssmlm.data.files.atomic_file`). A full disk or an unwritable folder is raised as a
    :class:`RunDirError` naming the file (and the free space)."""
    path = Path(path)
    try:
        with atomic_file(path, before_rename) as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode("utf-8") if isinstance(content, str) else content)
    except OSError as e:
        raise write_error(path, e) from e
    return path


def write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR)


def write_error(path: Path, e: OSError) -> Exception:
    """The one-line error for a failed write of ``path``: a full disk (with the free space), no permission, or
    the OSError itself."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return RunDirError(f"no space left on the device writing {path} ({free_space(path.parent)} free there). "
                           f"Free some space, then run the same command again: it resumes from the last verified "
                           f"checkpoint (or point hydra.run.dir / paths.log_dir at a larger disk).")
    if e.errno in WRITE_ERRNOS:
        return RunDirError(f"cannot write {path}: {e.strerror}. Make {path.parent} writable, or point "
                           f"hydra.run.dir / paths.log_dir at a writable folder.")
    return e


def free_space(folder: Path) -> str:
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            free = shutil.disk_usage(candidate).free
            return next(f"{free / 2 ** p:.1f} {unit}" for p, unit in ((30, "GiB"), (20, "MiB"), (10, "KiB"), (0, "B"))
                        if free >= 2 ** p or p == 0)
    return "unknown"


def check_writable(folder: Path) -> None:
    """The run dir exists (created if needed) and takes files, else one RunDirError naming it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = atomic_write(folder / f".write-test.{os.getpid()}", b"")
        probe.unlink()
    except OSError as e:
        raise write_error(folder, e) from e


# --- checkpoint integrity -----------------------------------------------------------------------------------
def digest_file(path: Path) -> Path:
    return path.with_name(path.name + DIGEST_SUFFIX)


def accepted_digests(path: Path) -> list[dict]:
    """The contents ``<name>.sha256`` vouches for: [{"sha256", "bytes"}, ...] (two while a file is replaced)."""
    recorded = json.loads(digest_file(path).read_text())
    return recorded["accepted"] if "accepted" in recorded else [recorded]


def _digests_or_none(path: Path) -> list[dict]:
    try:
        return accepted_digests(path)
    except (OSError, ValueError, KeyError):
        return []


def save_checkpoint(checkpoint: dict, path: str | Path) -> Path:
    """``torch.save`` atomically with its digest beside it (``<name>.sha256``), which every load checks. At every
    moment of the save the digest file vouches for whatever the name holds: it lists the new content's digest
    next to the old one before the rename, and only the new one after it."""
    path = Path(path)
    new: dict = {}

    def vouch_for_both(tmp: Path) -> None:
        new.update(sha256=sha256_of(tmp), bytes=tmp.stat().st_size)
        old = _digests_or_none(path) if path.exists() else []
        write_json(digest_file(path), {"accepted": [new, *old]})

    atomic_write(path, lambda f: torch.save(checkpoint, f), before_rename=vouch_for_both)
    write_json(digest_file(path), {"accepted": [new]})
    # what a process killed while saving this checkpoint (or its digest) left: checkpoints have one writer,
    # rank 0 under the run's lock, so no other save is under way
    for stray in path.parent.glob(f"{path.name}.*.tmp"):
        stray.unlink(missing_ok=True)
    return path


def remove_checkpoint(path: str | Path) -> None:
    path = Path(path)
    path.unlink(missing_ok=True)
    digest_file(path).unlink(missing_ok=True)


def digest_mismatch(path: Path) -> str | None:
    """Why ``path`` does not match the digest written with it, or None when it does (or has no digest file: a
    checkpoint of an older ssmlm; then loading it must succeed)."""
    try:
        accepted = accepted_digests(path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError) as e:
        return f"its digest file {digest_file(path).name} is unreadable ({e})"
    try:
        size = path.stat().st_size
    except OSError as e:
        return f"{type(e).__name__}: {e}"
    if size not in [a.get("bytes") for a in accepted]:
        return f"{size} bytes where {' or '.join(str(a.get('bytes')) for a in accepted)} were written"
    if sha256_of(path) not in [a.get("sha256") for a in accepted]:
        return "its content does not match the sha256 digest written with it (the file was damaged)"
    return None


def is_verified(path: Path) -> bool:
    """A checkpoint whose digest file exists and matches (what rotation may overwrite the fallback with)."""
    return path.is_file() and digest_file(path).is_file() and digest_mismatch(path) is None


def read_checkpoint(path: Path) -> dict:
    """A checkpoint that passed every check: its digest, torch.load, the keys of an ssmlm-train checkpoint and
    finite weights. Anything else is a CheckpointError starting "cannot read checkpoint <path>"."""
    path = Path(path)
    why = digest_mismatch(path)
    if why is None:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        except Exception as e:  # torn, foreign or not a checkpoint at all
            why = f"{type(e).__name__}: {e}"
        else:
            if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
                why = "not an ssmlm-train checkpoint (no state_dict / hyper_parameters)"
            else:
                bad = [k for k, v in ckpt["state_dict"].items()
                       if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
                if bad:
                    why = f"non-finite weights in {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}"
    if why is not None:
        raise CheckpointError(f"cannot read checkpoint {path} ({why}). Pick another with ckpt=best|last|<path>.")
    return ckpt


def set_aside(path: Path) -> Path:
    """Moves a checkpoint that failed its check (and its digest) to ``<name>.unreadable``, out of every list."""
    kept = path.with_name(path.name + SET_ASIDE_SUFFIX)
    os.replace(path, kept)
    if digest_file(path).exists():
        os.replace(digest_file(path), digest_file(kept))
    return kept


def rotate_last(checkpoint_dir: Path) -> None:
    """Before a new last.ckpt: the current one becomes last.prev.ckpt if it verifies; a damaged one is set aside
    and last.prev.ckpt (the newest verified checkpoint then) is kept."""
    last = checkpoint_dir / LAST
    if not last.exists():
        return
    if digest_file(last).exists() and (why := digest_mismatch(last)) is not None:
        log.warning("cannot read checkpoint %s (%s); kept as %s, and %s kept as the fallback", last, why,
                    set_aside(last).name, PREVIOUS)
        return
    previous = checkpoint_dir / PREVIOUS
    if previous.exists() and (why := digest_mismatch(previous)) is not None:
        log.warning("cannot read checkpoint %s (%s); kept as %s", previous, why, set_aside(previous).name)
    moving = _digests_or_none(last)
    if moving:  # vouch for the old and the arriving content first: a kill in between leaves both verifiable
        write_json(digest_file(previous), {"accepted": [*moving, *(_digests_or_none(previous)
                                                                  if previous.exists() else [])]})
    else:  # a checkpoint of an older ssmlm, without digest, becomes last.prev.ckpt
        digest_file(previous).unlink(missing_ok=True)
    if not _link_over(last, previous):  # a filesystem without hard links: last.ckpt is missing until the save
        os.replace(last, previous)
        digest_file(last).unlink(missing_ok=True)
    if moving:
        write_json(digest_file(previous), {"accepted": moving})


def _link_over(source: Path, target: Path) -> bool:
    """``target`` becomes a second name of ``source`` in one rename, so ``source`` keeps its name (a kill before
    the next save still finds last.ckpt); False where the filesystem has no hard links."""
    tmp = target.with_name(f"{target.name}.{os.getpid()}.link.tmp")
    try:
        tmp.unlink(missing_ok=True)
        os.link(source, tmp)
    except OSError as e:
        if e.errno in (errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP):
            return False
        raise write_error(target, e) from e
    os.replace(tmp, target)
    for stray in target.parent.glob(f"{target.name}.*.link.tmp"):  # left by a process killed in between
        stray.unlink(missing_ok=True)
    return True


def checkpoint_step(path: Path) -> int:
    match = STEP_IN_NAME.search(path.name)
    return int(match[1]) if match else -1


class Resume(NamedTuple):
    path: Path
    checkpoint: dict
    set_aside: list[tuple[Path, str]]  # (file, why) that failed their check before this one

    @property
    def step(self) -> int:
        return int(self.checkpoint["global_step"])

    @property
    def info(self) -> dict:
        return self.checkpoint.get("ssmlm") or {}  # what callbacks.RunInfo stored (the wandb run id)


# --- status -------------------------------------------------------------------------------------------------
def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def read_status(run_dir: str | Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(run_dir) / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None


class CellStatus:
    """Appends events to a run's status.json (atomically). Rank 0 records everything; the other DDP ranks of a
    run only their own failures (e.g. an error on one GPU, which rank 0 would only see as a hung collective)."""

    def __init__(self, run_dir: str | Path, launch: str | None = None, rank: int = 0) -> None:
        self.path = Path(run_dir) / STATUS_FILE
        self.launch, self.rank = launch, rank

    def record(self, event: str, step: int | None = None, error: str | None = None, **fields: Any) -> None:
        if self.rank != 0 and event != "failed":
            return
        status = read_status(self.path.parent) or {"history": []}
        entry = {"event": event, "time": _now(), "step": step, "launch": self.launch, "job": slurm.job_id(),
                 "host": socket.gethostname()}
        if error:
            entry["error"] = error if self.rank == 0 else f"rank {self.rank}: {error}"
        status["history"].append(entry)
        status.update(fields, state=event, error=entry.get("error"), updated=entry["time"])
        if step is not None:
            status["global_step"] = step
        write_json(self.path, status)


# --- the lock -----------------------------------------------------------------------------------------------
@contextmanager
def run_lock(folder: Path, rank: int = 0) -> Iterator[None]:
    """Holds ``run.lock`` of ``folder`` (fcntl, exclusive) while training: a second process on the same run dir
    is refused with the holder's host, PID and start time. The kernel drops the lock when its holder dies (kill -9,
    the old allocation of a requeued SLURM job), so a relaunch takes the run over; the file is never removed, as
    removing it would let two processes lock two different files. DDP ranks other than 0 run under rank 0's lock."""
    if rank != 0:
        yield
        return
    path = folder / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise write_error(path, e) from e
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno not in (errno.EACCES, errno.EAGAIN):
            raise write_error(path, e) from e
        holder = _read_holder(path)
        who = (f"process {holder.get('pid')} on {holder.get('host')} (started {holder.get('started')}"
               f"{', SLURM job ' + holder['job'] if holder.get('job') else ''})") if holder else "another process"
        raise RunDirError(f"{folder} is in use by {who}: only one process may train a run dir. Wait for it to "
                          f"finish (or stop it), or use another run dir (hydra.run.dir=...).") from None
    # read through the locked descriptor: closing any other descriptor of the file would drop a POSIX lock
    previous = _parse_holder(os.pread(fd, 4096, 0).decode(errors="replace"))
    if previous.get("pid") not in (None, os.getpid()):
        log.info("taking over %s from process %s on %s, which is gone", folder, previous["pid"], previous.get("host"))
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": _now(), "job": slurm.job_id()}
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _read_holder(path: Path) -> dict:
    try:
        return _parse_holder(path.read_text())
    except OSError:
        return {}


def _parse_holder(text: str) -> dict:
    try:
        holder = json.loads(text or "{}")
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


# --- fingerprint --------------------------------------------------------------------------------------------
# data keys that say where or how fast data is read, not what it is (the run may move between machines)
_DATA_KEYS_OF_THE_MACHINE = {"train_path", "val_path", "test_path", "vocab_path", "num_workers", "download",
                             "sources", "cache_dir", "progress", "batch_size", "_convert_"}


def data_file_fingerprint(path: str | Path | None, key: str, recorded: dict | None = None) -> dict | None:
    """Size and sha256 of a data file; the digest is reused from ``recorded`` when size and mtime are unchanged
    (hashing gigabytes on every restart would cost minutes). A path that is not a file is a DataError."""
    path = require_file(path, key)
    if path is None:
        return None
    stat = path.stat()
    recorded = recorded or {}
    if recorded.get("bytes") == stat.st_size and recorded.get("mtime_ns") == stat.st_mtime_ns:
        return dict(recorded)
    return {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256_of(path)}


def require_file(path: str | Path | None, key: str) -> Path | None:
    """``path`` of config key ``key`` when it names a file (None for none); a directory is a DataError (a missing
    file is the data module's to report: it may download it)."""
    if path in (None, ""):
        return None
    path = Path(str(path)).expanduser()
    if path.is_dir():
        raise DataError(f"{key}={path} is a directory; point {key} at a text file")
    return path


def tokenizer_digest(tokenizer: dict) -> str:
    return hashlib.sha256(json.dumps(tokenizer, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def sparsity_node(cfg: DictConfig) -> dict | None:
    """The run's sparsity config as a plain dict (None: none)."""
    return OmegaConf.to_container(cfg.sparsity, resolve=True) if cfg.get("sparsity") is not None else None


def config_fingerprint(cfg: DictConfig) -> dict:
    """The config part of a run's fingerprint: model, sparsity, global batch, seed and the data config without
    its machine-specific keys (paths, workers)."""
    data = OmegaConf.to_container(cfg.data, resolve=True)
    return {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "sparsity": sparsity_node(cfg),
        "data": {k: v for k, v in sorted(data.items()) if k not in _DATA_KEYS_OF_THE_MACHINE},
        "data_class": data.get("_target_"),
        "batch_size": cfg.get("batch_size"),
    }


def differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every leaf that differs between two nested dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += differences(old.get(key, "<absent>"), new.get(key, "<absent>"), f"{prefix}{key}.")
        return out
    if old == new:
        return []
    short = lambda v: (repr(v)[:60] + "...") if len(repr(v)) > 63 else repr(v)  # noqa: E731
    return [f"{prefix[:-1]}: {short(old)} -> {short(new)}"]


# --- the run dir --------------------------------------------------------------------------------------------
class RunDir:
    """A run's directory: its config, vocabulary, checkpoints, status, results and lock, with clear errors when
    something is missing. ``RunDir(path)`` reads an existing run (ssmlm-eval, ssmlm-generate);
    ``RunDir(path, create=True)`` is the one ssmlm-train writes; ``check=False`` reads whatever a run left (a
    report row of a run that failed at its start)."""

    def __init__(self, path: str | Path, create: bool = False, check: bool = True):
        self.path = Path(path).expanduser()
        self.checkpoint_dir = self.path / "checkpoints"
        if create:
            check_writable(self.path)
            return
        if not check:
            return
        if not self.path.is_dir():
            raise ConfigError(f"run_dir={path}: no such directory. Pass the directory ssmlm-train wrote "
                              f"(it holds checkpoints/ and .hydra/config.yaml), e.g. outputs/runs/default.")
        if not self.checkpoint_dir.is_dir() and not self.config_path().exists():
            raise ConfigError(f"run_dir={path} is not a training run: it has neither checkpoints/ nor "
                              f".hydra/config.yaml. Pass the directory ssmlm-train wrote.")

    def file(self, name: str) -> Path:
        return self.path / name

    # --- config -----------------------------------------------------------------------------------------
    def config_path(self) -> Path:
        """The config the run was accepted with; Hydra's .hydra/config.yaml for runs of older versions (Hydra
        rewrites that one on every launch, also of a launch that is refused)."""
        own = self.path / CONFIG_FILE
        return own if own.exists() else self.path / ".hydra" / "config.yaml"

    def config(self) -> DictConfig:
        """The run's training config, with ``paths.output_dir`` pointing at this run dir (not resolved:
        interpolations resolve when used, with this machine's data dir and hardware)."""
        path = self.config_path()
        if not path.exists():
            raise ConfigError(f"{path} is missing: the run's config is needed to rebuild its data. Copy the run's "
                              f".hydra/ folder back, or evaluate a run dir written by ssmlm-train.")
        from ssmlm import resolvers

        resolvers.register()
        cfg = OmegaConf.load(path)
        OmegaConf.update(cfg, "paths.output_dir", str(self.path.resolve()), force_add=True)
        return cfg

    def save_config(self, cfg: DictConfig) -> None:
        plain = OmegaConf.to_container(cfg, resolve=False)
        plain.pop("hydra", None)
        atomic_write(self.path / CONFIG_FILE, OmegaConf.to_yaml(OmegaConf.create(plain)))

    # --- results and completion -------------------------------------------------------------------------
    def results(self) -> dict | None:
        try:
            return json.loads((self.path / RESULTS_FILE).read_text())
        except (OSError, ValueError):
            return None

    def is_done(self) -> bool:
        """DONE is there (written only after the complete results.json: :meth:`finish`) and results.json reads."""
        return (self.path / DONE_FILE).exists() and self.results() is not None

    def finish(self, results: dict) -> None:
        """results.json, then DONE: DONE never exists without the complete results."""
        write_json(self.path / RESULTS_FILE, results)
        atomic_write(self.path / DONE_FILE, "")

    def reopen(self) -> None:
        """A run trained again (resume=false, or not complete): no DONE until it is."""
        (self.path / DONE_FILE).unlink(missing_ok=True)

    # --- lock and fingerprint ---------------------------------------------------------------------------
    def lock(self, rank: int = 0):
        return run_lock(self.path, rank)

    def fingerprint(self) -> dict | None:
        try:
            return json.loads((self.path / FINGERPRINT_FILE).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise RunDirError(f"{self.path / FINGERPRINT_FILE} is unreadable ({e}); restore it, or delete it to "
                              f"accept this command's config as the run's") from e

    def save_fingerprint(self, fingerprint: dict) -> None:
        write_json(self.path / FINGERPRINT_FILE, fingerprint)

    # --- checkpoints ------------------------------------------------------------------------------------
    def checkpoint(self, spec: str | Path = "best") -> Path:
        """``best`` (lowest validation perplexity), ``last``, or a path (absolute, or relative to the current
        directory, the run dir or its checkpoints/). Loading it (read_checkpoint) verifies it."""
        spec = str(spec)
        if spec == "best":
            ranked = self.ranked_checkpoints()
            if not ranked:
                raise CheckpointError(f"no scored checkpoint (epoch*-step*-ppl*.ckpt) in {self.checkpoint_dir}: "
                                      f"the run never validated. {self._other_choices('best')}")
            return ranked[0][0]
        if spec == "last":
            path = self.checkpoint_dir / LAST
            if not path.exists():
                raise CheckpointError(f"{path} does not exist. {self._other_choices('last')}")
            return path
        for candidate in (Path(spec).expanduser(), self.path / spec, self.checkpoint_dir / spec):
            if candidate.is_file():
                return candidate
        raise CheckpointError(f"ckpt={spec}: no such checkpoint (looked in the current directory, {self.path} and "
                              f"{self.checkpoint_dir}). {self._other_choices(spec)}")

    def _other_choices(self, asked: str) -> str:
        """The ckpt= values this run can actually serve (never ckpt=last without a last.ckpt)."""
        choices = []
        if asked != "best" and self.ranked_checkpoints():
            choices.append("ckpt=best")
        if asked != "last" and (self.checkpoint_dir / LAST).exists():
            choices.append("ckpt=last")
        choices.append("ckpt=<path to a .ckpt file>")
        return f"Use {' or '.join(choices)}."

    def ranked_checkpoints(self) -> list[tuple[Path, float]]:
        """The top-k checkpoints present in checkpoints/, best first, with their validation scores.

        Scores come from the ModelCheckpoint state saved in last.ckpt (``best_k_models``, matched by file
        name so a moved run dir still works) and otherwise from the score in the file name.
        """
        if not self.checkpoint_dir.is_dir():
            return []
        recorded, mode = self._recorded_scores()
        if mode is None:
            mode = self._config_mode()
        ranked = []
        for path in self.checkpoint_dir.glob("*.ckpt"):
            match = SCORE_IN_NAME.search(path.name)
            score = recorded.get(path.name, float(match["score"]) if match else None)
            if score is not None and math.isfinite(score):
                ranked.append((path, score))
        ranked.sort(key=lambda item: (item[1] if mode == "min" else -item[1], item[0].name))
        return ranked

    def top_checkpoints(self, k: int) -> list[tuple[Path, float]]:
        """The k best checkpoints with their validation scores, best first."""
        ranked = self.ranked_checkpoints()
        if k < 1:
            raise ConfigError(f"asked for the top {k} checkpoints: use a positive number")
        if len(ranked) < k:
            raise CheckpointError(f"asked for the top {k} checkpoints but {self.checkpoint_dir} holds {len(ranked)} "
                                  f"scored ones; use at most {len(ranked)} (the run kept "
                                  f"callbacks.model_checkpoint.save_top_k of them).")
        return ranked[:k]

    def _recorded_scores(self) -> tuple[dict[str, float], str | None]:
        last = self.checkpoint_dir / LAST
        if not last.exists():
            return {}, None
        try:
            callbacks = read_checkpoint(last).get("callbacks", {})
        except CheckpointError:  # a damaged last.ckpt: the file names still carry the scores
            return {}, None
        for key, state in callbacks.items():
            if str(key).startswith("ModelCheckpoint") and isinstance(state, dict) and "best_k_models" in state:
                mode = re.search(r"'mode': '(min|max)'", str(key))
                scores = {Path(p).name: float(s) for p, s in state["best_k_models"].items()}
                return scores, mode[1] if mode else None
        return {}, None

    def _config_mode(self) -> str:
        try:
            mode = OmegaConf.select(self.config(), "callbacks.model_checkpoint.mode", default="min")
        except ConfigError:
            mode = "min"
        return mode if mode in ("min", "max") else "min"

    def resume_candidates(self) -> list[Path]:
        """Where a run can resume from, in order: last.ckpt, the one before it, then the top-k, newest first."""
        top_k = sorted(self.checkpoint_dir.glob("epoch*-step*.ckpt"), key=checkpoint_step, reverse=True)
        paths = [self.checkpoint_dir / LAST, self.checkpoint_dir / PREVIOUS, *top_k]
        return [p for p in paths if p.is_file()]

    def newest_verified(self, accept: Callable[[Path, dict], None] = lambda path, ckpt: None) -> Resume | None:
        """The newest checkpoint that passes every check (read_checkpoint), after ``accept(path, checkpoint)``
        (which raises to refuse it). Those that failed before it are set aside (``<name>.unreadable``) once one is
        found and accepted; when none passes, nothing is moved and the error lists them all."""
        failed = []
        for path in self.resume_candidates():
            try:
                ckpt = read_checkpoint(path)
            except CheckpointError as e:
                failed.append((path, str(e).split(" (", 1)[-1].rsplit("). Pick", 1)[0]))
                continue
            accept(path, ckpt)
            for bad, _ in failed:
                set_aside(bad)
            return Resume(path, ckpt, failed)
        if failed:
            listed = "; ".join(f"{p} ({why})" for p, why in failed)
            raise CheckpointError(f"cannot read any checkpoint of this run: {listed}. Move them away to start over, "
                                  f"or set resume=false.")
        return None

    def best_verified(self) -> tuple[Path, float] | None:
        """The best-scored top-k checkpoint that passes its checks; damaged ones are set aside, saying so."""
        for path, score in self.ranked_checkpoints():
            try:
                read_checkpoint(path)
            except CheckpointError as e:
                log.warning("%s; kept as %s, testing the next best checkpoint", e, set_aside(path).name)
                continue
            return path, score
        return None

    # --- vocabulary -------------------------------------------------------------------------------------
    def tokenizer(self, checkpoint: dict | None = None):
        """The run's tokenizer from vocab.json, else from the checkpoint's hyper-parameters; when both exist
        they must agree (a vocab.json from another run would silently scramble the text)."""
        stored = (checkpoint or {}).get("hyper_parameters", {}).get("tokenizer")
        path = self.path / VOCAB_FILE
        if path.exists():
            try:
                described = json.loads(path.read_text(encoding="utf-8"))
                tokenizer = tokenizer_from_dict(described)
            except (ValueError, UnicodeDecodeError) as e:
                raise DataError(f"{path} is not a vocabulary written by ssmlm-train ({e}). Restore the run's "
                                f"vocab.json or delete it to use the vocabulary stored in the checkpoint.") from e
            if stored is not None and tokenizer_from_dict(stored) != tokenizer:
                raise CheckpointError(f"{path} differs from the vocabulary stored in the checkpoint: the vocab.json "
                                      f"belongs to another run. Restore this run's vocab.json or delete it.")
            return tokenizer
        if stored is None:
            raise DataError(f"no vocabulary for {self.path}: vocab.json is missing and the checkpoint stores none. "
                            f"Copy the run's vocab.json back into the run dir.")
        return tokenizer_from_dict(stored)


# --- checkpoint contents ------------------------------------------------------------------------------------
def model_state(ckpt: dict) -> dict[str, torch.Tensor]:
    """The checkpoint's weights with the names of an uncompiled LMModule."""
    return {k.replace(COMPILED_PREFIX, ""): v for k, v in ckpt["state_dict"].items()}


def build_model(ckpt: dict, device: torch.device | str = "cpu", path: Path | None = None):
    """The checkpoint's ``LanguageModel`` in eval mode on ``device``."""
    from ssmlm.lm import LMModule

    hparams = dict(ckpt["hyper_parameters"], compile=False)
    try:
        module = LMModule(**hparams)
        module.load_state_dict(model_state(ckpt))
    except Exception as e:
        raise CheckpointError(f"cannot rebuild the model of {path or 'the checkpoint'} ({type(e).__name__}: {e}); "
                              f"it was written by an incompatible version of ssmlm.") from e
    return module.model.to(device).eval()


def average_checkpoints(paths: list[Path], out_path: Path) -> Path:
    """Averages the weights of ``paths`` (same run) into one checkpoint at ``out_path``, written atomically.

    Floating-point tensors are averaged in fp32 and cast back; anything else is taken from the first, but for
    sparsity masks (bool ``weight_mask`` buffers, ssmlm.sparsity): a weight is kept only where every checkpoint
    kept it (a gradual run's masks shrink between checkpoints), and the averaged weight is zero elsewhere.
    """
    first = read_checkpoint(paths[0])
    averaged = {k: v.float().clone() if v.is_floating_point() else v.clone() for k, v in model_state(first).items()}
    for path in paths[1:]:
        state = model_state(read_checkpoint(path))
        if state.keys() != averaged.keys():
            raise CheckpointError(f"{path} holds other parameters than {paths[0]}: they come from different models.")
        for name, total in averaged.items():
            if total.is_floating_point():
                total += state[name].float()
            elif name.endswith(".weight_mask"):
                total &= state[name]
    reference = model_state(first)
    for name, total in averaged.items():
        if total.is_floating_point():
            averaged[name] = (total / len(paths)).to(reference[name].dtype)
    for name, mask in averaged.items():
        if name.endswith(".weight_mask"):
            weight = name.removesuffix("_mask")
            averaged[weight] = averaged[weight] * mask
    ckpt = {
        "state_dict": averaged,
        "hyper_parameters": first["hyper_parameters"],
        "pytorch-lightning_version": first.get("pytorch-lightning_version"),
        "averaged_from": [p.name for p in paths],
    }
    save_checkpoint(ckpt, out_path)
    return out_path


# --- devices ------------------------------------------------------------------------------------------------
def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but this machine has no CUDA GPU; use device=cpu or device=auto")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"device={name}: not a device ({e}); use auto, cpu, cuda or cuda:N") from e


# --- key=value command lines --------------------------------------------------------------------------------
def tool_config(name: str, argv: list[str], open_keys: tuple[str, ...] = ()) -> DictConfig:
    """``conf/<name>.yaml`` updated by ``key=value`` arguments.

    Values are taken verbatim for keys whose default is a string (so ``prompt=नमस्ते, दुनिया`` needs no
    quoting); other values are parsed as YAML scalars. Keys must exist in the yaml, except below the
    ``open_keys`` nodes (e.g. ``data``), whose entries override the run's own config.
    """
    path = CONF_DIR / f"{name}.yaml"
    cfg = OmegaConf.load(path)
    if any(a in ("-h", "--help") for a in argv):
        print(path.read_text(encoding="utf-8"))
        sys.exit(0)
    for arg in argv:
        key, sep, raw = arg.partition("=")
        key = key.strip().lstrip("+")
        if not sep or not key:
            raise ConfigError(f"argument {arg!r}: use key=value (see {path} for the keys)")
        known = OmegaConf.select(cfg, key, default=KeyError) is not KeyError
        if not known and not key.startswith(tuple(f"{k}." for k in open_keys)):
            keys = ", ".join(k for k in cfg.keys())
            raise ConfigError(f"unknown key {key!r}; {name} takes: {keys}")
        default = OmegaConf.select(cfg, key) if known else None
        value: Any = raw if isinstance(default, str) else _scalar(key, raw)
        if isinstance(default, bool) and not isinstance(value, bool):
            raise ConfigError(f"{key}={raw}: expected true or false")
        if isinstance(default, (int, float)) and not isinstance(default, bool) and value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{key}={raw}: expected a number")
            if isinstance(default, int) and isinstance(value, float):
                raise ConfigError(f"{key}={raw}: expected a whole number")
        OmegaConf.update(cfg, key, value, force_add=True)
    return cfg


def _scalar(key: str, raw: str) -> Any:
    try:
        return yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}={raw}: cannot parse the value ({e})") from e

"""File helpers shared by the run directory, downloads, the built-in corpus and the token caches: atomic writes,
hashing, locking, the cache dir. (Here, below both ``ssmlm.data`` and ``ssmlm.run_dir``, so neither imports the other.)"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

CHUNK = 1 << 20

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_file(path: str | Path, before_rename: Callable[[Path], None] | None = None) -> Iterator[BinaryIO]:
    """A binary file that takes the name ``path`` only when the block ends without error: it is written to a
    temporary file beside ``path``, fsynced and renamed over it, so readers see the old file or the new one, never
    a part. An error (or a check the block raises) removes the temporary file and leaves ``path`` as it was.
    ``before_rename(temporary file)`` runs once the content is on disk, before it takes the name. A process
    killed mid-write leaves ``<name>.<random>.tmp`` behind; only a file's single writer may remove such strays
    (:func:`ssmlm.run_dir.save_checkpoint` does): another process may be writing its own at this moment."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the usual permissions
        if before_rename is not None:
            before_rename(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def user_cache_dir() -> Path:
    """Where derived files go when no ``data.cache_dir`` is given: $SSMLM_CACHE_DIR, else $XDG_CACHE_HOME/ssmlm,
    else ~/.cache/ssmlm (the same rule as ``paths.cache_dir`` in conf/paths/default.yaml)."""
    if os.environ.get("SSMLM_CACHE_DIR"):
        return Path(os.environ["SSMLM_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "ssmlm"


@contextlib.contextmanager
def directory_lock(directory: Path) -> Iterator[None]:
    """An exclusive lock on a directory, so that several processes (DDP ranks) fetch or build a file once.

    The lock is taken on the directory itself, so no lock file is left behind.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock, the atomic renames still keep files whole
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def writable_dir(directory: Path) -> bool:
    """Writable, and not marked read-only by its mode bits (which root's access check would ignore)."""
    try:
        return os.access(directory, os.W_OK) and bool(directory.stat().st_mode & 0o222)
    except OSError:
        return False

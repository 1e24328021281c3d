"""File helpers shared by downloads, the built-in corpus and the token caches: hashing, locking, the cache dir."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

CHUNK = 1 << 20


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

"""The corpus shipped inside the package: Premchand's Hindi stories, xz-compressed (see builtin/README.md).

``ssmlm/data/builtin/<name>.xz`` holds each file; ``builtin/SHA256SUMS`` the sha256 of its decompressed
text. :func:`extract` decompresses a file once into ``<cache_dir>/builtin/<name>`` and checks it against that
sum at every use, so a damaged or edited copy is never read: it is decompressed again.
"""

from __future__ import annotations

import functools
import hashlib
import lzma
from importlib import resources
from pathlib import Path

from ssmlm.data.files import CHUNK, atomic_file, directory_lock, sha256_of, user_cache_dir
from ssmlm.errors import DataError

PACKAGE_DIR = "ssmlm/data/builtin"


def _root():
    return resources.files("ssmlm.data").joinpath("builtin")


@functools.cache
def checksums() -> dict[str, str]:
    """``<dir>/<file>`` -> sha256 of every built-in file (empty when the package was built without them)."""
    sums = _root().joinpath("SHA256SUMS")
    if not sums.is_file():
        return {}
    pairs = (line.split() for line in sums.read_text(encoding="utf-8").splitlines() if line.strip())
    return {name: digest for digest, name in pairs}


def files(corpus: str) -> list[str]:
    """The file names of a built-in corpus directory, e.g. ``files("hindi/premchand")`` -> train.txt, ..."""
    return [name[len(corpus) + 1:] for name in checksums() if name.startswith(corpus + "/")]


def available(corpus: str) -> bool:
    return bool(files(corpus)) and all(_root().joinpath(f"{corpus}/{name}.xz").is_file() for name in files(corpus))


def extract(name: str, cache_dir: Path | None = None, key: str = "data.train_path") -> Path:
    """The verified, decompressed copy of built-in file ``name`` under ``cache_dir`` (decompressed if needed);
    ``key`` is the config key the copy stands in for, named in errors."""
    expected = checksums()[name]
    dest = Path(cache_dir or user_cache_dir()).expanduser() / "builtin" / name
    if dest.is_file() and sha256_of(dest) == expected:
        return dest
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with directory_lock(dest.parent):
            if dest.is_file() and sha256_of(dest) == expected:  # another process decompressed it meanwhile
                return dest
            digest = hashlib.sha256()
            with _root().joinpath(f"{name}.xz").open("rb") as packed, lzma.open(packed) as src, \
                    atomic_file(dest) as out:
                while block := src.read(CHUNK):
                    digest.update(block)
                    out.write(block)
                if digest.hexdigest() != expected:  # raised inside: the copy never takes the name
                    raise DataError(f"the built-in {PACKAGE_DIR}/{name}.xz decompresses to sha256 "
                                    f"{digest.hexdigest()}, not {expected}: the installed package is damaged. "
                                    f"Reinstall ssmlm, or point {key} at your own copy.")
    except (OSError, lzma.LZMAError) as e:
        raise DataError(f"cannot decompress the built-in {name} into {dest.parent} ({e}). Set data.cache_dir "
                        f"(or SSMLM_CACHE_DIR) to a writable directory.") from None
    return dest

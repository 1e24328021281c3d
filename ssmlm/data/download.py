"""Fetching the public data files: resumable HTTP downloads with checksums, and the Premchand recipe.

A data config lists ``sources``: what to fetch when one of its files is missing and ``download: true``.
Each source is either a plain file::

    {path: <local file>, url: <https URL>, sha256: <hex or null>}

or a recipe that assembles several files (see :func:`build_premchand`)::

    {recipe: premchand, dir: <local dir>, repo: owner/name, commit: <sha>, sha256: {train.txt: <hex>, ...}}

Downloads go to ``<file>.part`` (resumed with an HTTP Range request after an interruption), are checked
against the known sha256 and renamed into place atomically. When no sha256 is known, the one of the
downloaded file is written to ``<file>.sha256`` (``sha256sum -c`` format) and checked on later use.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from tqdm.auto import tqdm

from ssmlm.errors import DataError

CHUNK = 1 << 20
# Files up to this size are re-hashed whenever they are used; larger ones only when modified after download.
ALWAYS_VERIFY_BYTES = 64 << 20
USER_AGENT = "ssmlm-data/1"
LOCAL_FILES_HINT = ("To use local copies instead, point the config at them (e.g. data.train_path=/path/to/train.txt) "
                    "or set SSMLM_DATA_DIR to a directory that holds the data layout; data.download=false never "
                    "fetches anything.")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


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


def _open(url: str, offset: int, timeout: float):
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def _network_error(dest: Path, url: str, err: Exception) -> DataError:
    reason = f"HTTP {err.code} {err.reason}" if isinstance(err, urllib.error.HTTPError) else (
        str(getattr(err, "reason", None) or err))
    return DataError(f"could not download {dest} from {url}: {reason}. {LOCAL_FILES_HINT}")


def download_file(url: str, dest: Path, sha256: str | None = None, progress: bool = True,
                  timeout: float = 60.0) -> Path:
    """Fetch ``url`` to ``dest``: resumable, checksummed, renamed into place only when complete."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    digest = hashlib.sha256()
    try:
        response = _open(url, offset, timeout)
    except urllib.error.HTTPError as e:
        if e.code != 416 or not offset:
            raise _network_error(dest, url, e) from None
        response = None  # 416: nothing after `offset`, the partial file is already complete
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        raise _network_error(dest, url, e) from None

    if response is not None:
        with response:
            if offset and response.status != 206:
                offset = 0  # the server ignored the Range header: start over
            if offset:
                with open(part, "rb") as f:
                    while block := f.read(CHUNK):
                        digest.update(block)
            length = response.headers.get("Content-Length")
            total = offset + int(length) if length is not None else None
            bar = tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                       desc=f"download {dest.name}", disable=not progress)
            try:
                with open(part, "ab" if offset else "wb") as f, bar:
                    while block := response.read(CHUNK):
                        f.write(block)
                        digest.update(block)
                        bar.update(len(block))
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
                raise DataError(f"download of {url} was interrupted ({e}); the partial file {part} is kept and "
                                f"the next run resumes it. {LOCAL_FILES_HINT}") from None
            if total is not None and part.stat().st_size != total:
                raise DataError(f"download of {url} ended early ({part.stat().st_size} of {total} bytes); the "
                                f"partial file {part} is kept and the next run resumes it.")
    else:
        with open(part, "rb") as f:
            while block := f.read(CHUNK):
                digest.update(block)

    actual = digest.hexdigest()
    if sha256 is not None and actual != sha256.lower():
        part.unlink()
        raise DataError(f"{url} downloaded to {dest} has sha256 {actual}, but the data config expects {sha256}. "
                        f"The partial download was deleted; run again to retry. If the file changed upstream, "
                        f"update the sha256 in the data config.")
    os.replace(part, dest)
    if sha256 is None:
        sidecar(dest).write_text(f"{actual}  {dest.name}\n")
    return dest


def check_file(path: Path, sha256: str | None) -> None:
    """Verify a previously fetched file against the known sha256, or the one recorded at download time.

    Small files are always re-hashed; large ones only when modified after their ``.sha256`` was written,
    so a multi-GB file does not cost a full read at every start.
    """
    recorded = sidecar(path)
    if sha256 is None and not recorded.exists():
        return
    size = path.stat().st_size
    if sha256 is None:
        if size > ALWAYS_VERIFY_BYTES and path.stat().st_mtime_ns <= recorded.stat().st_mtime_ns:
            return
        sha256 = (recorded.read_text().split() or [""])[0]
    actual = sha256_of(path)
    if actual != sha256.lower():
        raise DataError(f"{path} has sha256 {actual} but {sha256} was expected (it changed since it was "
                        f"downloaded, or it is not the published file). Delete it to download it again, or, if "
                        f"it is your own data, point the config at it under another path (or set "
                        f"data.download=false).")


def _github_listing(url: str, timeout: float) -> list[str]:
    try:
        with _open(url, 0, timeout) as response:
            entries = json.loads(response.read().decode("utf-8"))
    except (urllib.error.URLError, OSError) as e:
        raise DataError(f"could not list the source files at {url}: "
                        f"{getattr(e, 'reason', None) or e}. {LOCAL_FILES_HINT}") from None
    except ValueError as e:
        raise DataError(f"{url} did not return a JSON file listing ({e}).") from None
    return [entry["name"] for entry in entries if isinstance(entry, dict) and entry.get("type", "file") == "file"]


def premchand_split(names: Sequence[str]) -> dict[str, list[str]]:
    """Story files by split: sorted by name, story i -> valid if i % 10 == 8, test if i % 10 == 9, else train."""
    splits: dict[str, list[str]] = {"train.txt": [], "valid.txt": [], "test.txt": []}
    for i, name in enumerate(sorted(names)):
        splits["valid.txt" if i % 10 == 8 else "test.txt" if i % 10 == 9 else "train.txt"].append(name)
    return splits


def build_premchand(source: Mapping, progress: bool = True, timeout: float = 60.0) -> None:
    """Assemble the Premchand train/valid/test split (see shared/data/SOURCES.md) from its GitHub repo.

    The story files ``input/<story>.txt`` at the pinned commit are sorted by file name and numbered from 0;
    story i goes to valid if i % 10 == 8, to test if i % 10 == 9, else to train. Each story is decoded as
    UTF-8, CRLF -> LF, stripped; a split is its stories joined with one blank line, plus a final newline.
    Each result must match its known sha256 before any file is written.
    """
    out_dir = Path(source["dir"])
    repo, commit = source["repo"], source["commit"]
    list_url = source.get("list_url") or "https://api.github.com/repos/{repo}/contents/input?ref={commit}"
    raw_url = source.get("raw_url") or "https://raw.githubusercontent.com/{repo}/{commit}/input/{name}"
    expected = dict(source["sha256"])

    names = sorted(n for n in _github_listing(list_url.format(repo=repo, commit=commit), timeout)
                   if n.endswith(".txt") and n != "combined_data.txt")
    if not names:
        raise DataError(f"{list_url.format(repo=repo, commit=commit)} lists no input/*.txt story files.")
    stories_dir = out_dir / f".premchand-{commit[:12]}"
    for name in tqdm(names, desc=f"download {repo} stories", unit="file", disable=not progress):
        if not (stories_dir / name).exists():
            download_file(raw_url.format(repo=repo, commit=commit, name=name), stories_dir / name,
                          progress=False, timeout=timeout)

    assembled = {}
    for split, files in premchand_split(names).items():
        stories = [(stories_dir / f).read_bytes().decode("utf-8").replace("\r\n", "\n").strip() for f in files]
        assembled[split] = ("\n\n".join(stories) + "\n").encode("utf-8")
    for name, data in assembled.items():
        actual = hashlib.sha256(data).hexdigest()
        if name in expected and actual != expected[name].lower():
            raise DataError(f"the assembled {name} from {repo}@{commit} has sha256 {actual}, expected "
                            f"{expected[name]} ({len(names)} story files were listed). The downloaded stories are "
                            f"kept in {stories_dir}; delete that directory to fetch them again.")
    for name, data in assembled.items():
        tmp = out_dir / f"{name}.part"
        tmp.write_bytes(data)
        os.replace(tmp, out_dir / name)
    shutil.rmtree(stories_dir)


RECIPES = {"premchand": build_premchand}


def _targets(source: Mapping) -> list[Path]:
    """The files a source produces."""
    if "recipe" in source:
        return [Path(source["dir"]) / name for name in source["sha256"]]
    return [Path(source["path"])]


def _expected_sha256(source: Mapping, path: Path) -> str | None:
    if "recipe" in source:
        return source["sha256"][path.name]
    return source.get("sha256")


def _fetch(source: Mapping, progress: bool) -> None:
    if "recipe" in source:
        if source["recipe"] not in RECIPES:
            raise DataError(f"unknown download recipe {source['recipe']!r} in data.sources "
                            f"(known: {', '.join(RECIPES)})")
        RECIPES[source["recipe"]](source, progress=progress)
    else:
        download_file(source["url"], Path(source["path"]), source.get("sha256"), progress=progress)


def ensure_files(required: Mapping[str, Path], sources: Sequence[Mapping], download: bool,
                 progress: bool = True) -> None:
    """Make sure each required file (config key -> path) exists, fetching missing ones when ``download``.

    A file is fetched only by a source that names exactly that path, so a user's own (missing) file is never
    replaced by a public download. Files that a source produces are verified against their checksums.
    """
    for key, path in required.items():
        path = Path(path)
        source = next((s for s in sources if path.resolve() in {t.resolve() for t in _targets(s)}), None)
        if path.exists():
            if download and source is not None:
                check_file(path, _expected_sha256(source, path))
            continue
        if not download or source is None:
            where = (f"set data.download=true to fetch it from {source.get('url') or source.get('repo')}, or "
                     if source is not None else "")
            raise DataError(f"{key}: file not found: {path}. To fix: {where}point {key} at your copy "
                            f"({key}=/path/to/file) or set SSMLM_DATA_DIR to the directory holding the data.")
        nearest = next(d for d in (path.parent, *path.parent.parents) if d.exists())
        if not writable_dir(nearest):
            raise DataError(f"{key}: file not found: {path}, and its directory is read-only, so it cannot be "
                            f"downloaded there. Set SSMLM_DATA_DIR to a writable directory, or point {key} at an "
                            f"existing copy.")
        path.parent.mkdir(parents=True, exist_ok=True)
        with directory_lock(path.parent):
            if path.exists():  # another process fetched it while we waited for the lock
                continue
            try:
                _fetch(source, progress)
            except DataError as e:
                raise DataError(f"{key}: {e}") from None
        if not path.exists():
            raise DataError(f"{key}: the download source for {path} did not produce it; check data.sources.")

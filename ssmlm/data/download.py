"""Where a data file comes from: the user's copy, the corpus built into ssmlm, or a download.

A data config lists ``sources``: what stands in for one of its files when that file is missing. In order of
preference, :func:`resolve_files` uses

1. the file at the configured path (``paths.data_dir``, or a path you set), when it exists;
2. a ``builtin`` source: the copy shipped inside the package (:mod:`ssmlm.data.builtin_corpus`), decompressed
   once into ``data.cache_dir``; no network involved::

       {builtin: hindi/premchand, dir: <local dir>}     # <local dir>/train.txt -> hindi/premchand/train.txt

3. a download, only when ``data.download`` is true, to the configured path:

       {path: <local file>, hf_repo: owner/name, hf_file: <file in the repo>, revision: <commit or branch>}
       {path: <local file>, url: <https URL>, sha256: <hex or null>}
       {recipe: premchand, dir: <local dir>, repo: owner/name, commit: <sha>, sha256: {train.txt: <hex>, ...}}

Hugging Face files go through ``huggingface_hub.hf_hub_download`` (resumable, honours ``HF_ENDPOINT`` and
``HF_HUB_OFFLINE``), URLs through ``pooch`` (checksummed). Either way a file appears at its path only when
complete; a failed download leaves nothing there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from tqdm.auto import tqdm

from ssmlm.data import builtin_corpus
from ssmlm.data.files import atomic_file, directory_lock, sha256_of, writable_dir
from ssmlm.errors import DataError

log = logging.getLogger(__name__)

LOCAL_FILES_HINT = ("To use local copies instead, point the config at them (e.g. data.train_path=/path/to/train.txt) "
                    "or set SSMLM_DATA_DIR to a directory that holds the data layout; data.download=false never "
                    "fetches anything.")


def _progress_bar(name: str) -> tqdm:
    # total=1 until pooch sets the real size (pooch takes a bar whose total is falsy for "no bar")
    return tqdm(total=1, unit="B", unit_scale=True, unit_divisor=1024, desc=f"download {name}")


def download_url(url: str, dest: Path, sha256: str | None = None, progress: bool = True) -> Path:
    """Fetch ``url`` to ``dest`` with pooch: written to a temporary file, checked against ``sha256``, then
    renamed into place, so ``dest`` is either complete or absent."""
    import pooch
    import requests

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    pooch.get_logger().setLevel(logging.WARNING)  # the bar says it already
    downloader = pooch.HTTPDownloader(progressbar=_progress_bar(dest.name) if progress else False)
    try:
        pooch.retrieve(url, known_hash=f"sha256:{sha256.lower()}" if sha256 else None, fname=dest.name,
                       path=dest.parent, downloader=downloader, progressbar=progress)
    except requests.HTTPError as e:
        raise DataError(f"could not download {dest} from {url}: HTTP {e.response.status_code} "
                        f"{e.response.reason}. {LOCAL_FILES_HINT}") from None
    except (requests.RequestException, OSError) as e:
        raise DataError(f"could not download {dest} from {url} ({type(e).__name__}: no network?). "
                        f"{LOCAL_FILES_HINT}") from None
    except ValueError as e:  # pooch: the hash of the downloaded file differs; the file was not kept
        raise DataError(f"{url} downloaded for {dest} does not match the sha256 {sha256} of the data config "
                        f"({e}); nothing was kept. If the file changed upstream, update the sha256 in the data "
                        f"config.") from None
    return dest


def download_hf(repo: str, filename: str, dest: Path, revision: str | None = None, repo_type: str = "dataset",
                endpoint: str | None = None, progress: bool = True) -> Path:
    """Fetch ``filename`` of the Hugging Face repo ``repo`` to ``dest`` with ``hf_hub_download``.

    It downloads into ``dest``'s folder (``local_dir``), keeping an interrupted transfer under
    ``.cache/huggingface/`` there and resuming it next time; ``dest`` appears only when complete.
    """
    import huggingface_hub
    from huggingface_hub import utils as hf_utils  # its errors and progress switches, in every 0.2x-2.x release

    dest = Path(dest)
    if Path(filename).name != dest.name:
        raise DataError(f"the source of {dest} downloads {filename} from {repo}: the file names must match "
                        f"(check data.sources).")
    dest.parent.mkdir(parents=True, exist_ok=True)
    silence = not progress and not hf_utils.are_progress_bars_disabled()
    if silence:
        hf_utils.disable_progress_bars()
    try:
        got = huggingface_hub.hf_hub_download(
            repo, filename, repo_type=repo_type, revision=revision, local_dir=dest.parent, endpoint=endpoint)
    except (hf_utils.OfflineModeIsEnabled, hf_utils.LocalEntryNotFoundError) as e:
        raise DataError(f"could not download {dest} from the Hugging Face Hub ({repo}, {filename}): offline "
                        f"({type(e).__name__}). {LOCAL_FILES_HINT}") from None
    except (hf_utils.HfHubHTTPError, OSError) as e:
        raise DataError(f"could not download {dest} from the Hugging Face Hub ({repo}, {filename}): "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}. {LOCAL_FILES_HINT}") from None
    finally:
        if silence:
            hf_utils.enable_progress_bars()
    got = Path(got)
    if got.resolve() != dest.resolve():  # a subfolder in `filename`: move it to where the config expects it
        os.replace(got, dest)
    return dest


def check_file(path: Path, sha256: str | None) -> None:
    """Verify a file a source names against the sha256 the data config knows for it (if any)."""
    if sha256 is None:
        return
    actual = sha256_of(path)
    if actual != sha256.lower():
        raise DataError(f"{path} has sha256 {actual} but {sha256} was expected (it changed since it was "
                        f"downloaded, or it is not the published file). Delete it to download it again, or, if "
                        f"it is your own data, point the config at it under another path (or set "
                        f"data.download=false).")


def premchand_split(names: Sequence[str]) -> dict[str, list[str]]:
    """Story files by split: sorted by name, story i -> valid if i % 10 == 8, test if i % 10 == 9, else train."""
    splits: dict[str, list[str]] = {"train.txt": [], "valid.txt": [], "test.txt": []}
    for i, name in enumerate(sorted(names)):
        splits["valid.txt" if i % 10 == 8 else "test.txt" if i % 10 == 9 else "train.txt"].append(name)
    return splits


def build_premchand(source: Mapping, progress: bool = True) -> None:
    """Assemble the Premchand train/valid/test split (see ssmlm/data/builtin/README.md) from its GitHub repo.

    The story files ``input/<story>.txt`` at the pinned commit are sorted by file name and numbered from 0;
    story i goes to valid if i % 10 == 8, to test if i % 10 == 9, else to train. Each story is decoded as
    UTF-8, CRLF -> LF, stripped; a split is its stories joined with one blank line, plus a final newline.
    Each result must match its known sha256 before any file is written. (ssmlm ships this split built in:
    this recipe only runs when that copy is missing.)
    """
    out_dir = Path(source["dir"])
    repo, commit = source["repo"], source["commit"]
    list_url = (source.get("list_url") or "https://api.github.com/repos/{repo}/contents/input?ref={commit}").format(
        repo=repo, commit=commit)
    raw_url = source.get("raw_url") or "https://raw.githubusercontent.com/{repo}/{commit}/input/{name}"
    expected = dict(source["sha256"])
    stories_dir = out_dir / f".premchand-{commit[:12]}"

    listing = download_url(list_url, stories_dir / "listing.json", progress=False)
    try:
        entries = json.loads(listing.read_text(encoding="utf-8"))
        names = sorted(e["name"] for e in entries if isinstance(e, dict) and e.get("type", "file") == "file"
                       and e["name"].endswith(".txt") and e["name"] != "combined_data.txt")
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{list_url} did not return a JSON file listing ({e}).") from None
    if not names:
        raise DataError(f"{list_url} lists no input/*.txt story files.")
    for name in tqdm(names, desc=f"download {repo} stories", unit="file", disable=not progress):
        download_url(raw_url.format(repo=repo, commit=commit, name=name), stories_dir / name, progress=False)

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
        with atomic_file(out_dir / name) as f:
            f.write(data)
    shutil.rmtree(stories_dir)


RECIPES = {"premchand": build_premchand}


def _targets(source: Mapping) -> list[Path]:
    """The files a source produces (or, for a built-in source, stands in for)."""
    if "builtin" in source:
        return [Path(source["dir"]) / name for name in builtin_corpus.files(source["builtin"])]
    if "recipe" in source:
        return [Path(source["dir"]) / name for name in source["sha256"]]
    return [Path(source["path"])]


def _expected_sha256(source: Mapping, path: Path) -> str | None:
    if "builtin" in source:
        return builtin_corpus.checksums()[f"{source['builtin']}/{path.name}"]
    if "recipe" in source:
        return source["sha256"][path.name]
    return source.get("sha256")


def _where(source: Mapping) -> str:
    return source.get("url") or source.get("hf_repo") or source.get("repo") or "?"


def _fetch(source: Mapping, path: Path, progress: bool) -> None:
    if "recipe" in source:
        if source["recipe"] not in RECIPES:
            raise DataError(f"unknown download recipe {source['recipe']!r} in data.sources "
                            f"(known: {', '.join(RECIPES)})")
        RECIPES[source["recipe"]](source, progress=progress)
    elif "hf_repo" in source:
        download_hf(source["hf_repo"], source.get("hf_file") or path.name, path, revision=source.get("revision"),
                    repo_type=source.get("repo_type", "dataset"), endpoint=source.get("endpoint"),
                    progress=progress)
        expected = source.get("sha256")
        if expected and (actual := sha256_of(path)) != expected.lower():  # checked on arrival, as URLs are
            path.unlink()
            raise DataError(f"{path} as downloaded from {source['hf_repo']} has sha256 {actual}, not the {expected} "
                            f"data.sources names for it; it was removed. Check the source's revision and sha256.")
    else:
        download_url(source["url"], path, source.get("sha256"), progress=progress)


# what a failed download may leave in a folder it created, besides data worth keeping (a resumable partial file)
_BOOKKEEPING = ("CACHEDIR.TAG", ".gitignore", ".lock", ".metadata")


def _remove_if_no_data(folder: Path) -> None:
    """Remove a folder a failed download created, unless it holds a partial file the next try resumes."""
    if all(p.is_dir() or p.name.endswith(_BOOKKEEPING) for p in folder.rglob("*")):
        shutil.rmtree(folder, ignore_errors=True)


def resolve_files(required: Mapping[str, Path], sources: Sequence[Mapping], download: bool,
                  cache_dir: Path | None = None, progress: bool = True) -> dict[str, Path]:
    """The file to read for each required one (config key -> path), logging which copy each key uses.

    A path that exists is used as is (and verified when a source knows its checksum). A missing one is
    replaced by the built-in copy when a ``builtin`` source names it, else fetched to that path when
    ``download`` and a source names exactly that path, so a user's own (missing) file is never stood in for
    by public data of another name.
    """
    resolved = {}
    for key, path in required.items():
        path = Path(path)
        named_by = [s for s in sources if path.resolve() in {t.resolve() for t in _targets(s)}]
        if path.exists():
            if download and named_by:
                check_file(path, _expected_sha256(named_by[0], path))
            log.info("%s: %s", key, path)
            resolved[key] = path
            continue
        builtin = next((s for s in named_by if "builtin" in s), None)
        if builtin is not None and builtin_corpus.available(builtin["builtin"]):
            copy = builtin_corpus.extract(f"{builtin['builtin']}/{path.name}", cache_dir, key)
            log.info("%s: %s does not exist; using the copy built into ssmlm (%s/%s/%s.xz, decompressed to %s)",
                     key, path, builtin_corpus.PACKAGE_DIR, builtin["builtin"], path.name, copy)
            resolved[key] = copy
            continue
        source = next((s for s in named_by if "builtin" not in s), None)
        if not download or source is None:
            where = f"set data.download=true to fetch it from {_where(source)}, or " if source is not None else ""
            raise DataError(f"{key}: file not found: {path}. To fix: {where}point {key} at your copy "
                            f"({key}=/path/to/file) or set SSMLM_DATA_DIR to the directory holding the data.")
        nearest = next(d for d in (path.parent, *path.parent.parents) if d.exists())
        if not writable_dir(nearest):
            raise DataError(f"{key}: file not found: {path}, and its directory is read-only, so it cannot be "
                            f"downloaded there. Set SSMLM_DATA_DIR to a writable directory, or point {key} at an "
                            f"existing copy.")
        created = next((d for d in (*reversed(path.parent.parents), path.parent) if not d.exists()), None)
        path.parent.mkdir(parents=True, exist_ok=True)
        with directory_lock(path.parent):
            if not path.exists():  # else another process fetched it while we waited for the lock
                try:
                    _fetch(source, path, progress)
                except DataError as e:
                    if created is not None:
                        _remove_if_no_data(created)
                    raise DataError(f"{key}: {e}") from None
        if not path.exists():
            raise DataError(f"{key}: the download source for {path} did not produce it; check data.sources.")
        log.info("%s: %s (downloaded from %s)", key, path, _where(source))
        resolved[key] = path
    return resolved

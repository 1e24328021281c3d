"""Byte-level token files: a text file tokenised once, in blocks, into a memory-mappable uint16 array.

``<cache_dir>/tokens/<file>.<path hash>.u16.bin`` holds the ids (little-endian uint16, see
:class:`~ssmlm.data.tokenizers.ByteTokenizer`) and ``….u16.bin.json`` describes the source it was made from.
It is a derived file, so it goes to the cache dir (``data.cache_dir``), never next to the user's source data.

Freshness check, cheap for multi-GB sources: the cache is reused when the source's size and mtime are
unchanged *and* a fingerprint of its size, first and last MiB still matches (this catches edits that keep
size and mtime; an edit in the middle that keeps both is not caught — an accepted blind spot). When only the
mtime changed (a fresh copy or re-download), the full sha256 decides, so identical content is not
re-tokenised. A full sha256 at every start would cost seconds per GB, every run.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tqdm.auto import tqdm

from ssmlm.data.files import atomic_file, directory_lock, sha256_of, user_cache_dir
from ssmlm.data.tokenizers import BOUNDARY_LINE, encode_bytes
from ssmlm.errors import DataError

FORMAT = "ssmlm-byte-tokens-u16-v1"
BLOCK = 16 << 20
FINGERPRINT_BYTES = 1 << 20
SHOW_PROGRESS_BYTES = 64 << 20


def fingerprint(path: Path) -> str:
    """sha256 over the size, the first and the last MiB of a file."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        digest.update(f.read(FINGERPRINT_BYTES))
        f.seek(max(size - FINGERPRINT_BYTES, 0))
        digest.update(f.read(FINGERPRINT_BYTES))
    return digest.hexdigest()


def cache_path(source: Path, cache_dir: Path | None) -> Path:
    """Where the token file of ``source`` lives: under ``cache_dir`` (default: the per-user cache), named by
    the source's file name and a hash of its absolute path, so two sources never share a cache file."""
    tag = hashlib.sha1(str(source.resolve()).encode()).hexdigest()[:12]
    return Path(cache_dir or user_cache_dir()).expanduser() / "tokens" / f"{source.name}.{tag}.u16.bin"


def _meta_path(bin_path: Path) -> Path:
    return bin_path.with_name(bin_path.name + ".json")


def _is_fresh(bin_path: Path, source: Path) -> bool:
    try:
        meta = json.loads(_meta_path(bin_path).read_text())
        st = source.stat()
        if meta.get("format") != FORMAT or meta["size"] != st.st_size:
            return False
        if bin_path.stat().st_size != 2 * meta["num_tokens"]:
            return False
        if meta["mtime_ns"] == st.st_mtime_ns:
            return meta["fingerprint"] == fingerprint(source)
        if meta["sha256"] != sha256_of(source):
            return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    meta["mtime_ns"] = st.st_mtime_ns  # same content, new mtime: remember it so the next check is cheap
    try:
        _write_json(_meta_path(bin_path), meta)
    except OSError:
        pass
    return True


def _write_json(path: Path, obj: dict) -> None:
    with atomic_file(path) as f:
        f.write((json.dumps(obj, indent=1) + "\n").encode())


def tokenize_file(source: Path, bin_path: Path) -> int:
    """Stream ``source`` into ``bin_path`` block by block; returns the number of tokens.

    Blocks are cut after their last newline, so a separator line is never split between two blocks;
    the remainder is carried into the next block.
    """
    size = source.stat().st_size
    digest = hashlib.sha256()
    num_tokens = 0
    bar = tqdm(total=size, unit="B", unit_scale=True, desc=f"tokenize {source.name}",
               disable=size < SHOW_PROGRESS_BYTES)
    with open(source, "rb") as f, atomic_file(bin_path) as out, bar:
        carry, at_line_start = b"", True
        while block := f.read(BLOCK):
            digest.update(block)
            bar.update(len(block))
            chunk = carry + block
            cut = chunk.rfind(b"\n") + 1
            if cut == 0 and len(chunk) < len(BOUNDARY_LINE):
                carry = chunk  # too short to decide yet
                continue
            if cut == 0:  # a fragment of a long line: no newline, so no separator line inside
                tokens, carry, next_at_line_start = encode_bytes(chunk, at_line_start), b"", False
            else:
                tokens, carry, next_at_line_start = encode_bytes(chunk[:cut], at_line_start), chunk[cut:], True
            out.write(tokens.tobytes())
            num_tokens += len(tokens)
            at_line_start = next_at_line_start
        tokens = encode_bytes(carry, at_line_start)
        out.write(tokens.tobytes())
        num_tokens += len(tokens)
    st = source.stat()
    _write_json(_meta_path(bin_path), {
        "format": FORMAT, "source": str(source.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
        "fingerprint": fingerprint(source), "sha256": digest.hexdigest(), "num_tokens": num_tokens})
    return num_tokens


def token_file(source: Path, cache_dir: Path | None, key: str) -> Path:
    """The fresh token file of ``source``, tokenising it first if no fresh cache exists."""
    if source.stat().st_size == 0:
        raise DataError(f"{source} ({key}) is empty. Point {key} at a file with text in it.")
    bin_path = cache_path(source, cache_dir)
    if bin_path.exists() and _is_fresh(bin_path, source):
        return bin_path
    try:
        bin_path.parent.mkdir(parents=True, exist_ok=True)
        with directory_lock(bin_path.parent):
            if not (bin_path.exists() and _is_fresh(bin_path, source)):  # another rank may have built it
                tokenize_file(source, bin_path)
    except OSError as e:
        raise DataError(f"cannot write the token cache of {source} ({key}) into {bin_path.parent} ({e}). Set "
                        f"data.cache_dir (or SSMLM_CACHE_DIR) to a writable directory.") from None
    return bin_path

"""Tokenizers: Unicode characters (vocabulary from the training split) and UTF-8 bytes.

Both expose the same small interface, which the training module, checkpoints and generation rely on:

* ``encode(str) -> list[int]`` and ``decode(list[int]) -> str``;
* ``encode_array(str) -> np.ndarray`` — the vectorised form used to tokenise whole splits;
* ``vocab_size``, ``unit`` (``"char"`` or ``"byte"``);
* ``to_dict()`` / :func:`tokenizer_from_dict` — a JSON-able description stored in vocab.json and checkpoints;
* ``stream_decoder()`` — an object whose ``feed(ids) -> str`` returns text as soon as it is complete
  (a multi-byte UTF-8 character is held back until its last byte arrives) and ``flush() -> str``.
"""

from __future__ import annotations

import codecs
import unicodedata
from collections.abc import Iterable, Sequence

import numpy as np

PAD, UNK = "<pad>", "<unk>"
BOUNDARY = "<|endoftext|>"
BOUNDARY_LINE = (BOUNDARY + "\n").encode()
UNKNOWN_TEXT = "\ufffd"  # what <unk> (or an id outside the vocabulary) decodes to


def codepoints(text: str) -> np.ndarray:
    """The Unicode code points of ``text`` as a uint32 array (one C-level copy, no per-character Python)."""
    return np.frombuffer(text.encode("utf-32-le"), dtype="<u4")


def nfc(text: str) -> str:
    return text if unicodedata.is_normalized("NFC", text) else unicodedata.normalize("NFC", text)


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype holding every id (uint16 for any realistic character vocabulary)."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


class CharTokenizer:
    """One id per Unicode character (after NFC normalisation).

    Ids: 0 = ``<pad>`` (input filler of a padded evaluation window; its targets are ignored), 1 = ``<unk>``
    (any character the training split did not contain), then the training characters in code-point order.
    """

    unit = "char"
    pad_id = 0
    unk_id = 1

    def __init__(self, chars: Sequence[str]):
        chars = list(chars)
        if any(not isinstance(c, str) or len(c) != 1 for c in chars):
            raise ValueError("every vocabulary entry must be a single character")
        if len(set(chars)) != len(chars):
            raise ValueError("the vocabulary lists a character twice")
        self.chars = chars
        self.dtype = token_dtype(self.vocab_size)
        # code point -> id lookup table (at most 1.1M entries; a few KB for one script)
        cps = np.array([ord(c) for c in chars], dtype=np.int64)
        self._lut = np.full(int(cps.max(initial=0)) + 1, self.unk_id, dtype=self.dtype)
        self._lut[cps] = np.arange(2, len(chars) + 2)
        self._id_to_text = ["", UNKNOWN_TEXT, *chars]  # <pad> decodes to nothing

    @classmethod
    def build(cls, text: str) -> CharTokenizer:
        """The vocabulary of ``text`` (already NFC-normalised): its distinct characters."""
        return cls([chr(c) for c in np.unique(codepoints(text))])

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + 2

    def encode_array(self, text: str, normalized: bool = False) -> np.ndarray:
        """Ids of ``text`` (NFC-normalised first unless ``normalized`` says it already is)."""
        cps = codepoints(text if normalized else nfc(text))
        known = cps < len(self._lut)
        return np.where(known, self._lut[np.where(known, cps, 0)], self.unk_id).astype(self.dtype, copy=False)

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def decode(self, ids: Iterable[int]) -> str:
        table, n = self._id_to_text, len(self._id_to_text)
        return "".join(table[i] if 0 <= i < n else UNKNOWN_TEXT for i in map(int, ids))

    def stream_decoder(self) -> _CharStream:
        return _CharStream(self)

    def to_dict(self) -> dict:
        return {"unit": self.unit, "specials": [PAD, UNK], "chars": self.chars}

    @classmethod
    def from_dict(cls, d: dict) -> CharTokenizer:
        if not isinstance(d, dict) or d.get("unit") != cls.unit:
            raise ValueError(f"not a character vocabulary (unit={d.get('unit') if isinstance(d, dict) else d!r})")
        if d.get("specials") != [PAD, UNK] or not isinstance(d.get("chars"), list):
            raise ValueError("expected keys 'specials': ['<pad>', '<unk>'] and 'chars': [list of characters]")
        return cls(d["chars"])

    def __eq__(self, other) -> bool:
        return isinstance(other, CharTokenizer) and other.chars == self.chars


class ByteTokenizer:
    """UTF-8 bytes (ids 0-255) plus one document-boundary token, id 256.

    Each separator *line* ``<|endoftext|>\\n`` (the TinyStories story separator, at the start of a line)
    becomes the single id 256, and 256 decodes back to ``<|endoftext|>\\n``, so encode/decode round-trip
    byte-exactly. The string ``<|endoftext|>`` anywhere else stays ordinary bytes.
    """

    unit = "byte"
    vocab_size = 257
    boundary_id = 256
    pad_id = 0
    dtype = np.dtype("<u2")

    def encode_array(self, text: str) -> np.ndarray:
        return encode_bytes(text.encode("utf-8"))

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def decode(self, ids: Iterable[int]) -> str:
        stream = self.stream_decoder()
        return stream.feed(ids) + stream.flush()

    def stream_decoder(self) -> _ByteStream:
        return _ByteStream()

    def to_dict(self) -> dict:
        return {"unit": self.unit, "boundary": BOUNDARY}

    @classmethod
    def from_dict(cls, d: dict) -> ByteTokenizer:
        if not isinstance(d, dict) or d.get("unit") != cls.unit or d.get("boundary") != BOUNDARY:
            raise ValueError(f"not a byte vocabulary: {d!r}")
        return cls()

    def __eq__(self, other) -> bool:
        return isinstance(other, ByteTokenizer)


def encode_bytes(data: bytes, at_line_start: bool = True) -> np.ndarray:
    """UTF-8 bytes -> uint16 ids, each separator line replaced by the boundary id (vectorised).

    ``at_line_start`` says whether ``data[0]`` begins a line (False for a block cut in mid-line).
    """
    raw = np.frombuffer(data, dtype=np.uint8)
    pattern = np.frombuffer(BOUNDARY_LINE, dtype=np.uint8)
    width = len(pattern)
    # candidates: every '<' (rare in text), narrowed byte by byte to full matches
    starts = np.flatnonzero(raw[: max(len(raw) - width + 1, 0)] == pattern[0])
    for k in range(1, width):
        starts = starts[raw[starts + k] == pattern[k]]
    line_start = np.zeros(len(starts), dtype=bool)
    line_start[starts > 0] = raw[starts[starts > 0] - 1] == ord("\n")
    line_start[starts == 0] = at_line_start
    starts = starts[line_start]
    if len(starts) == 0:
        return raw.astype("<u2")
    # drop all but the first byte of each separator line, then turn that byte into the boundary id
    keep = np.ones(len(raw), dtype=bool)
    keep[(starts[:, None] + np.arange(1, width)).ravel()] = False
    tokens = raw[keep].astype("<u2")
    tokens[starts - (width - 1) * np.arange(len(starts))] = ByteTokenizer.boundary_id
    return tokens


class _CharStream:
    def __init__(self, tokenizer: CharTokenizer):
        self._tokenizer = tokenizer

    def feed(self, ids: int | Iterable[int]) -> str:
        return self._tokenizer.decode([ids] if isinstance(ids, int) else ids)

    def flush(self) -> str:
        return ""


class _ByteStream:
    """Incremental UTF-8 decoding: a character split across steps is emitted once it is complete."""

    def __init__(self):
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, ids: int | Iterable[int]) -> str:
        out, pending = [], bytearray()
        for i in [ids] if isinstance(ids, int) else map(int, ids):
            if 0 <= i < 256:
                pending.append(i)
                continue
            # a boundary (or an invalid id) ends any half-finished character
            out.append(self._utf8.decode(bytes(pending), final=True))
            pending.clear()
            self._utf8.reset()
            out.append(BOUNDARY + "\n" if i == ByteTokenizer.boundary_id else UNKNOWN_TEXT)
        out.append(self._utf8.decode(bytes(pending)))
        return "".join(out)

    def flush(self) -> str:
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text


def tokenizer_from_dict(d: dict) -> CharTokenizer | ByteTokenizer:
    """Rebuild a tokenizer from its ``to_dict()`` (vocab.json, checkpoint hyper-parameters)."""
    unit = d.get("unit") if isinstance(d, dict) else None
    if unit == CharTokenizer.unit:
        return CharTokenizer.from_dict(d)
    if unit == ByteTokenizer.unit:
        return ByteTokenizer.from_dict(d)
    if unit == "token":  # the synthetic tasks' named tokens
        from ssmlm.data.synthetic import TaskTokenizer

        return TaskTokenizer.from_dict(d)
    raise ValueError(f"unknown tokenizer unit {unit!r} (expected 'char', 'byte' or 'token')")

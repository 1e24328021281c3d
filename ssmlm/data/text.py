"""Reading UTF-8 text splits: plain text or Kaldi-style transcripts, NFC-normalised.

A Kaldi ``text`` file has one utterance per line, ``<utterance-id><TAB or spaces><transcript>``. Its ids are
dropped and the transcripts kept one per line, so the model learns the language, not the id scheme.
"""

from __future__ import annotations

import re
from pathlib import Path

from ssmlm.data.tokenizers import nfc
from ssmlm.errors import DataError

FORMATS = ("auto", "plain", "kaldi")

# An utterance id: one ASCII token with at least one digit (01-00003-01, spk1_utt0007, S01.u12, ...).
_UTTERANCE_ID = re.compile(r"[A-Za-z0-9_.:/+\-]*[0-9][A-Za-z0-9_.:/+\-]*")
_FIRST_FIELD = re.compile(r"[^ \t]*")
_DETECT_SAMPLE_LINES = 2000


def detect_format(text: str) -> str:
    """``"kaldi"`` when the file looks like ``id transcript`` lines, else ``"plain"``.

    Judged on the first 2000 lines: at least 95% of the non-blank lines start with an id-like token
    followed by a space or TAB (or are the id alone), those ids are all distinct, and at most 1% of the
    lines are blank (prose has paragraph breaks; Kaldi files have none).
    """
    lines = text.split("\n", _DETECT_SAMPLE_LINES)[:_DETECT_SAMPLE_LINES]
    if lines and lines[-1] == "":
        lines.pop()  # the file's final newline
    filled = [line for line in lines if line.strip()]
    if not filled:
        return "plain"
    ids = []
    for line in filled:
        first = _FIRST_FIELD.match(line).group()  # empty when the line starts with a blank
        if _UTTERANCE_ID.fullmatch(first):
            ids.append(first)
    id_lines_enough = len(ids) >= 0.95 * len(filled)
    blank_lines_few = len(lines) - len(filled) <= 0.01 * len(lines)
    return "kaldi" if id_lines_enough and len(set(ids)) == len(ids) and blank_lines_few else "plain"


def kaldi_transcripts(text: str) -> str:
    """The transcripts of a Kaldi ``text`` file, one per line, ids and surrounding blanks removed.

    Utterances with an empty transcript are skipped.
    """
    out = []
    for line in text.split("\n"):
        parts = line.split(None, 1)
        if len(parts) == 2 and parts[1].strip():
            out.append(parts[1].strip())
    return "\n".join(out) + "\n" if out else ""


def read_text(path: Path, fmt: str, key: str) -> str:
    """The text of one split, decoded, with CRLF -> LF, Kaldi ids removed (if Kaldi) and NFC-normalised.

    ``key`` is the config key that named the file (``data.train_path``), for error messages.
    """
    if fmt not in FORMATS:
        raise DataError(f"data.format={fmt!r} is not one of {', '.join(FORMATS)}")
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(f"{path} ({key}) is empty. Point {key} at a file with text in it.")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"{path} ({key}) is not valid UTF-8: byte 0x{raw[e.start]:02x} at byte offset {e.start} (line {line}) "
            f"({e.reason}). Convert the file to UTF-8 (e.g. `iconv -f <its encoding> -t UTF-8 in.txt > out.txt`) "
            f"and point {key} at the result.") from None
    text = text.removeprefix("\ufeff").replace("\r\n", "\n")
    if (detect_format(text) if fmt == "auto" else fmt) == "kaldi":
        text = kaldi_transcripts(text)
        if not text:
            raise DataError(f"{path} ({key}) read as Kaldi `id transcript` lines has no transcripts. "
                            f"If it is plain text, set data.format=plain.")
    return nfc(text)


def line_cuts(length: int, fractions: list[float], find_newline) -> list[int]:
    """Cut points splitting a sequence into consecutive parts of roughly ``fractions``, each at a line end.

    ``find_newline(i)`` returns the index of the first newline at or after ``i`` (or ``length``); a cut is
    placed just after it, so no line is divided. Returns ``len(fractions) + 1`` offsets from 0 to ``length``.
    """
    total = sum(fractions)
    cuts, acc = [0], 0.0
    for f in fractions[:-1]:
        acc += f
        target = max(int(length * acc / total), cuts[-1])
        cuts.append(min(find_newline(target) + 1, length))
    cuts.append(length)
    return cuts

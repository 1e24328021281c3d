"""Lightning data modules: text files -> one token array per split -> batches of (x, y) windows.

:class:`TokenDataModule` holds everything the two units share (file checks and downloads, vocab.json,
carving missing splits, windows, entropy, resumable sampling); :class:`CharDataModule` and
:class:`ByteDataModule` only say how a split's file becomes a token array.

Usage::

    dm = hydra.utils.instantiate(cfg.data); dm.prepare_data(); dm.setup("fit")
    model = instantiate(cfg.model, vocab_size=dm.vocab_size)
    for x, y in dm.train_dataloader(): ...   # LongTensor (batch_size, seq_len); y = next tokens, -100 = ignore

Splits without a file (``val_path`` / ``test_path`` null) are carved from the end of the training file,
by lines: with ``split_fractions: [0.9, 0.05, 0.05]`` and both null, train keeps the first ~90% of the
tokens, val the next ~5%, test the rest, each cut placed just after a newline.

Under DDP, the training loader shards windows by rank itself: set ``Trainer(use_distributed_sampler=False)``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import lightning as L
import numpy as np

from ssmlm.data import byte_cache
from ssmlm.data.download import resolve_files
from ssmlm.data.files import atomic_file
from ssmlm.data.text import FORMATS, line_cuts, read_text
from ssmlm.data.tokenizers import ByteTokenizer, CharTokenizer, tokenizer_from_dict
from ssmlm.data.windows import SAMPLING, TokenArray, make_loader
from ssmlm.errors import ConfigError, DataError

SPLITS = ("train", "val", "test")
KEYS = {"train": "data.train_path", "val": "data.val_path", "test": "data.test_path"}
STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
_SCAN_BLOCK = 1 << 22  # tokens per block when scanning a memory-mapped split


class TokenDataModule(L.LightningDataModule):
    """The shared pipeline. A subclass defines ``_tokenize_splits(names)``, which sets ``self.tokenizer`` and
    ``self.splits[name]`` (a :class:`TokenArray`) for each requested split."""

    tokenizer_cls: type  # the subclass's tokenizer: what a reused vocab.json must hold

    def __init__(self, train_path: str, val_path: str | None = None, test_path: str | None = None, *,
                 seq_len: int = 256, batch_size: int = 32, sampling: str = "chunks", num_workers: int = 0,
                 seed: int = 0, vocab_path: str | None = None, download: bool = False,
                 sources: Sequence[Mapping] = (), split_fractions: Sequence[float] = (0.9, 0.05, 0.05),
                 cache_dir: str | None = None, progress: bool = True):
        super().__init__()
        if not isinstance(seq_len, int) or seq_len < 1:
            raise ConfigError(f"data.seq_len={seq_len!r} must be a positive integer")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"data.batch_size={batch_size!r} must be a positive integer")
        if sampling not in SAMPLING:
            raise ConfigError(f"data.sampling={sampling!r} must be one of {', '.join(SAMPLING)}")
        if len(split_fractions) != 3 or min(split_fractions) <= 0:
            raise ConfigError(f"data.split_fractions={list(split_fractions)} must be three positive numbers "
                              f"(train, val, test)")
        self.paths = {"train": Path(train_path), "val": _optional_path(val_path), "test": _optional_path(test_path)}
        self.seq_len, self.batch_size, self.sampling = seq_len, batch_size, sampling
        self.num_workers, self.seed = num_workers, seed
        self.vocab_path = _optional_path(vocab_path)
        self.download, self.sources, self.progress = download, list(sources), progress
        # derived files (decompressed built-in corpus, token caches); None: the per-user cache dir
        self.cache_dir = _optional_path(cache_dir)
        self.files: dict[str, Path] = {}  # split -> the file actually read (see download.resolve_files)
        self.split_fractions = list(split_fractions)
        self.tokenizer: CharTokenizer | ByteTokenizer | None = None
        self.splits: dict[str, TokenArray] = {}
        self._train_loader = None
        self._resume: tuple[int, int] | None = None
        self._entropy: float | None = None

    # ----------------------------------------------------------------------------------------- files, splits
    @property
    def carved(self) -> list[str]:
        """The splits cut from the training file because their path is null."""
        return [s for s in ("val", "test") if self.paths[s] is None]

    def _ensure(self, names) -> None:
        """Find (or fetch) the file of each named split once; ``self.files`` then says which copy is read."""
        needed = {s for s in names if self.paths[s] is not None}
        if set(names) & set(self.carved):
            needed.add("train")
        missing = [s for s in SPLITS if s in needed and s not in self.files]
        if missing:
            found = resolve_files({KEYS[s]: self.paths[s] for s in missing}, self.sources, self.download,
                                  self.cache_dir, self.progress)
            self.files.update({s: found[KEYS[s]] for s in missing})

    def _carve(self, length: int, find_newline) -> dict[str, tuple[int, int]]:
        """(start, stop) of train and of each carved split inside the training file."""
        names = ["train", *self.carved]
        fractions = [self.split_fractions[SPLITS.index(s)] for s in names]
        cuts = line_cuts(length, fractions, find_newline)
        return {name: (cuts[i], cuts[i + 1]) for i, name in enumerate(names)}

    def prepare_data(self) -> None:
        """Fetch missing files (``download: true``); subclasses also build their token caches here."""
        self._ensure(SPLITS)

    def setup(self, stage: str | None = None) -> None:
        names = [s for s in STAGE_SPLITS.get(stage, SPLITS) if s not in self.splits]
        if names:
            self._ensure(names)
            # the subclass sets self.tokenizer and self.splits[name] for each name (and for whatever it read)
            self._tokenize_splits(names)
        self._check_sizes()

    def _check_sizes(self) -> None:
        train = self.splits.get("train")
        if train is not None and len(train) - 1 < self.seq_len:
            raise DataError(f"data.seq_len={self.seq_len} is longer than the training split "
                            f"({self._describe('train')}: {len(train)} tokens). Lower data.seq_len or use more data.")
        if train is not None and (len(train) - 1) // self.seq_len < self.batch_size:
            raise DataError(f"the training split ({self._describe('train')}) holds only "
                            f"{(len(train) - 1) // self.seq_len} windows of data.seq_len={self.seq_len}, fewer than "
                            f"data.batch_size={self.batch_size}. Lower data.batch_size or data.seq_len.")
        for name in ("val", "test"):
            if name in self.splits and len(self.splits[name]) < 2:
                raise DataError(f"the {name} split ({self._describe(name)}) has {len(self.splits[name])} tokens; "
                                f"at least 2 are needed to score one prediction.")

    def _describe(self, name: str) -> str:
        if self.paths[name] is not None:
            return f"{self.files.get(name, self.paths[name])} ({KEYS[name]})"
        return f"carved from {self.files.get('train', self.paths['train'])} because {KEYS[name]} is null"

    # ------------------------------------------------------------------------------------------- tokenizer
    def _load_or_save_tokenizer(self, build):
        """Reuse ``vocab_path`` when it exists, else ``build()`` the tokenizer and save it there."""
        if self.vocab_path is not None and self.vocab_path.exists():
            try:
                tokenizer = tokenizer_from_dict(json.loads(self.vocab_path.read_text(encoding="utf-8")))
            except (ValueError, UnicodeDecodeError) as e:
                raise DataError(f"{self.vocab_path} (data.vocab_path) is not a valid vocabulary file ({e}). Delete "
                                f"it to rebuild the vocabulary from the training split, or point data.vocab_path at "
                                f"the vocab.json of the run you mean.") from None
            if not isinstance(tokenizer, self.tokenizer_cls):
                raise DataError(f"{self.vocab_path} (data.vocab_path) holds a {tokenizer.unit}-level vocabulary, but "
                                f"this data config is {self.tokenizer_cls.unit}-level. Point data.vocab_path "
                                f"elsewhere (a new run directory).")
            return tokenizer
        tokenizer = build()
        if self.vocab_path is not None:
            with atomic_file(self.vocab_path) as f:
                f.write((json.dumps(tokenizer.to_dict(), ensure_ascii=False, indent=1) + "\n").encode("utf-8"))
        return tokenizer

    @property
    def vocab_size(self) -> int:
        if self.tokenizer is None:
            raise RuntimeError("the vocabulary is known after setup(); call dm.setup('fit') first")
        return self.tokenizer.vocab_size

    # ---------------------------------------------------------------------------------------------- loaders
    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _loader(self, name: str, mode: str):
        if name not in self.splits:
            self.setup({"train": "fit", "val": "validate", "test": "test"}[name])
        rank, world_size = self._rank()
        return make_loader(self.splits[name], self.seq_len, self.batch_size, mode, self.seed, self.num_workers,
                           rank, world_size, pad_id=self.tokenizer.pad_id)

    def train_dataloader(self):
        loader = self._loader("train", self.sampling)
        if len(loader) == 0:
            raise DataError(f"the training split ({self._describe('train')}) gives no full batch per rank: "
                            f"{len(loader.batch_sampler.sampler)} windows for batch_size {self.batch_size}. Lower "
                            f"data.batch_size or data.seq_len.")
        loader.owner, self._train_loader = self, loader
        self._apply_resume()
        return loader

    def val_dataloader(self):
        return self._loader("val", "eval")

    def test_dataloader(self):
        return self._loader("test", "eval")

    # ------------------------------------------------------------------------------------------ statistics
    def unigram_entropy_bits(self) -> float:
        """Entropy (bits/token) of the training split's unigram distribution: the loss floor of a model
        that ignores context."""
        if self._entropy is None:
            if "train" not in self.splits:
                self.setup("fit")
            data = self.splits["train"].data
            counts = np.zeros(self.vocab_size, dtype=np.int64)
            for i in range(0, len(data), _SCAN_BLOCK):
                counts += np.bincount(data[i:i + _SCAN_BLOCK], minlength=self.vocab_size)
            p = counts[counts > 0] / counts.sum()
            self._entropy = float(-(p * np.log2(p)).sum())
        return self._entropy

    # ------------------------------------------------------------------------------------- resumable state
    def state_dict(self) -> dict:
        """Where the training sampler is: the epoch and the batches of it already trained on."""
        loader = self._train_loader
        if loader is None:
            return {} if self._resume is None else {"epoch": self._resume[0], "batches_done": self._resume[1]}
        trainer = self.trainer
        if trainer is not None and getattr(trainer.state, "fn", None) == "fit":
            # Lightning fetches one batch ahead, so the loader's own count would be one too many
            epoch = trainer.fit_loop.epoch_progress.current.processed
            done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        else:
            epoch, done = loader.batch_sampler.sampler.epoch, loader.batches_done
        return {"epoch": int(epoch), "batches_done": int(done)}

    def load_state_dict(self, state_dict: dict) -> None:
        if not state_dict:
            return
        self._resume = (int(state_dict["epoch"]), int(state_dict["batches_done"]))
        self._apply_resume()

    def _apply_resume(self) -> None:
        """Hand a loaded state to the training loader (once), which then skips the batches already seen."""
        if self._resume is not None and self._train_loader is not None:
            self._train_loader.batch_sampler.sampler.set_epoch(self._resume[0])
            self._train_loader.batch_sampler.resume(*self._resume)
            self._resume = None


def _optional_path(value: str | None) -> Path | None:
    return Path(value).expanduser() if value else None


def _next_newline_in_tokens(data: np.ndarray, i: int, newline_ids: tuple[int, ...]) -> int:
    """Index of the first token in ``newline_ids`` at or after ``i`` (``len(data)`` if none), scanning in blocks."""
    while i < len(data):
        block = data[i:i + _SCAN_BLOCK]
        hits = np.flatnonzero(np.isin(block, newline_ids))
        if len(hits):
            return i + int(hits[0])
        i += len(block)
    return len(data)


class CharDataModule(TokenDataModule):
    """UTF-8 text at character level (Indic scripts included): plain text or Kaldi ``id transcript`` files.

    Text is NFC-normalised; the vocabulary (``<pad>`` = 0, ``<unk>`` = 1, then the characters of the
    training split in code-point order) is built from the training split only and saved to ``vocab_path``;
    an existing ``vocab_path`` is reused as is (characters it lacks become ``<unk>``). Each split is
    tokenised once, in numpy, at setup.
    """

    tokenizer_cls = CharTokenizer

    def __init__(self, *args, format: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        if format not in FORMATS:
            raise ConfigError(f"data.format={format!r} must be one of {', '.join(FORMATS)}")
        self.format = format

    def _tokenize_splits(self, names: list[str]) -> None:
        vocab_saved = self.vocab_path is not None and self.vocab_path.exists()
        texts = {}
        if "train" in names or set(names) & set(self.carved) or (self.tokenizer is None and not vocab_saved):
            self._ensure(["train"])
            train = read_text(self.files["train"], self.format, KEYS["train"])
            for name, (start, stop) in self._carve(len(train), lambda i: _find(train, "\n", i)).items():
                texts[name] = train[start:stop]
        for name in names:
            if name not in texts:
                texts[name] = read_text(self.files[name], self.format, KEYS[name])
        if self.tokenizer is None:
            self.tokenizer = self._load_or_save_tokenizer(lambda: CharTokenizer.build(texts["train"]))
        for name, text in texts.items():
            self.splits.setdefault(name, TokenArray(self.tokenizer.encode_array(text, normalized=True)))


def _find(text: str, sub: str, start: int) -> int:
    i = text.find(sub, start)
    return len(text) if i < 0 else i


class ByteDataModule(TokenDataModule):
    """UTF-8 bytes (ids 0-255) plus a document-boundary token (id 256) for each ``<|endoftext|>`` line.

    Each file is tokenised once, streaming, into a memory-mapped ``.u16.bin`` cache under ``cache_dir``
    (never next to the source), so multi-GB corpora never sit in RAM.
    """

    tokenizer_cls = ByteTokenizer

    def _token_array(self, name: str) -> TokenArray:
        return TokenArray(path=byte_cache.token_file(self.files[name], self.cache_dir, KEYS[name]))

    def prepare_data(self) -> None:
        super().prepare_data()
        for name in SPLITS:
            if self.paths[name] is not None:
                self._token_array(name)

    def _tokenize_splits(self, names: list[str]) -> None:
        if self.tokenizer is None:
            self.tokenizer = self._load_or_save_tokenizer(ByteTokenizer)
        if "train" in names or set(names) & set(self.carved):
            whole = self._token_array("train")

            def find_line_end(i: int) -> int:  # a boundary token ends a line too ("<|endoftext|>\n")
                return _next_newline_in_tokens(whole.data, i, (ord("\n"), ByteTokenizer.boundary_id))

            for name, (start, stop) in self._carve(len(whole), find_line_end).items():
                self.splits.setdefault(name, whole.slice(start, stop))
        for name in names:
            if name not in self.splits:
                self.splits[name] = self._token_array(name)

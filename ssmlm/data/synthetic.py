"""Synthetic recall tasks, generated on the fly: where selective (input-dependent) SSMs and LTI SSMs part ways.

* ``selective_copying`` (Mamba paper, sec. 3.1): ``n_memorize`` data tokens scattered at random positions of a
  stretch of noise tokens, then a separator; the model must output the data tokens in order.
* ``induction_heads``: random tokens with one trigger ``*`` followed by a target; the sequence ends with the
  trigger again and the model must output the token that followed it the first time.
* ``mqar`` (multi-query associative recall, Zoology): ``n_memorize`` key-value pairs, then each key again at a
  random later position, where the model must output its value.

Every batch is drawn with vectorised torch ops from a generator seeded by (seed, split, epoch, batch), so a run is
reproducible and resumes exactly mid-epoch; the validation and test sets are fixed (their own seeds). Targets are
-100 everywhere but at the answer positions, so the trainer's ``acc`` is the task accuracy.
"""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from ssmlm.data.windows import TokenArray
from ssmlm.errors import ConfigError

IGNORE_INDEX = -100
TASKS = ("selective_copying", "induction_heads", "mqar")
PAD, NOISE, SEP, TRIGGER = "<pad>", ".", "|", "*"
# each task's special tokens, after <pad>; the data tokens t0..t{n-1} (and for mqar the values v0..) follow
SPECIALS = {"selective_copying": [NOISE, SEP], "induction_heads": [TRIGGER], "mqar": [NOISE]}
SPLIT_SEED = {"train": 0, "val": 1, "test": 2}


class TaskTokenizer:
    """One id per named symbol (``<pad>`` = 0); text is the names separated by spaces, e.g. ``". t3 . | t3"``."""

    unit = "token"
    pad_id = 0

    def __init__(self, names: list[str]):
        if len(set(names)) != len(names) or names[:1] != [PAD]:
            raise ValueError("token names must be distinct and start with '<pad>'")
        self.names = list(names)
        self._ids = {name: i for i, name in enumerate(self.names)}

    @property
    def vocab_size(self) -> int:
        return len(self.names)

    def encode(self, text: str) -> list[int]:
        unknown = [w for w in text.split() if w not in self._ids]
        if unknown:
            raise ValueError(f"unknown token name(s) {unknown[:5]}; known: {' '.join(self.names)}")
        return [self._ids[w] for w in text.split()]

    def decode(self, ids) -> str:
        return " ".join(self.names[i] if 0 <= i < len(self.names) else "?" for i in map(int, ids))

    def stream_decoder(self) -> _TokenStream:
        return _TokenStream(self)

    def to_dict(self) -> dict:
        return {"unit": self.unit, "names": self.names}

    @classmethod
    def from_dict(cls, d: dict) -> TaskTokenizer:
        if not isinstance(d, dict) or d.get("unit") != cls.unit or not isinstance(d.get("names"), list):
            raise ValueError(f"not a task vocabulary: {d!r}")
        return cls(d["names"])

    def __eq__(self, other) -> bool:
        return isinstance(other, TaskTokenizer) and other.names == self.names


class _TokenStream:
    def __init__(self, tokenizer: TaskTokenizer):
        self._tokenizer = tokenizer

    def feed(self, ids) -> str:
        ids = [ids] if isinstance(ids, int) else list(ids)
        return "".join(self._tokenizer.decode([i]) + " " for i in ids)

    def flush(self) -> str:
        return ""


def task_tokenizer(task: str, n_tokens: int) -> TaskTokenizer:
    values = [f"v{i}" for i in range(n_tokens)] if task == "mqar" else []
    return TaskTokenizer([PAD, *SPECIALS[task], *(f"t{i}" for i in range(n_tokens)), *values])


# --- generators: (x, y) LongTensors (n, seq_len); y = -100 but at the answers -----------------------------------
def _random_positions(n: int, span: int, count: int, g: torch.Generator) -> torch.Tensor:
    """(n, count) distinct positions in [0, span) per row, ascending."""
    return torch.rand(n, span, generator=g).argsort(dim=1)[:, :count].sort(dim=1).values


def selective_copying(n: int, seq_len: int, n_memorize: int, n_tokens: int, g: torch.Generator):
    """Noise with ``n_memorize`` data tokens scattered in its first ``seq_len - n_memorize`` positions, a
    separator, then the data tokens again (teacher-forced); only the copied tokens are scored."""
    noise, sep, first = 1, 2, 3
    context = seq_len - n_memorize
    data = first + torch.randint(n_tokens, (n, n_memorize), generator=g)
    seq = torch.full((n, seq_len + 1), noise, dtype=torch.long)
    seq.scatter_(1, _random_positions(n, context, n_memorize, g), data)
    seq[:, context] = sep
    seq[:, context + 1:] = data
    y = torch.full((n, seq_len), IGNORE_INDEX, dtype=torch.long)
    y[:, context:] = data  # input position context is the separator: it predicts the first data token
    return seq[:, :-1], y


def induction_heads(n: int, seq_len: int, n_memorize: int, n_tokens: int, g: torch.Generator):
    """Random data tokens with the trigger at one random position p followed by the target; the last input is the
    trigger again, and its target (the only one scored) is the token at p + 1."""
    trigger, first = 1, 2
    seq = first + torch.randint(n_tokens, (n, seq_len), generator=g)
    rows = torch.arange(n)
    p = torch.randint(seq_len - 2, (n,), generator=g)  # p + 1 <= seq_len - 2: before the final trigger
    seq[rows, p] = trigger
    seq[:, -1] = trigger
    y = torch.full((n, seq_len), IGNORE_INDEX, dtype=torch.long)
    y[:, -1] = seq[rows, p + 1]
    return seq, y


def mqar(n: int, seq_len: int, n_memorize: int, n_tokens: int, g: torch.Generator):
    """``n_memorize`` pairs ``k v`` (distinct keys) up front, then every key once more, in random order, at random
    positions of a noise stretch; each query's target is its value (the next input is noise, as in Zoology)."""
    noise, first_key = 1, 2
    first_value = first_key + n_tokens
    keys = first_key + torch.rand(n, n_tokens, generator=g).argsort(dim=1)[:, :n_memorize]
    values = first_value + torch.randint(n_tokens, (n, n_memorize), generator=g)
    x = torch.full((n, seq_len), noise, dtype=torch.long)
    x[:, 0:2 * n_memorize:2], x[:, 1:2 * n_memorize:2] = keys, values
    order = torch.rand(n, n_memorize, generator=g).argsort(dim=1)  # which pair each query asks for
    where = 2 * n_memorize + _random_positions(n, seq_len - 2 * n_memorize, n_memorize, g)
    x.scatter_(1, where, keys.gather(1, order))
    y = torch.full((n, seq_len), IGNORE_INDEX, dtype=torch.long)
    y.scatter_(1, where, values.gather(1, order))
    return x, y


GENERATORS = {"selective_copying": selective_copying, "induction_heads": induction_heads, "mqar": mqar}


def _min_seq_len(task: str, n_memorize: int) -> int:
    return {"selective_copying": 2 * n_memorize, "induction_heads": 4, "mqar": 3 * n_memorize}[task]


class SyntheticBatches:
    """The training loader: ``n_batches`` freshly drawn batches per epoch, each from its own seeded generator.

    The epoch is Lightning's when a trainer is attached (else counted here); a resumed run skips the batches it
    already trained on (cheap: skipped batches are not drawn)."""

    def __init__(self, owner: SyntheticDataModule, n_batches: int):
        self.owner, self.n_batches = owner, n_batches
        self.next_epoch, self.skip = 0, None  # skip: (epoch, batches already trained) of a resumed run

    def __len__(self) -> int:
        return self.n_batches

    def resume(self, epoch: int, batches_done: int) -> None:
        self.next_epoch, self.skip = epoch, (epoch, batches_done)

    def __iter__(self):
        trainer = self.owner.trainer
        epoch = trainer.current_epoch if trainer is not None else self.next_epoch
        start = self.skip[1] if self.skip is not None and self.skip[0] == epoch else 0
        self.next_epoch, self.skip = epoch + 1, None
        for i in range(start, self.n_batches):
            yield self.owner.draw("train", self.owner.batch_size, epoch, i)


class SyntheticDataModule(L.LightningDataModule):
    """Seeded synthetic recall tasks with the datamodule interface of :mod:`ssmlm.data.datamodule`.

    Usage::

        dm = SyntheticDataModule(task="induction_heads", seq_len=256, batch_size=32); dm.setup("fit")
        x, y = next(iter(dm.train_dataloader()))   # y = -100 but at the answer position(s)
    """

    def __init__(self, task: str = "selective_copying", *, seq_len: int = 256, batch_size: int = 32,
                 n_memorize: int = 16, n_tokens: int = 16, train_batches: int = 250, eval_samples: int = 1024,
                 num_workers: int = 0, seed: int = 0):
        super().__init__()
        self.files: dict = {}  # split -> the file read, as the text data modules say: none, the tasks are generated
        if task not in TASKS:
            raise ConfigError(f"data.task={task!r} must be one of {', '.join(TASKS)}")
        for key, value in (("seq_len", seq_len), ("batch_size", batch_size), ("n_memorize", n_memorize),
                           ("n_tokens", n_tokens), ("train_batches", train_batches), ("eval_samples", eval_samples)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"data.{key}={value!r} must be a positive integer")
        if seq_len < _min_seq_len(task, n_memorize):
            raise ConfigError(f"data.seq_len={seq_len} is too short for {task} with data.n_memorize={n_memorize}: "
                              f"it needs at least {_min_seq_len(task, n_memorize)}. Raise data.seq_len or lower "
                              f"data.n_memorize.")
        if task == "mqar" and n_memorize > n_tokens:
            raise ConfigError(f"mqar needs data.n_memorize={n_memorize} distinct keys out of data.n_tokens="
                              f"{n_tokens}; raise data.n_tokens or lower data.n_memorize.")
        self.task, self.seq_len, self.batch_size = task, seq_len, batch_size
        self.n_memorize, self.n_tokens = n_memorize, n_tokens
        self.train_batches, self.eval_samples = train_batches, eval_samples
        self.num_workers, self.seed = num_workers, seed  # num_workers: accepted for the shared config, unused
        self.tokenizer = task_tokenizer(task, n_tokens)
        self.sets: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.splits: dict[str, TokenArray] = {}  # the fixed sets' inputs, flattened (text samples' prompts)
        self._train_loader: SyntheticBatches | None = None
        self._resume: tuple[int, int] | None = None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def draw(self, split: str, n: int, epoch: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` sequences from the generator seeded by (seed, split, epoch, index, rank)."""
        rank = self.trainer.global_rank if self.trainer is not None and split == "train" else 0
        seed = np.random.SeedSequence([self.seed, SPLIT_SEED[split], epoch, index, rank]).generate_state(1)[0]
        g = torch.Generator().manual_seed(int(seed))
        return GENERATORS[self.task](n, self.seq_len, self.n_memorize, self.n_tokens, g)

    def prepare_data(self) -> None:
        """Nothing to fetch: every sequence is generated."""

    def setup(self, stage: str | None = None) -> None:
        for split in ("val", "test"):
            if split not in self.sets:
                self.sets[split] = self.draw(split, self.eval_samples, 0, 0)
                self.splits[split] = TokenArray(self.sets[split][0].flatten().numpy().astype(np.uint16))

    def train_dataloader(self) -> SyntheticBatches:
        self._train_loader = SyntheticBatches(self, self.train_batches)
        self._apply_resume()
        return self._train_loader

    def _eval_loader(self, split: str) -> DataLoader:
        self.setup()
        return DataLoader(TensorDataset(*self.sets[split]), batch_size=self.batch_size, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def unigram_entropy_bits(self) -> float:
        """Chance level on the answers: log2 of the answer alphabet (the data tokens / values)."""
        return math.log2(self.n_tokens)

    # ------------------------------------------------------------------------------------- resumable state
    def state_dict(self) -> dict:
        trainer = self.trainer
        if trainer is not None and getattr(trainer.state, "fn", None) == "fit":
            # Lightning fetches one batch ahead: its progress counters, not the loader's, say what was trained on
            return {"epoch": int(trainer.fit_loop.epoch_progress.current.processed),
                    "batches_done": int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)}
        if self._resume is not None:
            return {"epoch": self._resume[0], "batches_done": self._resume[1]}
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict:
            self._resume = (int(state_dict["epoch"]), int(state_dict["batches_done"]))
            self._apply_resume()

    def _apply_resume(self) -> None:
        if self._resume is not None and self._train_loader is not None:
            self._train_loader.resume(*self._resume)
            self._resume = None

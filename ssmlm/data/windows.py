"""Fixed-length training/evaluation windows over a 1-D token array, fetched a whole batch at a time.

A window starting at token ``s`` is ``x = tokens[s : s+L]`` and ``y = tokens[s+1 : s+L+1]`` (next tokens).

* training, ``chunks``: the non-overlapping windows ``s = 0, L, 2L, ...`` (those with a full target), in a
  fresh order each epoch, incomplete last batch dropped;
* training, ``random``: as many windows per epoch as ``chunks`` has, at uniformly random starts;
* evaluation: the non-overlapping windows in order, covering every target exactly once; the last window
  is padded (input ``pad_id``, target ``-100``, the cross-entropy ``ignore_index``).

The order of an epoch depends only on ``(seed, epoch)``. Under DDP each rank takes every world_size-th
window (training: the same count on every rank).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

IGNORE_INDEX = -100
SAMPLING = ("chunks", "random")


class TokenArray:
    """A token array in memory, or a slice of a memory-mapped uint16 file that each process opens itself.

    Pickling (DataLoader workers) sends the file name and slice, never the data.
    """

    def __init__(self, data: np.ndarray | None = None, path: Path | None = None, start: int = 0,
                 stop: int | None = None):
        self.path, self.start, self.stop = path, start, stop
        self._data = data

    @property
    def data(self) -> np.ndarray:
        if self._data is None:
            self._data = np.memmap(self.path, dtype="<u2", mode="r")[self.start:self.stop]
        return self._data

    def slice(self, start: int, stop: int) -> TokenArray:
        if self.path is None:
            return TokenArray(self.data[start:stop])
        return TokenArray(path=self.path, start=self.start + start, stop=self.start + stop)

    def __len__(self) -> int:
        return len(self.data)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if self.path is not None:
            state["_data"] = None
        return state


class TokenWindows(Dataset):
    """Item ``s`` is the window starting at token ``s``; ``__getitems__`` gathers a batch in one indexing op."""

    def __init__(self, tokens: TokenArray, seq_len: int, pad_id: int = 0):
        self.tokens, self.seq_len, self.pad_id = tokens, seq_len, pad_id

    def __len__(self) -> int:
        return max(len(self.tokens) - 1, 0)

    def __getitem__(self, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.__getitems__([start])
        return x[0], y[0]

    def __getitems__(self, starts) -> tuple[torch.Tensor, torch.Tensor]:
        data = self.tokens.data
        index = np.asarray(starts, dtype=np.int64)[:, None] + np.arange(self.seq_len + 1)
        inside = index < len(data)
        window = torch.from_numpy(data[np.minimum(index, len(data) - 1)].astype(np.int64))
        inside = torch.from_numpy(inside)
        x = window[:, :-1].masked_fill(~inside[:, :-1], self.pad_id)
        y = window[:, 1:].masked_fill(~inside[:, 1:], IGNORE_INDEX)
        return x, y


def _keep_batch(batch):
    """collate_fn: ``__getitems__`` already returns the batch."""
    return batch


class WindowOrder(Sampler[int]):
    """The window starts of one epoch, for one rank. Lightning calls ``set_epoch`` before each epoch."""

    def __init__(self, num_tokens: int, seq_len: int, mode: str, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        if mode not in (*SAMPLING, "eval"):
            raise ValueError(f"unknown window mode {mode!r}")
        self.num_tokens, self.seq_len, self.mode = num_tokens, seq_len, mode
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def starts(self) -> np.ndarray:
        last_target = self.num_tokens - 1  # targets exist for positions 0 .. num_tokens-2
        if self.mode == "eval":
            return np.arange(0, last_target, self.seq_len)[self.rank::self.world_size]
        count = last_target // self.seq_len
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.mode == "chunks":
            starts = rng.permutation(count) * self.seq_len
        else:
            starts = rng.integers(0, self.num_tokens - self.seq_len, size=count)
        per_rank = count // self.world_size
        return starts[self.rank::self.world_size][:per_rank]

    def __iter__(self):
        return iter(self.starts().tolist())

    def __len__(self) -> int:
        if self.mode == "eval":
            return len(range(self.rank, len(range(0, self.num_tokens - 1, self.seq_len)), self.world_size))
        return (self.num_tokens - 1) // self.seq_len // self.world_size


class WindowBatches(Sampler[np.ndarray]):
    """Batches of window starts (the DataLoader's ``batch_sampler``).

    ``resume(epoch, batches_done)`` makes the next pass over that epoch skip the batches already trained on.
    """

    def __init__(self, sampler: WindowOrder, batch_size: int, drop_last: bool):
        self.sampler, self.batch_size, self.drop_last = sampler, batch_size, drop_last
        self._resume: tuple[int, int] | None = None

    def resume(self, epoch: int, batches_done: int) -> None:
        self._resume = (epoch, batches_done)

    def pending_skip(self) -> int:
        """How many batches the next pass skips (0 unless resuming inside the current epoch)."""
        if self._resume is None or self._resume[0] != self.sampler.epoch:
            return 0
        return min(self._resume[1], len(self))

    def __iter__(self):
        starts = self.sampler.starts()
        skip, self._resume = self.pending_skip(), None
        for b in range(skip, len(self)):
            yield starts[b * self.batch_size:(b + 1) * self.batch_size]

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)


class WindowLoader(DataLoader):
    """The training DataLoader: counts the batches it delivered and advances the epoch when one is complete.

    ``epoch`` / ``batches_done`` describe the consumer's position, which the data module checkpoints; with
    Lightning, ``set_epoch`` (called before every epoch) sets the epoch explicitly.
    """

    batches_done = 0
    owner = None  # the data module, whose state_dict() says where this loader is (set by it)

    def state_dict(self) -> dict:
        """Lightning checkpoints a loader that has state_dict/load_state_dict and restores it mid-epoch."""
        return self.owner.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.owner.load_state_dict(state_dict)

    def __iter__(self):
        order: WindowOrder = self.batch_sampler.sampler
        self.batches_done = self.batch_sampler.pending_skip()
        for batch in super().__iter__():
            self.batches_done += 1
            yield batch
        order.set_epoch(order.epoch + 1)
        self.batches_done = 0


def make_loader(tokens: TokenArray, seq_len: int, batch_size: int, mode: str, seed: int, num_workers: int,
                rank: int = 0, world_size: int = 1, pad_id: int = 0) -> DataLoader:
    order = WindowOrder(len(tokens), seq_len, mode, seed, rank, world_size)
    batches = WindowBatches(order, batch_size, drop_last=mode != "eval")
    loader_cls = DataLoader if mode == "eval" else WindowLoader
    return loader_cls(TokenWindows(tokens, seq_len, pad_id), batch_sampler=batches, collate_fn=_keep_batch,
                      num_workers=num_workers, persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available())

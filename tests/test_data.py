"""The data pipeline: text formats, tokenizers, byte caches, windows, sampling, resumable state, bad input."""

from __future__ import annotations

import hashlib
import json
import os
import time
import unicodedata
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from ssmlm.data import (
    ByteDataModule,
    ByteTokenizer,
    CharDataModule,
    CharTokenizer,
    byte_cache,
    tokenizer_from_dict,
)
from ssmlm.data.text import detect_format, read_text
from ssmlm.data.tokenizers import encode_bytes
from ssmlm.errors import ConfigError, DataError

from conftest import data_dir, hindi_data_dir

REPO = Path(__file__).resolve().parents[1]
DATA = data_dir()
PREMCHAND = hindi_data_dir() / "hindi" / "premchand"  # the real files, or the built-in copy of them
KALDI = DATA / "hindi" / "kaldi" / "gramvaani_dev_5h.text"
TINY = DATA / "tinystories"
SEP = "<|endoftext|>\n"


def need(*paths: Path) -> None:
    missing = [p for p in paths if not p.exists()]
    if missing:
        pytest.skip(f"real data not found: {missing[0]} (set SSMLM_DATA_DIR)")


@pytest.fixture(scope="module", autouse=True)
def shared_data_untouched():
    """Nothing in this module may write into the (read-only) shared data directory."""
    def listing():
        return sorted((str(p), p.stat().st_size) for p in DATA.rglob("*")) if DATA.exists() else []
    before = listing()
    yield
    assert listing() == before


def char_dm(train, val=None, test=None, **kw) -> CharDataModule:
    kw = {"seq_len": 16, "batch_size": 4, "progress": False, **kw}
    return CharDataModule(str(train), val and str(val), test and str(test), **kw)


def byte_dm(train, val=None, test=None, **kw) -> ByteDataModule:
    kw = {"seq_len": 64, "batch_size": 8, "progress": False, **kw}
    return ByteDataModule(str(train), val and str(val), test and str(test), **kw)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------- text formats
def test_kaldi_file_is_detected_and_ids_removed():
    need(KALDI)
    raw = KALDI.read_text(encoding="utf-8")
    assert detect_format(raw) == "kaldi"
    lines = read_text(KALDI, "auto", "data.train_path").splitlines()
    raw_lines = raw.splitlines()
    assert len(lines) == len([line for line in raw_lines if line.split("\t", 1)[1].strip()])
    assert lines[0] == unicodedata.normalize("NFC", raw_lines[0].split("\t", 1)[1].strip())
    assert not any("\t" in line or line.startswith(raw_lines[i].split("\t")[0]) for i, line in enumerate(lines[:50]))
    assert "01-00003-01" not in "".join(lines)


def test_plain_files_are_read_verbatim_up_to_nfc():
    need(PREMCHAND / "valid.txt", TINY / "TinyStories-valid.first1000stories.txt")
    for path in (PREMCHAND / "valid.txt", TINY / "TinyStories-valid.first1000stories.txt"):
        raw = path.read_text(encoding="utf-8")
        assert detect_format(raw) == "plain"
        assert read_text(path, "auto", "data.val_path") == unicodedata.normalize("NFC", raw)


def test_detection_on_small_synthetic_files():
    assert detect_format("spk1_utt01 hello there\nspk1_utt02 general kenobi\n") == "kaldi"
    assert detect_format("utt1\tएक\nutt1\tदो\n") == "plain"  # repeated ids: not utterance ids
    assert detect_format("Once upon a time.\n\nThe end.\n") == "plain"
    assert detect_format("1990 में\nयह\n") == "plain"


def test_nfc_composes_decomposed_input(tmp_path):
    decomposed = "cafe\u0301 e\u0301te\u0301\n"
    assert unicodedata.normalize("NFC", decomposed) != decomposed
    train = write(tmp_path / "train.txt", decomposed * 40)
    dm = char_dm(train, train, train)
    dm.setup("fit")
    assert "\u00e9" in dm.tokenizer.chars and "\u0301" not in dm.tokenizer.chars
    assert dm.tokenizer.encode("e\u0301") == dm.tokenizer.encode("\u00e9") == [dm.tokenizer.chars.index("\u00e9") + 2]


# -------------------------------------------------------------------------------------------- vocabulary
def test_vocab_from_train_only_and_unk_for_unseen(tmp_path):
    train = write(tmp_path / "train.txt", "abcabc\n" * 20)
    val = write(tmp_path / "val.txt", "abd\n" * 20)
    vocab = tmp_path / "run" / "vocab.json"
    dm = char_dm(train, val, val, vocab_path=vocab)
    dm.setup(None)
    assert dm.tokenizer.chars == ["\n", "a", "b", "c"] and dm.vocab_size == 6
    val_ids = dm.splits["val"].data
    assert (val_ids[2::4] == CharTokenizer.unk_id).all() and (val_ids != CharTokenizer.unk_id).sum() == 60
    assert json.loads(vocab.read_text(encoding="utf-8")) == dm.tokenizer.to_dict()
    # a saved vocabulary is reused as is, even when the training text differs
    write(train, "xyz\n" * 40)
    again = char_dm(train, val, val, vocab_path=vocab)
    again.setup("fit")
    assert again.tokenizer == dm.tokenizer and (again.splits["train"].data[:3] == CharTokenizer.unk_id).all()


def test_char_tokenizer_dict_round_trip_and_decode():
    tok = CharTokenizer.build("नमस्ते दुनिया\n")
    back = tokenizer_from_dict(json.loads(json.dumps(tok.to_dict(), ensure_ascii=False)))
    assert back == tok and back.decode(back.encode("नमस्ते\n")) == "नमस्ते\n"
    assert tok.decode([0, 1, tok.vocab_size + 5]) == "\ufffd\ufffd"  # <pad> -> "", <unk>/invalid -> U+FFFD
    stream = tok.stream_decoder()
    assert "".join(stream.feed(i) for i in tok.encode("दुनिया")) + stream.flush() == "दुनिया"


def test_hindi_train_file_tokenises_fast():
    need(PREMCHAND / "train.txt")
    start = time.perf_counter()
    dm = char_dm(PREMCHAND / "train.txt", PREMCHAND / "valid.txt", PREMCHAND / "test.txt", seq_len=256)
    dm.setup("fit")
    elapsed = time.perf_counter() - start
    text = read_text(PREMCHAND / "train.txt", "plain", "data.train_path")
    assert len(dm.splits["train"]) == len(text) and dm.tokenizer.decode(dm.splits["train"].data[:2000]) == text[:2000]
    assert elapsed < 5.0, f"tokenising premchand took {elapsed:.2f}s"


# --------------------------------------------------------------------------------------------------- bytes
def test_byte_round_trip_with_devanagari_and_boundaries():
    text = "नमस्ते, world!\n" + SEP + "दूसरी कहानी <|endoftext|> inline\n" + SEP + SEP + "last"
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert max(ids) == 256 and ids.count(256) == 3 and len(ids) == len(text.encode()) - 3 * (len(SEP) - 1)
    assert tok.decode(ids) == text
    stream, pieces = tok.stream_decoder(), []
    for i in ids:
        pieces.append(stream.feed(i))
    assert "".join(pieces) + stream.flush() == text
    first = tok.encode("न")  # three bytes: nothing is emitted before the last one arrives
    stream = tok.stream_decoder()
    assert [stream.feed(i) for i in first] == ["", "", "न"]
    assert tokenizer_from_dict(tok.to_dict()) == tok


@pytest.mark.parametrize("block", [5, 13, 14, 15, 64, 1000])
def test_streaming_tokenisation_matches_whole_file(tmp_path, monkeypatch, block):
    text = (SEP + "a story\n" + "x" * 40 + "\n" + SEP + SEP + "y" * 50 + "<|endoftext|>\n" + "कहानी\n") * 3 + SEP
    src = write(tmp_path / "s.txt", text)
    monkeypatch.setattr(byte_cache, "BLOCK", block)
    n = byte_cache.tokenize_file(src, tmp_path / "s.bin")
    tokens = np.fromfile(tmp_path / "s.bin", dtype="<u2")
    assert n == len(tokens) and tokens.tolist() == ByteTokenizer().encode(text)
    assert ByteTokenizer().decode(tokens.tolist()) == text


def test_memmap_windows_equal_the_source_bytes(tmp_path):
    need(TINY / "TinyStories-valid.first1000stories.txt")
    src = TINY / "TinyStories-valid.first1000stories.txt"
    dm = byte_dm(src, src, src, cache_dir=tmp_path / "cache")
    dm.setup(None)
    tokens = dm.splits["train"].data
    assert isinstance(tokens, np.memmap)
    raw = src.read_bytes()
    assert ByteTokenizer().decode(tokens.tolist()).encode() == raw
    assert (tokens == 256).sum() == raw.count(SEP.encode())
    x, y = next(iter(dm.train_dataloader()))
    expected = encode_bytes(raw).astype(np.int64)
    chunks = expected[:(len(expected) - 1) // 64 * 64].reshape(-1, 64)
    for row_x, row_y in zip(x.numpy(), y.numpy()):
        start = 64 * int(np.flatnonzero((chunks == row_x).all(axis=1))[0])
        assert (row_y == expected[start + 1:start + 65]).all()
    # the token cache is a derived file: it went to cache_dir
    assert list((tmp_path / "cache" / "tokens").glob("*.u16.bin"))


def test_byte_cache_reuse_and_invalidation(tmp_path, monkeypatch):
    src = write(tmp_path / "corpus.txt", ("Once upon a time.\n" + SEP) * 200)
    dm = byte_dm(src, src, src)
    dm.prepare_data()
    cache = byte_cache.cache_path(src, None)
    assert cache.exists() and json.loads(cache.with_name(cache.name + ".json").read_text())["num_tokens"] == 3800
    calls = []
    real = byte_cache.tokenize_file
    monkeypatch.setattr(byte_cache, "tokenize_file", lambda s, b: calls.append(s) or real(s, b))

    byte_dm(src, src, src).setup(None)
    assert calls == []  # fresh cache reused
    os.utime(src, ns=(time.time_ns(), time.time_ns() + 10**9))  # touched, same content: reused after one hash
    byte_dm(src, src, src).setup(None)
    assert calls == []
    stat = src.stat()
    write(src, "Twice upon a time" + ("Once upon a time.\n" + SEP)[17:] + ("Once upon a time.\n" + SEP) * 199)
    assert src.stat().st_size == stat.st_size
    os.utime(src, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size and mtime, new content
    dm = byte_dm(src, src, src)
    dm.setup("fit")
    assert len(calls) == 1 and ByteTokenizer().decode(dm.splits["train"].data[:17].tolist()) == "Twice upon a time"
    write(src, "short\n")  # size changed
    dm = byte_dm(src, src, src, seq_len=2, batch_size=1)
    dm.setup("fit")
    assert len(calls) == 2 and len(dm.splits["train"]) == 6


def test_token_cache_goes_to_cache_dir_never_next_to_the_source(tmp_path):
    (tmp_path / "mine").mkdir()
    src = write(tmp_path / "mine" / "c.txt", "hello world\n" * 100)
    dm = byte_dm(src, src, src, cache_dir=tmp_path / "cache", seq_len=8)
    dm.setup("fit")
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["c.txt"]  # a writable folder, left alone
    assert len(list((tmp_path / "cache" / "tokens").glob("c.txt.*.u16.bin"))) == 1


def test_unwritable_cache_dir_is_one_clear_error(tmp_path):
    src = write(tmp_path / "c.txt", "hello world\n" * 100)
    blocker = write(tmp_path / "not-a-dir", "")  # a file where the cache folder should be
    with pytest.raises(DataError, match="data.cache_dir"):
        byte_dm(src, src, src, cache_dir=blocker, seq_len=8).setup("fit")


# ------------------------------------------------------------------------------------- windows & sampling
def starts_of(loader, tokens: np.ndarray, seq_len: int) -> list[int]:
    """Recover each window's start from its content (the synthetic corpus has unique windows)."""
    index = {tuple(tokens[s:s + seq_len]): s for s in range(len(tokens) - seq_len)}
    return [index[tuple(row)] for x, _ in loader for row in x.numpy().tolist()]


@pytest.fixture
def numbers_file(tmp_path) -> Path:
    rng = np.random.default_rng(0)  # random letters: every 16-character window is unique
    return write(tmp_path / "n.txt", "".join(rng.choice(list("abcdefghijklmnop"), size=4001)) + "\n")


def test_chunk_sampling_is_a_seeded_permutation_of_chunks(numbers_file):
    dm = char_dm(numbers_file, numbers_file, numbers_file, seed=7)
    dm.setup("fit")
    tokens = dm.splits["train"].data
    loader = dm.train_dataloader()
    epoch0 = starts_of(loader, tokens, 16)
    epoch1 = starts_of(loader, tokens, 16)  # the loader moved on to epoch 1 by itself
    n_windows = (len(tokens) - 1) // 16
    assert len(epoch0) == n_windows // 4 * 4 and all(s % 16 == 0 for s in epoch0) and len(set(epoch0)) == len(epoch0)
    assert epoch0 != epoch1
    same = char_dm(numbers_file, numbers_file, numbers_file, seed=7)
    same.setup("fit")
    assert starts_of(same.train_dataloader(), tokens, 16) == epoch0
    other = char_dm(numbers_file, numbers_file, numbers_file, seed=8)
    other.setup("fit")
    assert starts_of(other.train_dataloader(), tokens, 16) != epoch0


def test_random_sampling_is_seeded_and_not_chunk_aligned(numbers_file):
    def first_epoch(seed):
        dm = char_dm(numbers_file, numbers_file, numbers_file, seed=seed, sampling="random")
        dm.setup("fit")
        return starts_of(dm.train_dataloader(), dm.splits["train"].data, 16), dm

    a, dm = first_epoch(1)
    assert a == first_epoch(1)[0] and a != first_epoch(2)[0]
    assert len(a) == (len(dm.splits["train"]) - 1) // 16 // 4 * 4
    assert any(s % 16 for s in a) and max(a) <= len(dm.splits["train"]) - 17


def test_eval_covers_the_whole_split_once_in_order(numbers_file):
    dm = char_dm(numbers_file, numbers_file, numbers_file, seq_len=48, batch_size=5)
    dm.setup(None)
    tokens = torch.from_numpy(dm.splits["val"].data.astype(np.int64))
    xs, ys = zip(*dm.val_dataloader())
    x, y = torch.cat(xs), torch.cat(ys)
    targets = y[y != -100]
    assert len(targets) == len(tokens) - 1 and torch.equal(targets, tokens[1:])
    assert torch.equal(x[y != -100], tokens[:-1])
    tail = x[y == -100]  # the last token (nothing left to predict after it), then padding
    assert tail[0] == tokens[-1] and (tail[1:] == CharTokenizer.pad_id).all()
    assert (y == -100).sum() == 48 * len(x) - (len(tokens) - 1)


def test_loader_workers_give_the_same_batches(tmp_path):
    src = write(tmp_path / "w.txt", "".join(chr(97 + i % 26) for i in range(20000)) + "\n")
    batches = []
    for workers in (0, 2):
        dm = byte_dm(src, src, src, num_workers=workers, seed=3)
        dm.setup("fit")
        loader = dm.train_dataloader()
        batches.append(torch.cat([x for _ in range(2) for x, _ in loader]))  # two epochs: persistent workers
    assert torch.equal(*batches)


def test_state_dict_round_trip_resumes_the_sampling(numbers_file):
    dm = char_dm(numbers_file, numbers_file, numbers_file, seed=5)
    dm.setup("fit")
    loader = dm.train_dataloader()
    full_epoch0 = [x for x, _ in loader]
    full_epoch1 = [x for x, _ in loader]
    assert dm.state_dict() == {"epoch": 2, "batches_done": 0}

    partial = char_dm(numbers_file, numbers_file, numbers_file, seed=5)
    partial.setup("fit")
    it = iter(partial.train_dataloader())
    for _ in range(3):
        next(it)
    state = partial.state_dict()
    assert state == {"epoch": 0, "batches_done": 3}

    resumed = char_dm(numbers_file, numbers_file, numbers_file, seed=5)
    resumed.load_state_dict(state)
    resumed.setup("fit")
    loader = resumed.train_dataloader()
    rest = [x for x, _ in loader]
    assert len(rest) == len(full_epoch0) - 3 and all(torch.equal(a, b) for a, b in zip(rest, full_epoch0[3:]))
    assert all(torch.equal(a, b) for a, b in zip([x for x, _ in loader], full_epoch1))


def test_lightning_resume_mid_epoch_continues_the_batch_sequence(tmp_path):
    need(KALDI)
    import lightning as L
    from torch import nn

    class Recorder(L.LightningModule):
        def __init__(self, vocab_size):
            super().__init__()
            self.head, self.seen = nn.Embedding(vocab_size, vocab_size), []

        def training_step(self, batch, _):
            x, y = batch
            self.seen.append(hashlib.md5(x.numpy().tobytes()).hexdigest())
            return nn.functional.cross_entropy(self.head(x).flatten(0, 1), y.flatten())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def fit(max_steps, ckpt_path=None, save_every=None):
        dm = char_dm(KALDI, None, None, seq_len=512, batch_size=16, seed=3)  # 25 batches per epoch
        dm.setup("fit")
        model = Recorder(dm.vocab_size)
        checkpoint = L.pytorch.callbacks.ModelCheckpoint(tmp_path / "ck", "{step}", every_n_train_steps=save_every,
                                                         save_top_k=-1) if save_every else None
        trainer = L.Trainer(max_steps=max_steps, max_epochs=-1, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0, use_distributed_sampler=False,
                            enable_checkpointing=save_every is not None, callbacks=[checkpoint] if checkpoint else [])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
        return model.seen

    straight = fit(35)
    first = fit(30, save_every=30)
    second = fit(35, ckpt_path=tmp_path / "ck" / "step=30.ckpt")
    assert first + second == straight and len(set(straight[:25])) == 25 and straight[:10] != straight[25:35]


# ----------------------------------------------------------------------------------------- splits & stats
def test_null_val_test_are_carved_from_train_by_lines():
    need(KALDI)
    dm = char_dm(KALDI, None, None, seq_len=128)
    dm.setup(None)
    whole = dm.tokenizer.encode_array(read_text(KALDI, "kaldi", "k"), normalized=True)
    parts = [dm.splits[s].data for s in ("train", "val", "test")]
    assert np.array_equal(np.concatenate(parts), whole)
    newline = dm.tokenizer.encode("\n")[0]
    assert parts[0][-1] == newline and parts[1][-1] == newline
    assert 0.85 < len(parts[0]) / len(whole) < 0.95 and 0.03 < len(parts[1]) / len(whole) < 0.07


def test_byte_test_split_carved_at_a_line_end(tmp_path):
    src = write(tmp_path / "t.txt", ("line one\n" + SEP) * 300)
    dm = byte_dm(src, src, None, split_fractions=[0.9, 0.05, 0.05])
    dm.setup(None)
    train, test = dm.splits["train"].data, dm.splits["test"].data
    assert len(train) + len(test) == len(dm.splits["val"].data)
    assert train[-1] in (10, 256) and ByteTokenizer().decode(test.tolist()).endswith(SEP)


def test_unigram_entropy(tmp_path):
    train = write(tmp_path / "e.txt", "aab\n" * 64)  # p = 1/2, 1/4, 1/4
    dm = char_dm(train, train, train)
    dm.setup("fit")
    assert dm.unigram_entropy_bits() == pytest.approx(1.5)


# ------------------------------------------------------------------------------------------------ errors
def test_missing_file_without_download(tmp_path):
    with pytest.raises(DataError) as err:
        char_dm(tmp_path / "nope.txt", tmp_path / "nope.txt").setup("fit")
    assert str(tmp_path / "nope.txt") in str(err.value) and "data.train_path" in str(err.value)


def test_empty_file(tmp_path):
    empty = write(tmp_path / "empty.txt", "\n  \n")
    with pytest.raises(DataError, match=r"empty\.txt \(data\.train_path\) is empty"):
        char_dm(empty, empty).setup("fit")
    with pytest.raises(DataError, match="is empty"):
        byte_dm(write(tmp_path / "zero.txt", ""), empty).setup("fit")


def test_non_utf8_file_names_the_byte_offset(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("नमस्ते\nabc".encode() + "é".encode("latin-1") + b"def\n")
    with pytest.raises(DataError) as err:
        char_dm(bad, bad).setup("fit")
    offset = len("नमस्ते\nabc".encode())
    assert f"byte offset {offset} (line 2)" in str(err.value) and "0xe9" in str(err.value)
    assert "data.train_path" in str(err.value)


def test_seq_len_longer_than_the_split(tmp_path):
    small = write(tmp_path / "small.txt", "tiny text\n")
    with pytest.raises(DataError, match=r"data\.seq_len=16 is longer than the training split"):
        char_dm(small, small).setup("fit")
    with pytest.raises(DataError, match=r"data\.batch_size=4"):
        char_dm(small, small, seq_len=4).setup("fit")


def test_corrupt_vocab_json(tmp_path):
    train = write(tmp_path / "t.txt", "abc\n" * 100)
    vocab = tmp_path / "vocab.json"
    for content in ("{not json", json.dumps({"unit": "char", "specials": ["<pad>", "<unk>"], "chars": ["ab"]})):
        vocab.write_text(content)
        with pytest.raises(DataError, match=r"vocab\.json \(data\.vocab_path\) is not a valid vocabulary"):
            char_dm(train, train, vocab_path=vocab).setup("fit")
    vocab.write_text(json.dumps(ByteTokenizer().to_dict()))
    with pytest.raises(DataError, match="byte-level vocabulary"):
        char_dm(train, train, vocab_path=vocab).setup("fit")


def test_bad_config_values(tmp_path):
    with pytest.raises(ConfigError, match="data.sampling"):
        char_dm(tmp_path / "t.txt", sampling="shuffle")
    with pytest.raises(ConfigError, match="data.format"):
        char_dm(tmp_path / "t.txt", format="csv")


# ------------------------------------------------------------------------------------------------ configs
def compose_data(name: str, output_dir: Path, *overrides: str):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from ssmlm import resolvers

    resolvers.register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("train", overrides=[f"data={name}", f"paths.data_dir={DATA}", f"paths.output_dir={output_dir}",
                                           "hardware=cpu", *overrides])


def test_configs_instantiate_working_data_modules(tmp_path):
    need(PREMCHAND / "train.txt", KALDI, TINY / "TinyStories-train.first2MiB.txt")
    import hydra

    from ssmlm.data.download import _targets

    cfg = compose_data("indic_chars", tmp_path / "run")
    dm = hydra.utils.instantiate(cfg.data)
    recipe_outputs = {p.resolve() for s in dm.sources for p in _targets(s)}
    assert {dm.paths[s].resolve() for s in ("train", "val", "test")} == recipe_outputs  # a missing file is fetched
    dm.prepare_data()  # files present: their published sha256 is verified
    dm.setup("fit")
    assert (tmp_path / "run" / "vocab.json").exists() and 100 < dm.vocab_size < 200
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (dm.batch_size, dm.seq_len) and x.dtype == torch.long

    kaldi = hydra.utils.instantiate(compose_data("indic_kaldi", tmp_path / "kaldi").data)
    kaldi.prepare_data()
    kaldi.setup(None)
    assert kaldi.format == "kaldi" and set(kaldi.splits) == {"train", "val", "test"}

    tiny = TINY / "TinyStories-train.first2MiB.txt"
    cfg = compose_data("tinystories_bytes", tmp_path / "bytes", f"data.train_path={tiny}",
                       f"data.val_path={TINY / 'TinyStories-valid.first1000stories.txt'}",
                       f"data.cache_dir={tmp_path / 'cache'}", "data.seq_len=128")
    dm = hydra.utils.instantiate(cfg.data)
    dm.prepare_data()
    dm.setup(None)
    assert dm.vocab_size == 257 and 4.0 < dm.unigram_entropy_bits() < 5.0
    x, y = next(iter(dm.val_dataloader()))
    assert torch.equal(x[:, 1:], y[:, :-1])

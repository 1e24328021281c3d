"""End-to-end training on the real Hindi data: learning, run-dir artefacts, resume, and bad input."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import hydra
import pytest
import torch

from ssmlm.errors import CheckpointError
from ssmlm.train import train

REPO = Path(__file__).resolve().parents[1]
FAST = ["hardware=cpu", "logger=csv", "trainer.enable_progress_bar=false", "callbacks.rich_summary=null",
        "data.seq_len=128", "batch_size=16"]


def small_hindi(tmp_path: Path, shared_data: Path, n_chars: int = 60_000) -> list[str]:
    """Overrides for a slice of the real Premchand text, so CPU tests stay quick."""
    src = shared_data / "hindi" / "premchand"
    train_text = (src / "train.txt").read_text(encoding="utf-8")[:n_chars]
    held_out = (src / "valid.txt").read_text(encoding="utf-8")[: n_chars // 3]
    # val and test: two halves of held-out stories (test.txt's first story is laid out unlike the train slice)
    texts = {"train": train_text, "valid": held_out[: len(held_out) // 2], "test": held_out[len(held_out) // 2:]}
    paths = []
    for split, text in texts.items():
        p = tmp_path / f"{split}.txt"
        p.write_text(text, encoding="utf-8")
        paths.append(p)
    return [f"data.train_path={paths[0]}", f"data.val_path={paths[1]}", f"data.test_path={paths[2]}",
            "data.download=false"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, shared_data, compose_config):
    """One short real run, shared by the tests that inspect its artefacts."""
    tmp = tmp_path_factory.mktemp("trained")
    out = tmp / "run"
    cfg = compose_config([*FAST, *small_hindi(tmp, shared_data), "trainer.max_steps=120", "trainer.max_epochs=5",
                       "trainer.val_check_interval=40", "trainer.check_val_every_n_epoch=null", "optim.lr=3e-3", "optim.warmup_steps=10",
                       "trainer.log_every_n_steps=5"], out)
    return cfg, train(cfg), out


def test_validation_loss_falls_below_unigram_entropy(trained_run):
    cfg, results, out = trained_run
    dm = hydra.utils.instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    unigram_bits = dm.unigram_entropy_bits()
    val_bits = math.log2(results["best_val_ppl"])
    assert val_bits < unigram_bits - 0.1, (val_bits, unigram_bits)
    assert results["test_bpt"] < unigram_bits
    assert 0 < results["test_acc"] < 1 and math.isfinite(results["test_ppl"])


def test_run_dir_holds_every_artefact(trained_run):
    _, results, out = trained_run
    assert (out / "checkpoints" / "last.ckpt").exists()
    top_k = [p for p in (out / "checkpoints").glob("epoch*.ckpt")]
    assert 1 <= len(top_k) <= 5
    for key in ("best_val_ppl", "test_ppl", "test_bpt", "test_acc", "global_step", "params"):
        assert key in results
    assert json.loads((out / "results.json").read_text()) == results
    assert (out / "DONE").exists() and (out / "curves.png").stat().st_size > 10_000
    vocab = json.loads((out / "vocab.json").read_text())
    assert vocab  # the char vocabulary is saved for eval / generation
    header = (out / "csv" / "metrics.csv").read_text().splitlines()[0]
    for metric in ("train/loss", "val/loss", "val/ppl", "val/bpt", "val/acc"):
        assert metric in header
    # checkpoints load with torch's safe loader (no pickled numpy objects)
    torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)


def test_resume_continues_the_global_step(make_cfg, shared_data, tmp_path):
    out = tmp_path / "run"
    base = [*FAST, *small_hindi(tmp_path, shared_data, 30_000), "trainer.limit_val_batches=3",
            "trainer.limit_test_batches=2", "trainer.max_epochs=10", "trainer.val_check_interval=10", "trainer.check_val_every_n_epoch=null", "test_after_fit=false"]
    first = train(make_cfg(*base, "trainer.max_steps=20", output_dir=out))
    assert first["global_step"] == 20
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 20
    (out / "DONE").unlink()  # the run was stopped, not finished: raise its budget and run the same dir again
    second = train(make_cfg(*base, "trainer.max_steps=30", output_dir=out))
    assert second["global_step"] == 30
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 30 and ckpt["optimizer_states"][0]["state"]


def test_finished_run_is_not_trained_again(trained_run, make_cfg):
    cfg, results, out = trained_run
    mtime = (out / "checkpoints" / "last.ckpt").stat().st_mtime
    again = train(cfg)
    assert again == results and (out / "checkpoints" / "last.ckpt").stat().st_mtime == mtime


def test_checkpoint_of_another_model_is_refused_and_kept(trained_run, make_cfg, shared_data, tmp_path):
    cfg, _, out = trained_run
    (out / "DONE").rename(out / "DONE.bak")
    try:
        before = (out / "checkpoints" / "last.ckpt").read_bytes()
        overrides = [o for o in cfg_overrides(cfg)] + ["size.hidden=96"]
        with pytest.raises(CheckpointError, match="different model config"):
            train(make_cfg(*overrides, output_dir=out))
        assert (out / "checkpoints" / "last.ckpt").read_bytes() == before
    finally:
        (out / "DONE.bak").rename(out / "DONE")


def cfg_overrides(cfg) -> list[str]:
    return [f"data.train_path={cfg.data.train_path}", f"data.val_path={cfg.data.val_path}",
            f"data.test_path={cfg.data.test_path}", "data.download=false", *FAST]


def test_vocabulary_mismatch_is_refused(trained_run, make_cfg):
    cfg, _, out = trained_run
    (out / "DONE").rename(out / "DONE.bak")
    vocab = out / "vocab.json"
    saved = vocab.read_text()
    try:
        vocab.unlink()  # the data now builds a vocabulary from another training file
        other = out.parent / "other_train.txt"
        other.write_text("abc def\n" * 2000, encoding="utf-8")
        overrides = cfg_overrides(cfg) + [f"data.train_path={other}"]
        with pytest.raises(CheckpointError, match="different vocabulary"):
            train(make_cfg(*overrides, output_dir=out))
    finally:
        vocab.write_text(saved)
        (out / "DONE.bak").rename(out / "DONE")


def test_torn_checkpoint_is_reported_not_overwritten(make_cfg, tmp_path, shared_data):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    torn = out / "checkpoints" / "last.ckpt"
    torn.write_bytes(b"PK\x03\x04 not really a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        train(make_cfg(*FAST, *small_hindi(tmp_path, shared_data, 20_000), output_dir=out))
    assert torn.read_bytes() == b"PK\x03\x04 not really a checkpoint"


def test_atomic_checkpoint_write_leaves_old_file_on_failure(tmp_path):
    from ssmlm.callbacks import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, target)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("killed mid-save")

    with pytest.raises(RuntimeError):
        io.save_checkpoint({"step": 2, "bad": Unpicklable()}, target)
    assert torch.load(target, weights_only=False) == {"step": 1}
    assert not list(tmp_path.glob("*.tmp"))


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="offline", HYDRA_FULL_ERROR="0")
    return subprocess.run([sys.executable, "-m", "ssmlm.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("case", ["missing", "empty", "not_utf8", "seq_len_too_long", "unknown_option"])
def test_bad_input_exits_with_one_clear_message(case, tmp_path, shared_data):
    train_file = tmp_path / "train.txt"
    valid = shared_data / "hindi" / "premchand" / "valid.txt"
    args = ["hardware=cpu", "logger=csv", f"hydra.run.dir={tmp_path / 'run'}", f"data.val_path={valid}",
            f"data.test_path={valid}", "data.download=false"]
    if case == "missing":
        args.append(f"data.train_path={tmp_path / 'nope.txt'}")
        expect = ["nope.txt", "data.train_path"]
    elif case == "empty":
        train_file.write_text("")
        args.append(f"data.train_path={train_file}")
        expect = ["train.txt", "empty", "data.train_path"]
    elif case == "not_utf8":
        train_file.write_bytes("नमस्ते दुनिया\n".encode("utf-8") + b"\xff\xfe latin-1 \xe9t\xe9\n")
        args.append(f"data.train_path={train_file}")
        expect = ["train.txt", "UTF-8"]
    elif case == "seq_len_too_long":
        train_file.write_text("थोड़ा सा पाठ\n" * 10, encoding="utf-8")
        args += [f"data.train_path={train_file}", "data.seq_len=4096"]
        expect = ["data.seq_len"]
    else:
        args.append("model=no_such_model")
        expect = ["no_such_model", "model"]
    proc = run_cli(*args)
    assert proc.returncode != 0
    err = proc.stderr
    for word in expect:
        assert word in err, err[-2000:]
    assert "Traceback" not in err, err[-3000:]

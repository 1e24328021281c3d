"""The fault suite: every fault docs/reliability.md lists, injected through the real ``ssmlm-train`` command line
(``python -m ssmlm.train``) on a tiny CPU run with dropout on.

Each test asserts the exit status, the one-line message, that a verified checkpoint survives, and that the finished
run's results (and every step's training loss) are bit for bit those of the same run never interrupted.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import random
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from ssmlm import run_dir as rd
from ssmlm.plots import read_metrics
from tiny_runs import REPO, cli_env, command, run_cli

STEPS = 40
# a ~8K-parameter diagonal SSM with dropout; last.ckpt every 5 steps, validation at steps 20 and 40; a test split
# long enough, and text samples long enough, that a kill can land inside the test or the final validation
ARGS = ["hardware=cpu", "logger=csv", "size.emb_dim=16", "size.hidden=32", "size.n_layers=1", "size.dropout=0.1",
        "batch_size=8", "data.seq_len=32", "trainer.enable_progress_bar=false", "callbacks.rich_summary=null",
        f"trainer.max_steps={STEPS}", "trainer.val_check_interval=20", "trainer.check_val_every_n_epoch=null",
        "trainer.log_every_n_steps=1", "trainer.limit_val_batches=2", "trainer.limit_test_batches=1.0",
        "callbacks.text_samples.max_new_tokens=1000", "callbacks.last_checkpoint.every_n_train_steps=5",
        "data.download=false"]
COMPARED = ("global_step", "params", "global_batch", "best_val_ppl", "test_loss", "test_ppl", "test_bpt", "test_acc")


# --- helpers ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory, shared_data) -> list[str]:
    """Slices of the real Premchand text: 30K training characters, a short validation and a long test split."""
    folder = tmp_path_factory.mktemp("data")
    src = shared_data / "hindi" / "premchand"
    train = (src / "train.txt").read_text(encoding="utf-8")
    held_out = (src / "valid.txt").read_text(encoding="utf-8") + (src / "test.txt").read_text(encoding="utf-8")
    texts = {"train": train[:30_000], "valid": held_out[:3_000], "test": held_out[3_000:60_000],
             "other_train": train[30_000:60_000]}
    for name, text in texts.items():
        (folder / f"{name}.txt").write_text(text, encoding="utf-8")
    return [f"data.train_path={folder / 'train.txt'}", f"data.val_path={folder / 'valid.txt'}",
            f"data.test_path={folder / 'test.txt'}"]


def train_cli(run: Path, data: list[str], *extra: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return run_cli(*ARGS, *data, f"hydra.run.dir={run}", *extra, timeout=timeout)


def start(run: Path, data: list[str], *extra: str) -> subprocess.Popen:
    """The training command in its own session (SIGKILL to the group reaches every process it started)."""
    run.mkdir(parents=True, exist_ok=True)
    out = open(run.parent / f"{run.name}.out", "w")
    return subprocess.Popen(command(*ARGS, *data, f"hydra.run.dir={run}", *extra), cwd=REPO, env=cli_env(),
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def output(run: Path) -> str:
    return (run.parent / f"{run.name}.out").read_text(errors="replace")


def wait_for(proc: subprocess.Popen, run: Path, condition, what: str, timeout: float = 240, poll: float = 0.01):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert proc.poll() is None, f"the run ended before {what}:\n{output(run)[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        if poll:
            time.sleep(poll)
    return value


def kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def state(path: Path) -> dict | None:
    """A checkpoint as training left it (None while it is being replaced or when it fails its check)."""
    try:
        return rd.read_checkpoint(path)
    except Exception:
        return None


def step_of(path: Path) -> int:
    ckpt = state(path)
    return int(ckpt["global_step"]) if ckpt else -1


def validated_step(path: Path) -> int:
    callbacks = (state(path) or {}).get("callbacks", {})
    return next((int(s["validated_step"]) for k, s in callbacks.items() if k.startswith("LastCheckpoint")), -1)


def assert_failed_cleanly(proc: subprocess.CompletedProcess, *expected: str) -> str:
    """Exit status 2 and exactly one ``ssmlm-train: error:`` line holding ``expected``, no traceback."""
    err = proc.stderr
    lines = [line for line in err.splitlines() if line.startswith("ssmlm-train: error:")]
    assert proc.returncode == 2, err[-3000:]
    assert len(lines) == 1, err[-3000:]
    assert "Traceback" not in err and "Error executing job" not in err, err[-3000:]
    for word in expected:
        assert word in lines[0], lines[0]
    return lines[0]


def verified_checkpoints(run: Path) -> list[Path]:
    return [p for p in (run / "checkpoints").glob("*.ckpt") if rd.is_verified(p) and state(p) is not None]


def assert_same_as_uninterrupted(run: Path, reference: Path) -> None:
    """results.json and every logged training loss equal the uninterrupted run's, bit for bit."""
    assert (run / "DONE").exists(), "the run did not finish"
    got, want = json.loads((run / "results.json").read_text()), json.loads((reference / "results.json").read_text())
    assert {k: got.get(k) for k in COMPARED} == {k: want.get(k) for k in COMPARED}
    got_loss, want_loss = dict(read_metrics(run)["train/loss"]), dict(read_metrics(reference)["train/loss"])
    assert len(got_loss) == len(read_metrics(run)["train/loss"]), "a step logged twice in metrics.csv"
    missing = set(want_loss) - set(got_loss)
    assert not missing, f"steps {sorted(missing)} missing from metrics.csv"
    assert got_loss == want_loss, "training losses differ from the uninterrupted run (dropout's RNG not restored?)"
    assert not list((run / "checkpoints").glob("*.tmp")), "a temporary checkpoint was left behind"
    assert verified_checkpoints(run)


def snapshot(run: Path) -> dict[str, str]:
    """Digest of every file of the run that a refused command must not touch (its own log lines, failure record
    and lock record aside, and Hydra's .hydra/, which Hydra writes before ssmlm runs)."""
    skip = {"train.log", "status.json", "run.lock"}
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run.rglob("*"))
            if p.is_file() and p.name not in skip and ".hydra" not in p.parts}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data) -> Path:
    """The run never interrupted."""
    run = tmp_path_factory.mktemp("reference") / "run"
    proc = train_cli(run, data)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def killed_mid_epoch(tmp_path_factory, data) -> Path:
    """A run killed (SIGKILL) mid-epoch after its first validation: last.ckpt at step >= 25, a top-k at step 20."""
    run = tmp_path_factory.mktemp("killed") / "run"
    proc = start(run, data)
    wait_for(proc, run, lambda: step_of(run / "checkpoints" / "last.ckpt") >= 25, "last.ckpt at step 25")
    kill(proc)
    return run


def copy_of(run: Path, tmp_path: Path, finished: bool = True) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    if not finished:  # as if stopped after the last training step: the end of the run still to do
        (copy / "DONE").unlink()
        (copy / "results.json").unlink()
    return copy


# --- kill -9 at observed moments ------------------------------------------------------------------------------
def test_kill_mid_epoch_resumes_bit_exact_with_dropout(killed_mid_epoch, reference, data, tmp_path):
    run = copy_of(killed_mid_epoch, tmp_path)
    saved = state(run / "checkpoints" / "last.ckpt")
    assert 25 <= saved["global_step"] < STEPS and saved["CharDataModule"]["batches_done"] > 0  # mid-epoch
    assert json.loads((run / "run.lock").read_text())["host"] == socket.gethostname()  # the dead holder's record
    proc = train_cli(run, data)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = [e["event"] for e in json.loads((run / "status.json").read_text())["history"]]
    assert events == ["started", "resumed", "done"]
    assert_same_as_uninterrupted(run, reference)


def created_files(folder: Path, timeout: float):
    """Names of files created in ``folder`` as the kernel reports them (inotify): the caller reacts within
    microseconds of the creation, not at its next poll."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init()
    if fd < 0 or libc.inotify_add_watch(fd, str(folder).encode(), 0x100) < 0:  # IN_CREATE
        pytest.skip("inotify is not available here")
    deadline = time.monotonic() + timeout
    try:
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([fd], [], [], left)[0]:
                break
            events = os.read(fd, 65536)
            while events:  # struct inotify_event: int wd; uint32 mask, cookie, len; char name[len]
                _, _, _, size = struct.unpack_from("iIII", events)
                yield events[16:16 + size].rstrip(b"\0").decode()
                events = events[16 + size:]
    finally:
        os.close(fd)


def test_kill_during_a_checkpoint_write_leaves_the_previous_one(reference, data, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    proc = start(run, data, "callbacks.last_checkpoint.every_n_train_steps=1")
    temporaries = (name for name in created_files(run / "checkpoints", 240)
                   if name.startswith("last.ckpt.") and name.endswith(".tmp") and ".sha256." not in name)
    next(temporaries)  # the first checkpoint
    assert next(temporaries, None), f"no second checkpoint written:\n{output(run)[-3000:]}"
    kill(proc)  # while that second one is being written
    assert list((run / "checkpoints").glob("last.ckpt.*.tmp")), "the kill landed after the write"
    assert verified_checkpoints(run), "no verified checkpoint survived"
    proc = train_cli(run, data)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_as_uninterrupted(run, reference)


def test_kill_during_the_final_validation_validates_on_rerun(reference, data, tmp_path):
    run = tmp_path / "run"
    proc = start(run, data)
    last = run / "checkpoints" / "last.ckpt"
    wait_for(proc, run, lambda: step_of(last) == STEPS, "the last step's checkpoint")
    time.sleep(0.2)  # inside the final validation (its text samples take about a second)
    kill(proc)
    assert validated_step(last) < STEPS and not list(run.glob(f"checkpoints/*step{STEPS:07d}*")), \
        "the kill missed the final validation"
    assert not (run / "DONE").exists()
    proc = train_cli(run, data)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "validating the final step" in (run / "train.log").read_text()
    assert_same_as_uninterrupted(run, reference)
    assert list(run.glob(f"checkpoints/*step{STEPS:07d}*.ckpt")), "the final validation kept no top-k checkpoint"


def test_kill_during_the_test_tests_on_rerun(reference, data, tmp_path):
    run = tmp_path / "run"
    proc = start(run, data)
    wait_for(proc, run, lambda: "Restoring states from the checkpoint path" in output(run), "the test")
    time.sleep(0.1)
    kill(proc)
    assert not (run / "DONE").exists() and not (run / "results.json").exists(), "the kill missed the test"
    damaged = shutil.copytree(run, tmp_path / "damaged" / "run")
    proc = train_cli(run, data)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_as_uninterrupted(run, reference)

    # the same moment, and the best checkpoint damaged too: the next best verified one is tested
    ranked = rd.RunDir(damaged).ranked_checkpoints()
    corrupt(ranked[0][0], 1)
    proc = train_cli(damaged, data)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((damaged / "results.json").read_text())
    assert results["best_checkpoint"] == str(ranked[1][0]) and results["best_val_ppl"] == ranked[1][1]
    assert ranked[0][0].with_name(ranked[0][0].name + ".unreadable").exists()
    assert "testing the next best checkpoint" in (damaged / "train.log").read_text()


# --- damaged checkpoints ---------------------------------------------------------------------------------------
def corrupt(path: Path, seed: int) -> int:
    """4 KB of random bytes at a random offset inside the file (its size unchanged); returns the offset."""
    rng = random.Random(seed)
    size = path.stat().st_size
    offset = rng.randrange(0, size - 4096)
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(rng.randbytes(4096))
    return offset


@pytest.mark.parametrize("target", ["last.ckpt", "last.prev.ckpt", "nan_weights"])
def test_damaged_checkpoint_is_never_loaded_and_kept_aside(target, killed_mid_epoch, reference, data, tmp_path):
    run = copy_of(killed_mid_epoch, tmp_path)
    ckpts = run / "checkpoints"
    if target == "nan_weights":  # a well-formed file with a valid digest, but weights that are not numbers
        ckpt = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=False)
        next(v for v in ckpt["state_dict"].values() if v.is_floating_point()).fill_(float("nan"))
        rd.save_checkpoint(ckpt, ckpts / "last.ckpt")
        damaged, why = "last.ckpt", "non-finite weights"
    else:
        seed = int(time.time())
        offset = corrupt(ckpts / target, seed)
        damaged, why = target, "does not match the sha256 digest"
    proc = train_cli(run, data)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (run / "train.log").read_text()
    where = f"\n(seed {seed}, offset {offset})" if damaged == target else ""
    assert damaged in log and why in log, log[-3000:] + where
    assert (ckpts / f"{damaged}.unreadable").exists(), "the damaged file was not kept aside"
    if damaged == "last.ckpt":
        assert "resuming from" in log and "last.prev.ckpt" in log
    assert_same_as_uninterrupted(run, reference)


def test_damaged_best_checkpoint_is_refused_by_eval_and_average(reference, tmp_path):
    run = copy_of(reference, tmp_path)
    best = rd.RunDir(run).checkpoint("best")
    corrupt(best, 0)
    for args in (["ckpt=best"], ["average=2"], ["ensemble=2"]):
        proc = subprocess.run([*command()[:2], "ssmlm.evaluate", f"run_dir={run}", *args], cwd=REPO,
                              env=cli_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert f"cannot read checkpoint {best}" in proc.stderr and "sha256" in proc.stderr, proc.stderr[-2000:]
    assert not (run / "checkpoints" / "averaged-top2.ckpt").exists()


# --- one process per run dir ----------------------------------------------------------------------------------
def test_second_start_on_a_running_run_dir_is_refused(data, tmp_path):
    run = tmp_path / "run"
    first = start(run, data, "trainer.max_steps=5000")
    wait_for(first, run, lambda: step_of(run / "checkpoints" / "last.ckpt") >= 5, "the first run's checkpoint")
    holder = json.loads((run / "run.lock").read_text())
    assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
    try:
        second = train_cli(run, data, "trainer.max_steps=5000")
        assert_failed_cleanly(second, f"is in use by process {first.pid} on {socket.gethostname()}", "hydra.run.dir")
        assert first.poll() is None, "the first run stopped"
        time.sleep(1)  # the first run goes on writing its metrics alone
    finally:
        kill(first)
    with open(run / "csv" / "metrics.csv") as f:
        header = f.readline().strip().split(",")
        assert all(len(line.split(",")) == len(header) for line in f), "metrics.csv rows disagree with its header"
    assert verified_checkpoints(run)


# --- another run's data, vocabulary or model on resume ----------------------------------------------------------
def test_changed_data_vocabulary_or_model_is_refused_and_writes_nothing(reference, data, tmp_path):
    run = copy_of(reference, tmp_path, finished=False)
    folder = Path(data[0].split("=", 1)[1]).parent
    other_data = [f"data.train_path={folder / 'other_train.txt'}", *data[1:]]
    before = snapshot(run)
    cases = [
        (other_data, ["a different vocabulary or training data", "train_data.sha256"]),
        ([*data, "size.hidden=48"], ["a different model config", "config.model"]),
        ([*data, "data.seq_len=16"], ["a different data config", "config.data.seq_len: 32 -> 16"]),
    ]
    for args, expected in cases:
        proc = run_cli(*ARGS, *args, f"hydra.run.dir={run}")
        assert_failed_cleanly(proc, *expected, "force_resume=true")
        assert snapshot(run) == before, f"a refused resume ({args[-1]}) wrote into the run dir"

    # the vocabulary file gone and other data: refused, and no vocab.json of the other data written
    (run / "vocab.json").unlink()
    before = snapshot(run)
    assert_failed_cleanly(run_cli(*ARGS, *other_data, f"hydra.run.dir={run}"), "train_data")
    assert snapshot(run) == before and not (run / "vocab.json").exists()
    # ... while the original data is still this run's (its vocabulary is rebuilt the same) and finishes it
    proc = train_cli(run, data)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_as_uninterrupted(run, reference)


def test_changed_vocabulary_file_is_refused_unless_forced(reference, data, tmp_path):
    run = copy_of(reference, tmp_path, finished=False)
    vocab = json.loads((run / "vocab.json").read_text())
    other = tmp_path / "other_vocab.json"
    other.write_text(json.dumps({**vocab, "chars": list(reversed(vocab["chars"]))}, ensure_ascii=False))
    before = snapshot(run)
    proc = train_cli(run, data, f"data.vocab_path={other}")
    assert_failed_cleanly(proc, "vocabulary:")
    assert snapshot(run) == before
    forced = train_cli(run, data, f"data.vocab_path={other}", "force_resume=true")
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert "force_resume=true: resuming" in (run / "train.log").read_text()


# --- a full disk ----------------------------------------------------------------------------------------------
@contextmanager
def tmpfs(folder: Path, options: str):
    """A tmpfs mounted at ``folder`` for the test (root only; the test is skipped elsewhere)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)])


@pytest.fixture
def small_disk(tmp_path):
    with tmpfs(tmp_path / "disk", "size=4m") as mount:
        yield mount


def test_full_disk_stops_with_one_line_and_resumes_when_freed(small_disk, reference, data):
    used = sum(p.stat().st_size for p in reference.rglob("*") if p.is_file())
    filler = small_disk / "filler"
    free = shutil.disk_usage(small_disk).free
    filler.write_bytes(b"\0" * (free - used // 2))  # room for about half of what the run writes
    run = small_disk / "run"
    proc = train_cli(run, data)
    line = assert_failed_cleanly(proc, "no space left on the device writing", "free there")
    assert str(small_disk) in line
    assert verified_checkpoints(run), "no verified checkpoint survived the full disk"
    assert not list((run / "checkpoints").glob("*.tmp"))
    filler.unlink()
    proc = train_cli(run, data)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_as_uninterrupted(run, reference)


# --- bad values -----------------------------------------------------------------------------------------------
def test_bad_values_exit_2_with_one_line_naming_the_key(data, tmp_path, reference):
    folder = tmp_path / "inputs"
    folder.mkdir()
    (folder / "a_file").write_text("x")
    (folder / "short_valid.txt").write_text("छोटा\n", encoding="utf-8")
    finished = copy_of(reference, tmp_path, finished=False)
    kept = snapshot(finished)
    cases = {
        "batch_size=0": (["batch_size=0"], ["batch_size=0", ">= 1"]),
        "batch_size=-4": (["batch_size=-4"], ["batch_size=-4"]),
        "batch_size=big": (["batch_size=big"], ["batch_size='big'", "whole number"]),
        "lr=fast": (["optim.lr=fast"], ["optim.lr='fast'", "number"]),
        "lr=-1": (["optim.lr=-1"], ["optim.lr=-1", "> 0"]),
        "warmup=-5": (["optim.warmup_steps=-5"], ["optim.warmup_steps=-5"]),
        "seq_len=0": (["data.seq_len=0"], ["data.seq_len=0"]),
        "every_n=0": (["callbacks.last_checkpoint.every_n_train_steps=0"], ["every_n_train_steps=0"]),
        "seed=abc": (["seed=abc"], ["seed='abc'"]),
        "train_path=dir": ([f"data.train_path={folder}"], ["data.train_path", "is a directory"]),
        "val shorter than seq_len": ([f"data.val_path={folder / 'short_valid.txt'}"], ["data.seq_len=32",
                                                                                       "val split"]),
        "run dir under a file": ([f"hydra.run.dir={folder / 'a_file' / 'run'}"], ["cannot write", "a_file"]),
        "nan loss": (["optim.lr=1e12", "optim.warmup_steps=0"], ["training loss is nan", "optim.lr"]),
        "nan loss, skip policy": (["optim.lr=1e12", "optim.warmup_steps=0", "callbacks.nonfinite_loss.policy=skip",
                                   "callbacks.nonfinite_loss.max_skips=3"], ["after 3 skipped steps in a row"]),
        "nan loss, bad policy": (["callbacks.nonfinite_loss.policy=ignore"], ["callbacks.nonfinite_loss.policy"]),
        "bad value on a run to resume": (["batch_size=0", f"hydra.run.dir={finished}"], ["batch_size=0"]),
    }

    def attempt(name: str):
        args, expected = cases[name]
        own_dir = any(a.startswith("hydra.run.dir=") for a in args)
        run = [] if own_dir else [f"hydra.run.dir={tmp_path / re.sub(r'[^a-z0-9_-]', '_', name)}"]
        return name, run_cli(*ARGS, *data, *run, *args, timeout=300), expected

    with ThreadPoolExecutor(3) as pool:
        for name, proc, expected in pool.map(attempt, cases):
            try:
                assert_failed_cleanly(proc, *expected)
            except AssertionError as e:
                raise AssertionError(f"case {name!r}: {e}") from None
    assert snapshot(finished) == kept, "a refused command changed the run it was pointed at"


def test_read_only_run_dir_is_one_line(data, tmp_path):
    with tmpfs(tmp_path / "ro", "ro,size=1m") as mount:
        proc = train_cli(mount / "run", data)
        assert_failed_cleanly(proc, "cannot write", str(mount), "hydra.run.dir")

"""Small real training runs for the resume, sweep and SLURM tests: a slice of the Hindi text, a one-layer model,
and the command line that trains it (in-process via ``train`` or as ``python -m ssmlm.train``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# a ~5K-parameter diagonal SSM on 32-character windows: a step takes milliseconds on a CPU
TINY = ["size.emb_dim=16", "size.hidden=32", "size.n_layers=1", "batch_size=8", "data.seq_len=32",
        "trainer.enable_progress_bar=false", "callbacks.rich_summary=null", "trainer.limit_val_batches=2",
        "trainer.limit_test_batches=2", "callbacks.text_samples.max_new_tokens=16"]


def tiny_data(folder: Path, shared_data: Path, n_chars: int = 30_000) -> list[str]:
    """Overrides pointing the data at slices of the real Premchand text written into ``folder``."""
    src = shared_data / "hindi" / "premchand"
    held_out = (src / "valid.txt").read_text(encoding="utf-8")[: n_chars // 5]
    texts = {"train": (src / "train.txt").read_text(encoding="utf-8")[:n_chars],
             "valid": held_out[: len(held_out) // 2], "test": held_out[len(held_out) // 2:]}
    folder.mkdir(parents=True, exist_ok=True)
    for split, text in texts.items():
        (folder / f"{split}.txt").write_text(text, encoding="utf-8")
    return [f"data.train_path={folder / 'train.txt'}", f"data.val_path={folder / 'valid.txt'}",
            f"data.test_path={folder / 'test.txt'}", "data.download=false"]


def cli_env(**extra: str) -> dict:
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", HYDRA_FULL_ERROR="0", **extra)
    env.pop("SLURM_JOB_ID", None)  # a test run inside a SLURM job must not look like a SLURM task itself
    return env


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "ssmlm.train", *args]


def run_cli(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(command(*args), cwd=REPO, env=env or cli_env(), capture_output=True, text=True,
                          timeout=timeout)

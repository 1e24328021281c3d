"""Multi-GPU check: the same short run on 1 device and on N devices (Lightning DDP, ranks started locally by
Lightning), as one ssmlm-train multirun, then checks what a sweep on a multi-GPU machine relies on:

- both runs trained with the same global batch (micro-batch x gradient accumulation x ranks = batch_size);
- their loss curves agree (printed side by side; DDP ranks see different windows, so they are close, not equal);
- the N-device cell really ran N processes (a log per rank), and the multirun made one run dir per cell and
  nothing else: no run dir or Hydra folder per rank.

    python scripts/ddp_check.py                          # 2 GPUs (hardware=auto: bf16 where supported)
    python scripts/ddp_check.py --devices 4 --steps 200
    python scripts/ddp_check.py --accelerator cpu        # the same on CPU processes (gloo), slowly
    python scripts/ddp_check.py model=s4d data=tinystories_bytes   # more ssmlm-train overrides
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ssmlm.plots import read_metrics  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--accelerator", choices=["gpu", "cpu"], default="gpu")
    parser.add_argument("--out", type=Path, default=Path("/tmp/ssmlm-ddp-check"))
    parser.add_argument("--tolerance", type=float, default=0.1,
                        help="largest relative difference of the mean training loss over the last quarter")
    parser.add_argument("overrides", nargs="*", help="more ssmlm-train overrides (model=..., data=...)")
    args = parser.parse_args()

    shutil.rmtree(args.out, ignore_errors=True)
    hardware = ["hardware=auto"] if args.accelerator == "gpu" else ["hardware=cpu", "hardware.num_workers=0"]
    cmd = [sys.executable, "-m", "ssmlm.train", "-m", "experiment=tiny", *hardware, "logger=csv",
           "hardware.strategy=ddp", f"hardware.devices=1,{args.devices}", f"trainer.max_steps={args.steps}",
           f"trainer.val_check_interval={max(1, args.steps // 2)}", "trainer.check_val_every_n_epoch=null",
           "trainer.limit_val_batches=20", "trainer.limit_test_batches=20", "trainer.log_every_n_steps=5",
           "trainer.enable_progress_bar=false", f"paths.log_dir={args.out}", "sweep_name=ddp_check",
           *args.overrides]
    print(" ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, cwd=REPO, env=dict(os.environ, WANDB_MODE="offline"), check=True)

    sweep_dir = args.out / "multirun" / "ddp_check"
    cells = {}
    for cell in sweep_dir.iterdir():
        overrides = yaml.safe_load((cell / ".hydra" / "overrides.yaml").read_text()) if cell.is_dir() else []
        devices = [int(o.split("=")[1]) for o in overrides if o.startswith("hardware.devices=")]
        if devices:
            cells[devices[0]] = cell
    extra = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir() and p not in cells.values()
                   and not p.name.startswith("."))
    assert sorted(cells) == [1, args.devices], f"expected one run dir per device count, found {sorted(cells)}"
    assert not extra and not (args.out / "runs").exists(), f"extra output dirs: {extra}, {args.out / 'runs'}"
    for n, cell in cells.items():
        assert not list(cell.glob(".pl_hydra*")) and (cell / ".hydra").is_dir(), f"Hydra folders in {cell}"
        ranks = sorted(p.name for p in cell.glob("train.rank*.log"))
        assert len(ranks) == n - 1, f"{cell.name}: {n} device(s) but logs of ranks 1.. {ranks}: not {n} processes"

    results = {n: json.loads((cell / "results.json").read_text()) for n, cell in cells.items()}
    batches = {n: results[n]["global_batch"] for n in sorted(results)}
    print(f"\nglobal batch (sequences per optimizer step): {batches}")
    assert len(set(batches.values())) == 1, f"the global batch changed with the device count: {batches}"

    curves = {n: dict(read_metrics(cell)["train/loss"]) for n, cell in cells.items()}
    print(f"\n{'step':>6} " + " ".join(f"{f'{n} device(s)':>12}" for n in sorted(curves)))
    for step in sorted(set.intersection(*(set(c) for c in curves.values()))):
        print(f"{step:>6} " + " ".join(f"{curves[n][step]:>12.4f}" for n in sorted(curves)))
    print("\nbest val ppl: " + ", ".join(f"{n} device(s) {results[n].get('best_val_ppl', float('nan')):.3f}"
                                         for n in sorted(results)))
    tails = {}
    for n, curve in curves.items():
        steps = sorted(curve)
        tail = steps[-max(1, len(steps) // 4):]
        tails[n] = sum(curve[s] for s in tail) / len(tail)
    spread = (max(tails.values()) - min(tails.values())) / min(tails.values())
    assert spread <= args.tolerance, f"final training losses differ by {spread:.1%}: {tails}"
    print(f"final training losses agree within {spread:.1%}; OK")


if __name__ == "__main__":
    main()

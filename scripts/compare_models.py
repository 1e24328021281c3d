"""Train several model families on the same data with the same tokens seen, and tabulate them.

    python scripts/compare_models.py --models diag_ssm s4d mamba transformer --experiment small \
        --max-steps 1650 --out outputs/compare -- trainer.val_check_interval=550

Each model runs `ssmlm-train` in its own run dir under --out; the table (params, val ppl per validation,
best val ppl, test ppl, bits per character/byte, training tokens/s, wall time) is printed as Markdown and
written to <out>/compare.md and compare.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def val_curve(run_dir: Path) -> list[tuple[int, float]]:
    path = run_dir / "csv" / "metrics.csv"
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [(int(r["step"]), float(r["val/ppl"])) for r in csv.DictReader(f) if r.get("val/ppl")]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["diag_ssm", "s4d", "mamba", "transformer"])
    p.add_argument("--experiment", default="small")
    p.add_argument("--data", default="indic_chars")
    p.add_argument("--max-steps", type=int, default=1650)
    p.add_argument("--out", type=Path, default=REPO / "outputs" / "compare")
    p.add_argument("overrides", nargs="*", help="extra ssmlm-train overrides for every model")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for model in args.models:
        run_dir = args.out / model
        cmd = [sys.executable, "-m", "ssmlm.train", f"model={model}", f"experiment={args.experiment}",
               f"data={args.data}", f"trainer.max_steps={args.max_steps}", "trainer.max_epochs=1000",
               "trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}", *args.overrides]
        print("+", " ".join(cmd[2:]), flush=True)
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ), capture_output=True, text=True)
        wall = time.time() - t0
        if proc.returncode != 0:
            print(proc.stderr[-3000:], flush=True)
            rows.append({"model": model, "status": f"failed ({proc.returncode})"})
            continue
        res = json.loads((run_dir / "results.json").read_text())
        rows.append({"model": model, "status": "done", "params": res["params"], "steps": res["global_step"],
                     "val_curve": val_curve(run_dir), "best_val_ppl": res.get("best_val_ppl"),
                     "test_ppl": res.get("test_ppl"), "test_bpt": res.get("test_bpt"),
                     "tokens_per_s": res.get("train_tokens_per_s"), "wall_s": round(wall, 1)})
        print(json.dumps(rows[-1]), flush=True)
    lines = ["| model | params | steps | val ppl at each validation | best val ppl | test ppl | test bits/token "
             "| train tokens/s | wall s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "done":
            lines.append(f"| {r['model']} | {r['status']} |  |  |  |  |  |  |  |")
            continue
        curve = ", ".join(f"{v:.2f}" for _, v in r["val_curve"])
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.3f}M | {r['steps']} | {curve} | {r['best_val_ppl']:.3f} "
                     f"| {r['test_ppl']:.3f} | {r['test_bpt']:.3f} | {r['tokens_per_s'] or 0:,.0f} | {r['wall_s']} |")
    table = "\n".join(lines)
    print(table)
    (args.out / "compare.md").write_text(table + "\n")
    (args.out / "compare.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Train small models of each family on the synthetic recall tasks and tabulate their test accuracy.

    python scripts/synthetic_check.py --steps 1500 --out outputs/synthetic_check            # GPU
    python scripts/synthetic_check.py --steps 30 --seq-len 64 --batch-size 16 hardware=cpu  # CPU smoke run

A selective SSM (mamba) should solve selective copying and induction heads; LTI models (diag_ssm, s4d) should
not, at equal size and steps. Each (task, model) is one `ssmlm-train` run in <out>/<task>/<model>; the table
(test accuracy on the answers, chance = 1/n_tokens) is printed as Markdown and written to <out>/synthetic.md and
synthetic.json. Extra arguments are ssmlm-train overrides for every run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_one(task: str, model: str, args, out: Path) -> dict:
    cmd = [sys.executable, "-m", "ssmlm.train", f"model={model}", "data=synthetic", f"data.task={task}",
           f"data.seq_len={args.seq_len}", f"data.train_batches={args.val_every}", f"batch_size={args.batch_size}",
           f"size.emb_dim={args.emb_dim}", f"size.hidden={args.hidden}", f"size.n_layers={args.n_layers}",
           "size.dropout=0.0", f"optim.lr={args.lr}", "optim.weight_decay=0.0", "optim.warmup_steps=100",
           f"trainer.max_steps={args.steps}", "trainer.max_epochs=100000", "trainer.enable_progress_bar=false",
           "callbacks.text_samples=null", "callbacks.rich_summary=null", "logger=csv", "resume=false",
           f"run_name=synthetic_{task}_{model}", f"hydra.run.dir={out}", *args.overrides]
    print("+", " ".join(cmd[2:]), flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ), capture_output=True, text=True)
    row = {"task": task, "model": model, "wall_s": round(time.time() - t0, 1)}
    if proc.returncode != 0:
        print(proc.stderr[-3000:], flush=True)
        return {**row, "status": f"failed ({proc.returncode})"}
    res = json.loads((out / "results.json").read_text())
    return {**row, "status": "done", "params": res["params"], "steps": res["global_step"],
            "test_acc": res.get("test_acc"), "test_loss": res.get("test_loss")}


def table(rows: list[dict], tasks: list[str], models: list[str]) -> str:
    cell = {(r["task"], r["model"]): r for r in rows}

    def show(r):
        if r is None:
            return "-"
        return f"{r['test_acc']:.3f}" if r["status"] == "done" else r["status"]

    params = {r["model"]: r["params"] for r in rows if r["status"] == "done"}
    lines = ["| task | " + " | ".join(f"{m} ({params[m] / 1e3:.0f}k)" if m in params else m for m in models) + " |",
             "|---|" + "---:|" * len(models)]
    lines += [f"| {t} | " + " | ".join(show(cell.get((t, m))) for m in models) + " |" for t in tasks]
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=["selective_copying", "induction_heads"])
    p.add_argument("--models", nargs="+", default=["diag_ssm", "s4d", "mamba", "transformer"])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    # size.hidden 160 gives mamba d_model 64 (the size node keeps the families' parameter counts comparable)
    p.add_argument("--emb-dim", type=int, default=64)
    p.add_argument("--hidden", type=int, default=160)
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--val-every", type=int, default=250, help="training batches per epoch (validation after each)")
    p.add_argument("--out", type=Path, default=REPO / "outputs" / "synthetic_check")
    p.add_argument("overrides", nargs="*", help="extra ssmlm-train overrides for every run")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [run_one(task, model, args, args.out / task / model) for task in args.tasks for model in args.models]
    md = table(rows, args.tasks, args.models)
    chance = "chance = 1/data.n_tokens (0.0625 at the default 16)"
    text = f"Test accuracy on the answer tokens after {args.steps} steps, seq_len {args.seq_len} ({chance}).\n\n{md}\n"
    print("\n" + text)
    (args.out / "synthetic.md").write_text(text)
    (args.out / "synthetic.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                         "runs": rows}, indent=2) + "\n")
    if any(r["status"] != "done" for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()

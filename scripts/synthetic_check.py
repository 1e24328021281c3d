"""Train small models of each family on the synthetic recall tasks and tabulate their test accuracy.

    python scripts/synthetic_check.py --steps 1500 --out outputs/synthetic_check            # GPU
    python scripts/synthetic_check.py --steps 30 --seq-len 64 --batch-size 16 hardware=cpu  # CPU smoke run

A selective SSM (mamba) should solve selective copying and induction heads; LTI models (diag_ssm, s4d, s4, s5)
should not, at equal size and steps. By default every family runs (FAMILIES below). Each (task, model) is one `ssmlm-train` run in <out>/<task>/<label>; the table
(test accuracy on the answers, chance = 1/n_tokens) is printed as Markdown and written to <out>/synthetic.md and
synthetic.json. Extra arguments are ssmlm-train overrides for every run.

A model argument is a `model=` choice, optionally named and followed by overrides for that model only:
`--models mamba "mamba_wide=mamba size.hidden=320"` runs plain mamba and a wider one labelled mamba_wide.

Small models leave a GPU mostly idle (they are bound by kernel launches), so `--jobs N` runs N trainings at once.
With `--deadline S` every run still going after S seconds is stopped and reported with its last validation
accuracy and step (marked "val@step"), so a time-limited machine still returns a table.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# every family: LTI (diag_ssm, s4d, s4, s5), gated LTI (h3, hybrid), selective (mamba, hybrid with Mamba's SSM),
# attention (transformer) and an SSM stack with one attention layer (hybrid_attn)
FAMILIES = ["diag_ssm", "s4d", "s4", "s5", "h3", "hybrid", "hybrid_selective=hybrid model.ssm=selective", "mamba",
            "transformer", "hybrid_attn"]


def parse_model(spec: str) -> tuple[str, str, list[str]]:
    """'label=model override ...' | 'model override ...' | 'model' -> (label, model, overrides)."""
    head, *overrides = shlex.split(spec)
    label, _, model = head.rpartition("=")
    return (label or model), model, overrides


def last_validation(run_dir: Path) -> tuple[float | None, int | None]:
    """The last logged val/acc and its step, from the run's metrics.csv (None if it never validated)."""
    path = run_dir / "csv" / "metrics.csv"
    if not path.exists():
        return None, None
    acc = step = None
    with path.open() as f:
        for row in csv.DictReader(f):
            if row.get("val/acc"):
                acc, step = float(row["val/acc"]), int(float(row["step"]))
    return acc, step


def run_one(task: str, spec: str, args, out: Path, deadline: float | None) -> dict:
    label, model, model_overrides = parse_model(spec)
    run_dir = out / task / label
    cmd = [sys.executable, "-m", "ssmlm.train", f"model={model}", "data=synthetic", f"data.task={task}",
           f"data.seq_len={args.seq_len}", f"data.n_memorize={args.n_memorize}",
           f"data.train_batches={args.val_every}", f"batch_size={args.batch_size}",
           f"size.emb_dim={args.emb_dim}", f"size.hidden={args.hidden}", f"size.n_layers={args.n_layers}",
           "size.dropout=0.0", f"optim.lr={args.lr}", "optim.weight_decay=0.0", "optim.warmup_steps=100",
           f"trainer.max_steps={args.steps}", "trainer.max_epochs=100000", "trainer.enable_progress_bar=false",
           "callbacks.text_samples=null", "callbacks.rich_summary=null", "logger=csv", "resume=false",
           f"run_name=synthetic_{task}_{label}", f"hydra.run.dir={run_dir}", *args.overrides, *model_overrides]
    print("+", " ".join(cmd[2:]), flush=True)
    t0 = time.time()
    row = {"task": task, "model": label}
    with open(out / task / f"{label}.log", "w") as log:
        # its own process group, so stopping it at the deadline also stops its dataloader workers
        proc = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            proc.wait(timeout=None if deadline is None else max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
            acc, step = last_validation(run_dir)
            return {**row, "wall_s": round(time.time() - t0, 1), "status": "stopped at the deadline",
                    "val_acc": acc, "val_step": step}
    row["wall_s"] = round(time.time() - t0, 1)
    if proc.returncode != 0:
        print(f"{task}/{label} failed; its log: {out / task / f'{label}.log'}", flush=True)
        return {**row, "status": f"failed ({proc.returncode})"}
    res = json.loads((run_dir / "results.json").read_text())
    return {**row, "status": "done", "params": res["params"], "steps": res["global_step"],
            "test_acc": res.get("test_acc"), "test_loss": res.get("test_loss")}


def table(rows: list[dict], tasks: list[str], labels: list[str]) -> str:
    cell = {(r["task"], r["model"]): r for r in rows}

    def show(r):
        if r is None:
            return "-"
        if r["status"] == "done":
            return f"{r['test_acc']:.3f}"
        if r.get("val_acc") is not None:
            return f"{r['val_acc']:.3f} (val@{r['val_step']})"
        return r["status"]

    params = {r["model"]: r["params"] for r in rows if r["status"] == "done"}
    lines = ["| task | " + " | ".join(f"{m} ({params[m] / 1e3:.0f}k)" if m in params else m for m in labels) + " |",
             "|---|" + "---:|" * len(labels)]
    lines += [f"| {t} | " + " | ".join(show(cell.get((t, m))) for m in labels) + " |" for t in tasks]
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=["selective_copying", "induction_heads"])
    p.add_argument("--models", nargs="+", default=FAMILIES,
                   help="model= choices, each optionally 'label=model override ...' (quoted)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--n-memorize", type=int, default=16, help="selective copying: tokens to copy")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    # size.hidden 160 gives mamba d_model 64 (the size node keeps the families' parameter counts comparable)
    p.add_argument("--emb-dim", type=int, default=64)
    p.add_argument("--hidden", type=int, default=160)
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--val-every", type=int, default=250, help="training batches per epoch (validation after each)")
    p.add_argument("--jobs", type=int, default=1, help="trainings run at once")
    p.add_argument("--deadline", type=float, default=None, help="seconds; stop what is still running then")
    p.add_argument("--out", type=Path, default=REPO / "outputs" / "synthetic_check")
    p.add_argument("overrides", nargs="*", help="extra ssmlm-train overrides for every run")
    args = p.parse_args()
    labels = [parse_model(spec)[0] for spec in args.models]
    if len(set(labels)) != len(labels):
        p.error(f"--models: labels must be distinct, got {labels}; name variants 'label=model ...'")
    for task in args.tasks:
        (args.out / task).mkdir(parents=True, exist_ok=True)
    deadline = None if args.deadline is None else time.time() + args.deadline
    jobs = [(task, spec) for task in args.tasks for spec in args.models]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(lambda job: run_one(*job, args, args.out, deadline), jobs))
    md = table(rows, args.tasks, labels)
    chance = "chance = 1/data.n_tokens (0.0625 at the default 16)"
    text = (f"Test accuracy on the answer tokens after {args.steps} steps, seq_len {args.seq_len} ({chance}); "
            f"'val@step': stopped at the deadline, last validation accuracy.\n\n{md}\n")
    print("\n" + text)
    (args.out / "synthetic.md").write_text(text)
    (args.out / "synthetic.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                         "runs": rows}, indent=2) + "\n")
    if any(r["status"].startswith("failed") for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()

"""Train the dense model and sparse variants of it for the same steps, and tabulate what the masks save and cost.

    OMP_NUM_THREADS=1 python scripts/sparsity_check.py --jobs 2 -- hardware=cpu batch_size=16 \
        trainer.limit_val_batches=50                                   # 2-core CPU, 10-12 min
    python scripts/sparsity_check.py --experiment small --max-steps 1650 --val-every 550 --out outputs/sparsity

A variant is a `sparsity=` choice (conf/sparsity/), optionally labelled and followed by overrides for that run only:
`"nm_2_4_from_init=nm_2_4 sparsity.start=0"`; `dense` is `sparsity=none`. Each variant is one `ssmlm-train` run in
<out>/<label>; the table (nonzero parameters, matmul FLOPs per token, validation perplexity at the last step, its
cost against the dense run) is printed as Markdown and written to <out>/sparsity.md and sparsity.json. Extra
arguments are ssmlm-train overrides for every run. `--jobs N` runs N trainings at once (on a small CPU, one
thread each: OMP_NUM_THREADS=1 is much faster there than two threads fighting over two cores).

The perplexity compared is the last validation's (at --max-steps, the same step for every variant): the best
checkpoint of a gradually pruned run may be one from before pruning ended, denser than the final model.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DENSE = "dense"


def parse_variant(spec: str) -> tuple[str, str, list[str]]:
    """'label=choice override ...' | 'choice override ...' | 'choice' -> (label, sparsity choice, overrides)."""
    head, *overrides = shlex.split(spec)
    label, _, choice = head.rpartition("=")
    return (label or choice), ("none" if choice == DENSE else choice), overrides


def last_validation(run_dir: Path) -> tuple[int | None, float | None]:
    """(step, val/ppl) of the run's last validation, from its metrics.csv (logged at the step before the
    validation's: the last of max_steps steps validates at max_steps - 1)."""
    step = ppl = None
    path = run_dir / "csv" / "metrics.csv"
    if path.exists():
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                if row.get("val/ppl"):
                    step, ppl = int(float(row["step"])), float(row["val/ppl"])
    return step, ppl


def run_variant(spec: str, args) -> dict:
    label, choice, overrides = parse_variant(spec)
    run_dir = args.out / label
    cmd = [sys.executable, "-m", "ssmlm.train", f"model={args.model}", f"experiment={args.experiment}",
           f"data={args.data}", f"sparsity={choice}", f"trainer.max_steps={args.max_steps}", "trainer.max_epochs=1000",
           f"trainer.val_check_interval={args.val_every}", "trainer.check_val_every_n_epoch=null",
           "trainer.enable_progress_bar=false", "logger=csv", "test_after_fit=false", f"hydra.run.dir={run_dir}",
           *args.overrides, *overrides]
    print(f"+ {shlex.join(cmd[2:])}", flush=True)
    start = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ), capture_output=True, text=True)
    row = {"label": label, "sparsity": " ".join([choice, *overrides]), "wall_s": round(time.time() - start, 1)}
    if proc.returncode != 0:
        print(proc.stderr[-3000:], flush=True)
        return {**row, "status": f"failed ({proc.returncode})"}
    results = json.loads((run_dir / "results.json").read_text())
    step, ppl = last_validation(run_dir)
    row.update(status="done", steps=results["global_step"], params=results["params"], val_step=step, val_ppl=ppl,
               report=results.get("sparsity"))
    print(json.dumps(row), flush=True)
    return row


def table(rows: list[dict]) -> str:
    reports = [r["report"] for r in rows if r.get("report")]
    dense_flops = reports[0]["matmul_flops_per_token_dense"] if reports else None  # the same model in every run
    dense_ppl = next((r["val_ppl"] for r in rows if r["label"] == DENSE and r.get("val_ppl")), None)
    lines = ["| variant | sparsity | params (nonzero / all) | targeted weights kept | matmul FLOPs/token | steps "
             "| val ppl at the last step | ppl cost vs dense |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "done":
            lines.append(f"| {r['label']} | {r['sparsity']} | {r['status']} |  |  |  |  |  |")
            continue
        report = r["report"]
        nonzero = report["model_nonzero"] if report else r["params"]
        kept = (f"{report['target_nonzero']:,} / {report['target_params']:,} ({report['target_density']:.1%})"
                if report else "all")
        flops = report["matmul_flops_per_token"] if report else dense_flops
        saved = f" (-{report['matmul_flops_saved']:.1%})" if report else ""
        flops_text = f"{flops:,}{saved}" if flops is not None else "n/a"
        ppl = "n/a" if r["val_ppl"] is None else f"{r['val_ppl']:.3f}"
        if r["val_ppl"] is not None and r["val_step"] < r["steps"] - 1:
            ppl += f" (at step {r['val_step']})"  # the run stopped before its last validation
        cost = (f"{r['val_ppl'] / dense_ppl - 1:+.1%}" if dense_ppl and r["val_ppl"] is not None
                and r["label"] != DENSE else "")
        lines.append(f"| {r['label']} | {r['sparsity']} | {nonzero:,} / {r['params']:,} | {kept} | {flops_text} "
                     f"| {r['steps']} | {ppl} | {cost} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mamba")
    p.add_argument("--experiment", default="tiny")
    p.add_argument("--data", default="indic_chars")
    p.add_argument("--variants", nargs="+", default=[DENSE, "nm_2_4", "block", "magnitude"])
    p.add_argument("--max-steps", type=int, default=300)
    p.add_argument("--val-every", type=int, default=100, help="optimizer steps between validations")
    p.add_argument("--jobs", type=int, default=1, help="trainings run at once")
    p.add_argument("--out", type=Path, default=REPO / "outputs" / "sparsity_check")
    p.add_argument("overrides", nargs="*", help="extra ssmlm-train overrides for every run")
    args = p.parse_args()
    if args.max_steps % args.val_every:
        p.error("--max-steps must be a multiple of --val-every, so that every run validates at its last step")
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(lambda spec: run_variant(spec, args), args.variants))
    text = table(rows)
    print(text)
    print(f"total wall time {time.time() - start:.0f} s")
    (args.out / "sparsity.md").write_text(text + "\n")
    (args.out / "sparsity.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()

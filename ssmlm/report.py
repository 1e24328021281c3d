"""`ssmlm-report SWEEP_DIR`: every run of a sweep (or of any folder of runs) in one table, and two plots.

    ssmlm-report outputs/multirun/grid            # report.md, report.csv, report.png in the sweep dir
    ssmlm-report outputs/multirun/grid --wandb    # also a wandb run with the table and the plot (offline unless
                                                  # --wandb-mode online; `wandb sync` it later)

One row per run dir: its choices (experiment, model, data), shape (seq_len, batch, emb/hidden/layers, parameters),
progress (epochs, steps), results (best validation perplexity, test perplexity, test bits per token), speed
(training tokens/s, training time) and status: done, failed, stopped (by a signal; the same command resumes it),
unfinished (training now, or killed) or not started. Unfinished runs show their progress so far, from their
metrics CSV. report.png plots the best validation perplexity against seq_len (one line per
size) and against the parameter count (one line per seq_len).
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from ssmlm.plots import read_metrics
from ssmlm.run_dir import RunDir
from ssmlm.sweep import cell_dirs, read_status

COLUMNS = ["cell", "experiment", "model", "data", "seq_len", "batch", "emb", "hidden", "layers", "params", "epochs",
           "steps", "best_val_ppl", "test_ppl", "test_bpt", "tokens_per_s", "train_time_s", "status"]


def _select(cfg, key: str) -> Any:
    value = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
    return value if isinstance(value, (int, float, str)) or value is None else None


def _load_yaml(path: Path) -> dict:
    try:
        return yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def cell_row(run_dir: Path) -> dict[str, Any]:
    """The report row of one run dir (missing values are None)."""
    run = RunDir(run_dir, check=False)
    cfg = OmegaConf.create(_load_yaml(run.config_path()))
    choices = (_load_yaml(run_dir / ".hydra" / "hydra.yaml").get("hydra") or {}).get("runtime", {}).get("choices", {})
    results = run.results() or {}
    status = read_status(run_dir) or {}
    metrics = read_metrics(run_dir) if not results else {}
    val_ppl = [v for _, v in metrics.get("val/ppl", []) if math.isfinite(v)]
    steps = max((s for series in metrics.values() for s, _ in series), default=None)
    if run.is_done():
        state = "done"
    elif status.get("state") in ("failed", "stopped"):
        state = status["state"]
    else:  # training now, or killed without a word (see its train.log)
        state = "unfinished" if status or metrics else "not started"
    return {
        "cell": run_dir.name,
        "experiment": choices.get("experiment") or _select(cfg, "run_name"),
        "model": choices.get("model") or str(_select(cfg, "model._target_") or "").rsplit(".", 1)[-1] or None,
        "data": choices.get("data") or str(_select(cfg, "data._target_") or "").rsplit(".", 1)[-1] or None,
        "seq_len": _select(cfg, "data.seq_len"),
        "batch": _select(cfg, "batch_size"),
        "emb": _select(cfg, "size.emb_dim"),
        "hidden": _select(cfg, "size.hidden"),
        "layers": _select(cfg, "size.n_layers"),
        "params": results.get("params", status.get("params")),
        "epochs": results.get("epoch"),
        "steps": results.get("global_step", status.get("global_step", steps)),
        "best_val_ppl": results.get("best_val_ppl", min(val_ppl) if val_ppl else None),
        "test_ppl": results.get("test_ppl"),
        "test_bpt": results.get("test_bpt"),
        "tokens_per_s": results.get("train_tokens_per_s"),
        "train_time_s": results.get("train_time_s", results.get("wall_time_s_this_session")),
        "status": state,
    }


def _row_order(row: dict) -> tuple:
    """Rows grouped by model and data, then by size and context length (numerically)."""
    return (str(row["model"]), str(row["data"]), row["params"] or math.inf, row["seq_len"] or math.inf, row["cell"])


def _fmt(key: str, value: Any) -> str:
    if value is None:
        return "–"
    if key == "params":
        return f"{value / 1e6:.2f}M" if value >= 1e6 else f"{value / 1e3:.1f}K"
    if key == "train_time_s":
        return f"{value / 3600:.1f} h" if value >= 3600 else f"{value / 60:.1f} min"
    if key == "tokens_per_s":
        return f"{value:,.0f}"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def write_markdown(rows: list[dict], sweep_dir: Path, path: Path, plot: Path | None) -> None:
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    lines = [f"# {sweep_dir.name}", "", f"{len(rows)} run(s): " + ", ".join(f"{n} {s}" for s, n in counts.items()),
             "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(k, row[k]) for k in COLUMNS) + " |" for row in rows]
    lines += ["", ("Perplexities are per token (character or byte); `test_bpt` is test bits per token. "
                   "`train_time_s` is the training time summed over the restarts of a run.")]
    if plot is not None:
        lines += ["", f"![validation perplexity]({plot.name})"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def plot(rows: list[dict], path: Path) -> Path | None:
    """Best validation perplexity vs seq_len (a line per model size) and vs parameters (a line per seq_len)."""
    scored = [r for r in rows if r["best_val_ppl"] is not None and r["seq_len"] is not None]
    if not scored:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    several_models = len({r["model"] for r in scored}) > 1
    several_data = len({r["data"] for r in scored}) > 1

    def label(row: dict, key: str) -> str:
        parts = [row["model"]] if several_models else []
        parts += [row["data"]] if several_data else []
        return "/".join([*parts, f"{row[key]}" if key == "experiment" else f"seq_len {row[key]}"])

    fig, (by_len, by_size) = plt.subplots(1, 2, figsize=(13, 4.6))
    for ax, key, x in ((by_len, "experiment", "seq_len"), (by_size, "seq_len", "params")):
        lines: dict[str, list[tuple[float, float]]] = {}
        order: dict[str, float] = {}  # legend order: sizes by parameter count, context lengths by length
        for row in scored:
            if row[x] is not None:
                name = label(row, key)
                lines.setdefault(name, []).append((row[x], row["best_val_ppl"]))
                rank = row["params"] if key == "experiment" else row["seq_len"]
                order[name] = min(order.get(name, math.inf), rank if rank is not None else math.inf)
        for name in sorted(lines, key=lambda n: (order[n], n)):
            xs, ys = zip(*sorted(lines[name]))
            ax.plot(xs, ys, marker="o", label=name)
        ax.set_xscale("log", base=2 if x == "seq_len" else 10)
        ax.set_xlabel("sequence length (tokens)" if x == "seq_len" else "parameters")
        ax.set_ylabel("best validation perplexity")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    by_len.set_title("vs context length, one line per size")
    by_size.set_title("vs model size, one line per context length")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def push_to_wandb(rows: list[dict], sweep_dir: Path, plot_path: Path | None, project: str, mode: str) -> str:
    import wandb

    run = wandb.init(project=project, job_type="report", group=sweep_dir.name, name=f"report-{sweep_dir.name}",
                     dir=str(sweep_dir), mode=mode)
    table = wandb.Table(columns=COLUMNS, data=[[row[k] for k in COLUMNS] for row in rows])
    payload: dict[str, Any] = {"sweep_report": table}
    if plot_path is not None:
        payload["sweep_report_plot"] = wandb.Image(str(plot_path))
    run.log(payload)
    run.finish()
    return run.dir


def report(sweep_dir: Path, out_dir: Path | None = None) -> tuple[list[dict], dict[str, Path]]:
    """Writes report.md, report.csv and report.png for the runs below ``sweep_dir``; returns rows and paths."""
    if not sweep_dir.is_dir():
        raise SystemExit(f"ssmlm-report: {sweep_dir}: no such directory (pass a sweep dir, e.g. outputs/multirun/grid)")
    cells = cell_dirs(sweep_dir)
    if not cells:
        raise SystemExit(f"ssmlm-report: {sweep_dir} holds no run (no subfolder with status.json or "
                         f".hydra/config.yaml); pass the folder of a multirun, e.g. outputs/multirun/grid")
    rows = sorted((cell_row(cell) for cell in cells), key=_row_order)
    out_dir = out_dir or sweep_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"md": out_dir / "report.md", "csv": out_dir / "report.csv"}
    plot_path = plot(rows, out_dir / "report.png")
    if plot_path is not None:
        paths["png"] = plot_path
    write_csv(rows, paths["csv"])
    write_markdown(rows, sweep_dir, paths["md"], plot_path)
    return rows, paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ssmlm-report", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path, help="a multirun folder (outputs/multirun/<sweep_name>) or run dir")
    parser.add_argument("--out", type=Path, default=None, help="where to write the report (default: SWEEP_DIR)")
    parser.add_argument("--wandb", action="store_true", help="also log the table and plot to a wandb run")
    parser.add_argument("--wandb-project", default="ssmlm")
    parser.add_argument("--wandb-mode", default="offline", choices=["offline", "online"])
    args = parser.parse_args(argv)
    rows, paths = report(args.sweep_dir, args.out)
    print(paths["md"].read_text(encoding="utf-8"))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    if args.wandb:
        where = push_to_wandb(rows, args.sweep_dir, paths.get("png"), args.wandb_project, args.wandb_mode)
        print(f"wandb: report logged ({args.wandb_mode}; files in {where})", file=sys.stderr)


if __name__ == "__main__":
    main()

"""Training curves of a run from its metrics CSV (``<run dir>/csv/metrics.csv``)."""

from __future__ import annotations

import csv
import math
from pathlib import Path


def read_metrics(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """metric name -> [(step, value)] from the CSV logger's file (rows hold a subset of columns each)."""
    path = Path(run_dir) / "csv" / "metrics.csv"
    series: dict[str, list[tuple[int, float]]] = {}
    if not path.exists():
        return series
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step = row.get("step")
            if not step:
                continue
            for key, value in row.items():
                if key in ("step", "epoch") or value in ("", None):
                    continue
                series.setdefault(key, []).append((int(float(step)), float(value)))
    return series


def plot_run_curves(run_dir: Path, out_name: str = "curves.png") -> Path | None:
    """Loss, perplexity and accuracy against optimizer step, train and val; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = read_metrics(run_dir)
    if not series:
        return None
    panels = [("loss", "cross-entropy (nats/token)", False), ("ppl", "perplexity (log scale)", True),
              ("acc", "next-token accuracy", False)]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (metric, ylabel, log) in zip(axes, panels):
        for split, style in (("train", dict(alpha=0.45, lw=1)), ("val", dict(marker="o", lw=2))):
            points = [(s, v) for s, v in series.get(f"{split}/{metric}", []) if math.isfinite(v)]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, label=split, **style)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.set_title(metric)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(Path(run_dir).name)
    fig.tight_layout()
    out = Path(run_dir) / out_name
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out

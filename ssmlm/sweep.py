"""Sweeps: the status file of each cell, and the summary a multirun prints when it ends.

A multirun (``ssmlm-train -m sweep=grid``, or any Hydra sweep) puts each cell in
``outputs/multirun/<sweep_name>/<cell overrides>/``; ``ssmlm-train`` keeps ``status.json`` there::

    {"state": "done", "global_step": 1200, "error": null, "updated": "...",
     "history": [{"event": "started", "step": 0, "launch": "...", "job": "4711_0", "time": "..."}, ...]}

``state`` is the latest event: ``started`` or ``resumed`` (training now, from scratch or from a checkpoint),
``stopped`` (by a signal or Ctrl-C; the same command resumes it), ``done``, ``skipped`` (already done when
launched), ``failed`` (``error`` says why). Each event names the multirun that launched it (``launch``), so the
summary of a multirun covers exactly its own cells even when the sweep dir holds cells of earlier sweeps.
"""

from __future__ import annotations

import json
import secrets
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from ssmlm import slurm
from ssmlm.errors import SsmlmError
from ssmlm.run_dir import CONFIG_FILE, RESULTS_FILE, STATUS_FILE, CellStatus, atomic_write, read_status

__all__ = ["CellStatus", "read_status", "cell_dirs", "summarize", "SweepMonitor"]

LAUNCH_FILE = ".launch"  # in the sweep dir: the id of the multirun that launched its cells last
OUTCOMES = ("done", "resumed", "skipped", "failed", "unfinished")


def launch_id(sweep_dir: str | Path) -> str | None:
    """The id the running multirun wrote into its sweep dir (None when there is none)."""
    try:
        return (Path(sweep_dir) / LAUNCH_FILE).read_text().strip() or None
    except OSError:
        return None


def cell_dirs(sweep_dir: str | Path) -> list[Path]:
    """The run dirs directly below ``sweep_dir`` (or ``sweep_dir`` itself when it is a run dir), sorted."""
    root = Path(sweep_dir)
    if _is_run_dir(root):
        return [root]
    return sorted(p for p in root.iterdir() if p.is_dir() and _is_run_dir(p)) if root.is_dir() else []


def _is_run_dir(path: Path) -> bool:
    return any((path / name).exists() for name in (STATUS_FILE, CONFIG_FILE, ".hydra/config.yaml"))


def outcome(status: dict[str, Any] | None, launch: str | None) -> str | None:
    """What a launch did to a cell: done (trained to the end from scratch), resumed (finished after resuming a
    checkpoint), skipped (already done), failed, unfinished (stopped without an end: killed, or still running).
    None when that launch never reached the cell."""
    events = [e["event"] for e in (status or {}).get("history", []) if e.get("launch") == launch]
    if not events:
        return None
    if events[-1] in ("skipped", "failed"):
        return events[-1]
    if events[-1] == "done":
        return "resumed" if "resumed" in events else "done"
    return "unfinished"


def summarize(sweep_dir: str | Path, launch: str | None) -> tuple[str, dict[str, int]]:
    """A readable summary of the cells of one launch, and the count of each outcome."""
    rows, counts = [], dict.fromkeys(OUTCOMES, 0)
    for cell in cell_dirs(sweep_dir):
        status = read_status(cell)
        result = outcome(status, launch)
        if result is None:
            continue
        counts[result] += 1
        rows.append((result, cell.name, _detail(cell, status, result, launch)))
    total = sum(counts.values())
    head = f"sweep {sweep_dir}: {total} cell(s): " + ", ".join(f"{n} {k}" for k, n in counts.items() if n)
    width = max((len(name) for _, name, _ in rows), default=0)
    lines = [head] + [f"  {result:<10} {name:<{width}}  {detail}" for result, name, detail in rows]
    return "\n".join(lines), counts


def _detail(cell: Path, status: dict[str, Any], result: str, launch: str | None) -> str:
    if result == "failed":
        return (status.get("error") or "").strip().splitlines()[0][:300] if status.get("error") else "(no message)"
    parts = [f"step {status.get('global_step')}"]
    try:
        results = json.loads((cell / RESULTS_FILE).read_text())
    except (OSError, ValueError):
        results = {}
    if "best_val_ppl" in results:
        parts.append(f"best val ppl {results['best_val_ppl']:.3f}")
    resumed = [e.get("step") for e in status["history"] if e.get("launch") == launch and e["event"] == "resumed"]
    if resumed:
        parts.append("resumed from step " + ", ".join(str(s) for s in resumed))
    if result == "unfinished":
        parts.append(f"last event: {status.get('state')}; see {cell / 'train.log'}")
    return "; ".join(parts)


class SweepMonitor(Callback):
    """Hydra callback (conf/hydra/default.yaml) around a multirun. At its start: marks the launch with an id
    (its cells record it in status.json) and, for SLURM, asks sbatch whether it takes the jobs. At its end: prints
    which cells were done, resumed, skipped (already done), failed or left unfinished, and exits with status 1
    if any cell failed, so scripts notice."""

    def __init__(self) -> None:
        self.launch: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        self.launch = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        atomic_write(sweep_dir / LAUNCH_FILE, self.launch + "\n")
        try:
            slurm.check_submission(config.hydra.launcher, sweep_dir)
        except SsmlmError as e:  # Hydra would turn an exception here into a warning and submit anyway
            print(f"ssmlm-train: error: {e}", file=sys.stderr)
            sys.exit(2)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        text, counts = summarize(sweep_dir, self.launch)
        print(f"\n{text}\nreport: ssmlm-report {sweep_dir}", flush=True)
        if counts["failed"]:
            print(f"ssmlm-train: {counts['failed']} cell(s) failed (their status.json and train.log say why)",
                  file=sys.stderr)
            sys.exit(1)

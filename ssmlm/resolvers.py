"""OmegaConf resolvers used by the configs (``${ssmlm.*:...}``). Registered once, on import of ssmlm.train."""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from pathlib import Path

from omegaconf import OmegaConf

from ssmlm.errors import ConfigError, number


def detect_hardware(key: str):
    """What ``hardware=auto`` resolves to on this machine."""
    import torch

    cuda = torch.cuda.is_available()
    if key == "accelerator":
        return "gpu" if cuda else "cpu"
    if key == "precision":
        if not cuda:
            return "32-true"
        return "bf16-mixed" if torch.cuda.is_bf16_supported(including_emulation=False) else "32-true"
    if key == "num_workers":
        # the token windows are cheap to cut, a couple of workers keep a GPU fed; the CPU needs its cores itself
        return min(4, (os.cpu_count() or 2) // 2) if cuda else 0
    raise ConfigError(f"unknown hardware key {key!r} in ${{ssmlm.hw:...}}")


def _world(devices, num_nodes) -> int:
    if isinstance(devices, (list, tuple)):
        n = len(devices)
    elif devices in (None, "auto", -1, "-1"):
        import torch

        n = max(1, torch.cuda.device_count())
    else:
        n = int(devices)
    return n * int(num_nodes or 1)


def split_batch(global_batch: int, micro_batch, devices, num_nodes) -> tuple[int, int]:
    """(per-device micro-batch, gradient accumulation) keeping ``global_batch`` sequences per optimizer step."""
    world = _world(devices, num_nodes)
    global_batch = number("batch_size", _as_int(global_batch), minimum=1, integer=True)
    if micro_batch in (None, "null"):
        micro_batch = max(1, global_batch // world)
    micro_batch = number("hardware.micro_batch_size", _as_int(micro_batch), minimum=1, integer=True)
    per_step = world * micro_batch
    if global_batch % per_step:
        raise ConfigError(
            f"batch_size={global_batch} is not a multiple of devices*num_nodes*hardware.micro_batch_size "
            f"= {world}*{micro_batch}; pick hardware.micro_batch_size so it divides batch_size/{world}"
        )
    return micro_batch, global_batch // per_step


def _as_int(value):
    """Resolver arguments arrive as strings when interpolated into text; whole numbers become ints."""
    return int(value) if isinstance(value, str) and value.strip().lstrip("-").isdigit() else value


def run_id(override_dirname: str) -> str:
    """A directory name from a run's overrides: readable, filesystem-safe, short, and the same on every rerun."""
    if not override_dirname:
        return "default"
    name = re.sub(r"[^A-Za-z0-9_.,=+-]", "_", override_dirname.replace("/", "-"))
    if len(name) > 120:
        name = name[:100] + "-" + hashlib.sha1(override_dirname.encode()).hexdigest()[:10]
    return name


def wandb_id(output_dir: str | None) -> str | None:
    """The run's wandb id: created once, stored in the run dir, reused by every restart of the run.

    Created by a hard link, which fails if the file exists: when several DDP ranks resolve it at once, the first
    one's id wins and all of them read it back."""
    if output_dir is None:  # `--cfg job --resolve` prints the config before there is a run dir: no id yet
        return None
    path = Path(output_dir) / "wandb_id.txt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"wandb_id.{os.getpid()}.tmp")
        tmp.write_text(secrets.token_hex(4) + "\n")
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_text().strip()


def process_rank() -> int:
    """This process's global rank, from the launcher's environment (srun, torchrun, Lightning's DDP children)."""
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def log_name(stem: str) -> str:
    """``<stem>.log`` for rank 0, ``<stem>.rank<N>.log`` for the others (each DDP rank logs to its own file)."""
    rank = process_rank()
    return f"{stem}.log" if rank == 0 else f"{stem}.rank{rank}.log"


def scaled_width(hidden: int, factor: float, multiple: int) -> int:
    """``hidden * factor`` rounded to the nearest multiple of ``multiple`` (at least ``multiple``).

    Families spend parameters differently per unit of width (a diag-SSM layer ~hidden^2, an S4D layer
    ~2d^2, a Transformer block ~12d^2), so matching parameter counts at a size preset scales the preset's
    hidden size by a per-family factor: ``d_model: ${ssmlm.width:${size.hidden},0.645,16}``.
    """
    return max(int(multiple), int(multiple) * round(int(hidden) * float(factor) / int(multiple)))


def on_rank_zero(value):
    """``value`` in the rank-0 process, None in the others (e.g. only rank 0 writes Hydra's .hydra/ folder)."""
    return value if process_rank() == 0 else None


def register() -> None:
    resolvers = {
        "ssmlm.hw": detect_hardware,
        "ssmlm.micro_batch": lambda b, m, d, n: split_batch(b, m, d, n)[0],
        "ssmlm.grad_accum": lambda b, m, d, n: split_batch(b, m, d, n)[1],
        "ssmlm.run_id": run_id,
        "ssmlm.wandb_id": wandb_id,
        "ssmlm.width": scaled_width,
        "ssmlm.log_name": log_name,
        "ssmlm.on_rank_zero": on_rank_zero,
    }
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)

"""Reads the history a wandb run wrote to its ``run-<id>.wandb`` file (the format of offline runs), so tests can
check what was logged without a wandb server.

The file is a LevelDB-style log: a 7-byte file header (":W&B", magic, version), then 32 KiB blocks of records,
each with a 7-byte header (CRC32, length, type: full / first / middle / last piece), padded at block ends; each
record is a protobuf ``wandb.proto.wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK, HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    """The protobuf records of one .wandb file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a wandb run file")
    pos, pieces = HEADER, []
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:
            pos += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if kind == 0 and length == 0:
            break  # zero padding at the end of a file still being written
        payload = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        pieces.append(payload)
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(pieces))
            pieces = []
            yield record


def history(path: Path) -> list[dict]:
    """The history rows of one .wandb file: {key: value}, with ``_step``."""
    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            row = {}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            if record.history.HasField("step"):
                row.setdefault("_step", record.history.step.num)
            rows.append(row)
    return rows


def offline_runs(run_dir: Path) -> list[Path]:
    """The .wandb files of a run dir's offline wandb runs, oldest first."""
    return sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))


def run_info(path: Path) -> dict:
    """The run's tags, group and name, and the config keys it logged, from one .wandb file."""
    info = {"tags": [], "group": None, "name": None, "config": set()}
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            info.update(tags=list(record.run.tags), group=record.run.run_group, name=record.run.display_name)
        elif kind == "config":
            info["config"] |= {item.key for item in record.config.update}
    return info

"""Where the Hydra configs are: the repo's conf/ in a source checkout, else the copy shipped in the wheel."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def config_dir() -> Path:
    """The folder holding train.yaml and the config groups.

    A wheel installs conf/ as package data, ``ssmlm/conf`` (pyproject.toml maps it there); a source checkout
    (editable install, or ``python -m ssmlm.train`` from the repo) has it at the top level, next to ``ssmlm/``.
    """
    packaged = Path(str(resources.files("ssmlm").joinpath("conf")))
    if (packaged / "train.yaml").is_file():
        return packaged
    return Path(__file__).resolve().parents[1] / "conf"

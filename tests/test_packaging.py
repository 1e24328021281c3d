"""The package as installed: the wheel carries conf/ and the built-in corpus, the entry points find their configs
from any folder, and ``--cfg job --resolve`` prints a config under every logger choice."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from ssmlm.conf_dir import config_dir

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
LOGGERS = sorted(p.stem for p in (REPO / "conf" / "logger").glob("*.yaml"))


def test_pyproject_lists_every_package():
    """pyproject.toml names its packages one by one (to map conf/ into ssmlm.conf): none may be forgotten."""
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])

    def folders_with_files(root: Path, prefix: tuple[str, ...]) -> set[str]:
        return {".".join(prefix + p.parent.relative_to(root).parts) for p in root.rglob("*")
                if p.is_file() and "__pycache__" not in p.parts and not p.name.startswith(".")}

    assert listed == folders_with_files(REPO / "ssmlm", ("ssmlm",)) | folders_with_files(REPO / "conf",
                                                                                         ("ssmlm", "conf"))


def test_a_source_checkout_reads_the_top_level_conf():
    assert config_dir() == REPO / "conf"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(REPO)], check=True, capture_output=True, cwd=out)
    return next(out.glob("ssmlm-*.whl"))


def test_wheel_ships_the_configs_and_the_builtin_corpus_but_no_site_settings(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    conf = {str(p.relative_to(REPO)) for p in (REPO / "conf").rglob("*.yaml") if p.parent.name != "local"}
    assert {f"ssmlm/{c}" for c in conf} <= names
    assert {f"ssmlm/data/builtin/hindi/premchand/{s}.txt.xz" for s in ("train", "valid", "test")} <= names
    assert {"ssmlm/data/builtin/SHA256SUMS", "ssmlm/data/builtin/README.md"} <= names
    assert not [n for n in names if n.startswith("ssmlm/conf/local/") and n.endswith(".yaml")]


def test_unpacked_wheel_finds_its_configs_from_another_folder(wheel, tmp_path):
    """What a non-editable install sees: ssmlm/ with conf/ inside it, run from a folder with no conf/."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(site))
    proc = subprocess.run([sys.executable, "-c", "from ssmlm.conf_dir import config_dir; print(config_dir())"],
                          cwd=elsewhere, env=env, capture_output=True, text=True)
    assert proc.stdout.strip() == str(site / "ssmlm" / "conf"), proc.stderr
    proc = subprocess.run([sys.executable, "-m", "ssmlm.train", "--cfg", "job", "data=synthetic"], cwd=elsewhere,
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and "SyntheticDataModule" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.parametrize("logger", LOGGERS)
def test_cfg_job_resolve_works_with_every_logger(logger, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ssmlm.train", "--cfg", "job", "--resolve", f"logger={logger}"],
                          cwd=tmp_path, capture_output=True, text=True, env=dict(os.environ, HYDRA_FULL_ERROR="0"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "_target_: ssmlm.data.CharDataModule" in proc.stdout and "${" not in proc.stdout
    assert list(tmp_path.iterdir()) == []  # printing the config creates no run dir and no wandb id

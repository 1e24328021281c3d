"""A finished (or running) training run, read back from its directory; and the key=value command lines of
the tools that read runs (``ssmlm-generate``, ``ssmlm-eval``).

A run dir, as ``ssmlm-train`` writes it::

    .hydra/config.yaml            the composed training config
    vocab.json                    the vocabulary (character runs)
    checkpoints/last.ckpt         the latest state (its ModelCheckpoint state lists the top-k and their scores)
    checkpoints/epoch*-step*-ppl*.ckpt   the top-k checkpoints by validation perplexity
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import DictConfig, OmegaConf

from ssmlm.conf_dir import config_dir
from ssmlm.data.tokenizers import tokenizer_from_dict
from ssmlm.errors import CheckpointError, ConfigError, DataError

CONF_DIR = config_dir()
# the score ModelCheckpoint writes into the file name (conf/callbacks/default.yaml), "-v1" on a name clash
SCORE_IN_NAME = re.compile(r"ppl(?P<score>[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?|nan|inf)(?:-v\d+)?\.ckpt$")
# torch.compile wraps the model; its checkpoints name parameters "model._orig_mod.<name>"
COMPILED_PREFIX = "_orig_mod."


class RunDir:
    """Locates a run's config, vocabulary and checkpoints, with clear errors when one is missing."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        if not self.path.is_dir():
            raise ConfigError(f"run_dir={path}: no such directory. Pass the directory ssmlm-train wrote "
                              f"(it holds checkpoints/ and .hydra/config.yaml), e.g. outputs/runs/default.")
        self.checkpoint_dir = self.path / "checkpoints"
        if not self.checkpoint_dir.is_dir() and not (self.path / ".hydra" / "config.yaml").exists():
            raise ConfigError(f"run_dir={path} is not a training run: it has neither checkpoints/ nor "
                              f".hydra/config.yaml. Pass the directory ssmlm-train wrote.")

    # --- config -----------------------------------------------------------------------------------------
    def config(self) -> DictConfig:
        """The run's training config, with ``paths.output_dir`` pointing at this run dir (not resolved:
        interpolations resolve when used, with this machine's data dir and hardware)."""
        path = self.path / ".hydra" / "config.yaml"
        if not path.exists():
            raise ConfigError(f"{path} is missing: the run's config is needed to rebuild its data. Copy the run's "
                              f".hydra/ folder back, or evaluate a run dir written by ssmlm-train.")
        from ssmlm import resolvers

        resolvers.register()
        cfg = OmegaConf.load(path)
        OmegaConf.update(cfg, "paths.output_dir", str(self.path.resolve()), force_add=True)
        return cfg

    # --- checkpoints ------------------------------------------------------------------------------------
    def checkpoint(self, spec: str | Path = "best") -> Path:
        """``best`` (lowest validation perplexity), ``last``, or a path (absolute, or relative to the current
        directory, the run dir or its checkpoints/)."""
        spec = str(spec)
        if spec == "best":
            ranked = self.ranked_checkpoints()
            if not ranked:
                raise CheckpointError(f"no scored checkpoint (epoch*-step*-ppl*.ckpt) in {self.checkpoint_dir}: "
                                      f"the run never validated. Use ckpt=last or ckpt=<path>.")
            return ranked[0][0]
        if spec == "last":
            path = self.checkpoint_dir / "last.ckpt"
            if not path.exists():
                raise CheckpointError(f"{path} does not exist. Use ckpt=best or ckpt=<path to a .ckpt file>.")
            return path
        for candidate in (Path(spec).expanduser(), self.path / spec, self.checkpoint_dir / spec):
            if candidate.is_file():
                return candidate
        raise CheckpointError(f"ckpt={spec}: no such checkpoint (looked in the current directory, {self.path} and "
                              f"{self.checkpoint_dir}). Use ckpt=best, ckpt=last or a path to a .ckpt file.")

    def ranked_checkpoints(self) -> list[tuple[Path, float]]:
        """The top-k checkpoints present in checkpoints/, best first, with their validation scores.

        Scores come from the ModelCheckpoint state saved in last.ckpt (``best_k_models``, matched by file
        name so a moved run dir still works) and otherwise from the score in the file name.
        """
        if not self.checkpoint_dir.is_dir():
            return []
        recorded, mode = self._recorded_scores()
        if mode is None:
            mode = self._config_mode()
        ranked = []
        for path in self.checkpoint_dir.glob("*.ckpt"):
            match = SCORE_IN_NAME.search(path.name)
            score = recorded.get(path.name, float(match["score"]) if match else None)
            if score is not None and math.isfinite(score):
                ranked.append((path, score))
        ranked.sort(key=lambda item: (item[1] if mode == "min" else -item[1], item[0].name))
        return ranked

    def top_checkpoints(self, k: int) -> list[tuple[Path, float]]:
        """The k best checkpoints with their validation scores, best first."""
        ranked = self.ranked_checkpoints()
        if k < 1:
            raise ConfigError(f"asked for the top {k} checkpoints: use a positive number")
        if len(ranked) < k:
            raise CheckpointError(f"asked for the top {k} checkpoints but {self.checkpoint_dir} holds {len(ranked)} "
                                  f"scored ones; use at most {len(ranked)} (the run kept "
                                  f"callbacks.model_checkpoint.save_top_k of them).")
        return ranked[:k]

    def _recorded_scores(self) -> tuple[dict[str, float], str | None]:
        last = self.checkpoint_dir / "last.ckpt"
        if not last.exists():
            return {}, None
        try:
            callbacks = torch.load(last, map_location="cpu", weights_only=False, mmap=True).get("callbacks", {})
        except Exception:  # a torn last.ckpt: the file names still carry the scores
            return {}, None
        for key, state in callbacks.items():
            if str(key).startswith("ModelCheckpoint") and isinstance(state, dict) and "best_k_models" in state:
                mode = re.search(r"'mode': '(min|max)'", str(key))
                scores = {Path(p).name: float(s) for p, s in state["best_k_models"].items()}
                return scores, mode[1] if mode else None
        return {}, None

    def _config_mode(self) -> str:
        try:
            mode = OmegaConf.select(self.config(), "callbacks.model_checkpoint.mode", default="min")
        except ConfigError:
            mode = "min"
        return mode if mode in ("min", "max") else "min"

    # --- vocabulary -------------------------------------------------------------------------------------
    def tokenizer(self, checkpoint: dict | None = None):
        """The run's tokenizer from vocab.json, else from the checkpoint's hyper-parameters; when both exist
        they must agree (a vocab.json from another run would silently scramble the text)."""
        stored = (checkpoint or {}).get("hyper_parameters", {}).get("tokenizer")
        path = self.path / "vocab.json"
        if path.exists():
            try:
                described = json.loads(path.read_text(encoding="utf-8"))
                tokenizer = tokenizer_from_dict(described)
            except (ValueError, UnicodeDecodeError) as e:
                raise DataError(f"{path} is not a vocabulary written by ssmlm-train ({e}). Restore the run's "
                                f"vocab.json or delete it to use the vocabulary stored in the checkpoint.") from e
            if stored is not None and tokenizer_from_dict(stored) != tokenizer:
                raise CheckpointError(f"{path} differs from the vocabulary stored in the checkpoint: the vocab.json "
                                      f"belongs to another run. Restore this run's vocab.json or delete it.")
            return tokenizer
        if stored is None:
            raise DataError(f"no vocabulary for {self.path}: vocab.json is missing and the checkpoint stores none. "
                            f"Copy the run's vocab.json back into the run dir.")
        return tokenizer_from_dict(stored)


# --- checkpoint files ---------------------------------------------------------------------------------------
def read_checkpoint(path: Path) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # torn, foreign or not a checkpoint at all
        raise CheckpointError(f"cannot read checkpoint {path} ({type(e).__name__}: {e}). Pick another with "
                              f"ckpt=best|last|<path>.") from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise CheckpointError(f"{path} is not an ssmlm-train checkpoint (no state_dict / hyper_parameters).")
    return ckpt


def model_state(ckpt: dict) -> dict[str, torch.Tensor]:
    """The checkpoint's weights with the names of an uncompiled LMModule."""
    return {k.replace(COMPILED_PREFIX, ""): v for k, v in ckpt["state_dict"].items()}


def build_model(ckpt: dict, device: torch.device | str = "cpu", path: Path | None = None):
    """The checkpoint's ``LanguageModel`` in eval mode on ``device``."""
    from ssmlm.lm import LMModule

    hparams = dict(ckpt["hyper_parameters"], compile=False)
    try:
        module = LMModule(**hparams)
        module.load_state_dict(model_state(ckpt))
    except Exception as e:
        raise CheckpointError(f"cannot rebuild the model of {path or 'the checkpoint'} ({type(e).__name__}: {e}); "
                              f"it was written by an incompatible version of ssmlm.") from e
    return module.model.to(device).eval()


def average_checkpoints(paths: list[Path], out_path: Path) -> Path:
    """Averages the weights of ``paths`` (same run) into one checkpoint at ``out_path``, written atomically.

    Floating-point tensors are averaged in fp32 and cast back; anything else is taken from the first, but for
    sparsity masks (bool ``weight_mask`` buffers, ssmlm.sparsity): a weight is kept only where every checkpoint
    kept it (a gradual run's masks shrink between checkpoints), and the averaged weight is zero elsewhere.
    """
    from ssmlm.callbacks import AtomicCheckpointIO

    first = read_checkpoint(paths[0])
    averaged = {k: v.float().clone() if v.is_floating_point() else v.clone() for k, v in model_state(first).items()}
    for path in paths[1:]:
        state = model_state(read_checkpoint(path))
        if state.keys() != averaged.keys():
            raise CheckpointError(f"{path} holds other parameters than {paths[0]}: they come from different models.")
        for name, total in averaged.items():
            if total.is_floating_point():
                total += state[name].float()
            elif name.endswith(".weight_mask"):
                total &= state[name]
    reference = model_state(first)
    for name, total in averaged.items():
        if total.is_floating_point():
            averaged[name] = (total / len(paths)).to(reference[name].dtype)
    for name, mask in averaged.items():
        if name.endswith(".weight_mask"):
            weight = name.removesuffix("_mask")
            averaged[weight] = averaged[weight] * mask
    ckpt = {
        "state_dict": averaged,
        "hyper_parameters": first["hyper_parameters"],
        "pytorch-lightning_version": first.get("pytorch-lightning_version"),
        "averaged_from": [p.name for p in paths],
    }
    AtomicCheckpointIO().save_checkpoint(ckpt, out_path)
    return out_path


# --- devices ------------------------------------------------------------------------------------------------
def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but this machine has no CUDA GPU; use device=cpu or device=auto")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"device={name}: not a device ({e}); use auto, cpu, cuda or cuda:N") from e


# --- key=value command lines --------------------------------------------------------------------------------
def tool_config(name: str, argv: list[str], open_keys: tuple[str, ...] = ()) -> DictConfig:
    """``conf/<name>.yaml`` updated by ``key=value`` arguments.

    Values are taken verbatim for keys whose default is a string (so ``prompt=नमस्ते, दुनिया`` needs no
    quoting); other values are parsed as YAML scalars. Keys must exist in the yaml, except below the
    ``open_keys`` nodes (e.g. ``data``), whose entries override the run's own config.
    """
    path = CONF_DIR / f"{name}.yaml"
    cfg = OmegaConf.load(path)
    if any(a in ("-h", "--help") for a in argv):
        print(path.read_text(encoding="utf-8"))
        sys.exit(0)
    for arg in argv:
        key, sep, raw = arg.partition("=")
        key = key.strip().lstrip("+")
        if not sep or not key:
            raise ConfigError(f"argument {arg!r}: use key=value (see {path} for the keys)")
        known = OmegaConf.select(cfg, key, default=KeyError) is not KeyError
        if not known and not key.startswith(tuple(f"{k}." for k in open_keys)):
            keys = ", ".join(k for k in cfg.keys())
            raise ConfigError(f"unknown key {key!r}; {name} takes: {keys}")
        default = OmegaConf.select(cfg, key) if known else None
        value: Any = raw if isinstance(default, str) else _scalar(key, raw)
        if isinstance(default, bool) and not isinstance(value, bool):
            raise ConfigError(f"{key}={raw}: expected true or false")
        if isinstance(default, (int, float)) and not isinstance(default, bool) and value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{key}={raw}: expected a number")
            if isinstance(default, int) and isinstance(value, float):
                raise ConfigError(f"{key}={raw}: expected a whole number")
        OmegaConf.update(cfg, key, value, force_add=True)
    return cfg


def _scalar(key: str, raw: str) -> Any:
    try:
        return yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}={raw}: cannot parse the value ({e})") from e

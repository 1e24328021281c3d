"""Pretrained Mamba-1 checkpoints as :class:`ssmlm.models.mamba.MambaLM`.

Two on-disk formats, both a directory with ``config.json`` and the weights:

* mamba_ssm's ``MambaLMHeadModel.save_pretrained``: ``config.json`` with d_model, n_layer, vocab_size, ssm_cfg,
  rms_norm, pad_vocab_size_multiple, tie_embeddings, ...; weights in ``pytorch_model.bin`` under our names;
* Hugging Face ``MambaForCausalLM.save_pretrained``: ``config.json`` with hidden_size, num_hidden_layers,
  state_size, expand, conv_kernel, time_step_rank, ...; weights in ``model.safetensors`` or
  ``pytorch_model.bin`` (or shards listed in an ``*.index.json``), named as ours except
  ``backbone.embeddings`` for ``backbone.embedding``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ssmlm.errors import CheckpointError
from ssmlm.models.mamba import MambaLM

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
MAMBA_SSM_NORM_EPS = 1e-5  # mamba_ssm's default; its config.json does not record it


def _mamba_ssm_kwargs(config: dict, config_path: Path) -> dict:
    ssm_cfg = dict(config.get("ssm_cfg") or {})
    if ssm_cfg.get("layer", "Mamba1") != "Mamba1":
        raise CheckpointError(f"{config_path}: ssm_cfg.layer={ssm_cfg['layer']!r}; only Mamba-1 checkpoints load")
    if config.get("d_intermediate", 0) or config.get("attn_layer_idx"):
        raise CheckpointError(f"{config_path}: MLP (d_intermediate) or attention (attn_layer_idx) layers are not "
                              "part of ssmlm's Mamba; only pure Mamba-1 stacks load")
    # mamba_ssm pads the embedding to a multiple of pad_vocab_size_multiple; the weights have the padded size
    vocab_size, multiple = config["vocab_size"], config.get("pad_vocab_size_multiple", 1)
    vocab_size += (multiple - vocab_size % multiple) % multiple
    return dict(
        vocab_size=vocab_size, d_model=config["d_model"], n_layers=config["n_layer"],
        d_state=ssm_cfg.get("d_state", 16), d_conv=ssm_cfg.get("d_conv", 4), expand=ssm_cfg.get("expand", 2),
        dt_rank=ssm_cfg.get("dt_rank", "auto"), bias=ssm_cfg.get("bias", False),
        conv_bias=ssm_cfg.get("conv_bias", True), norm="rmsnorm" if config.get("rms_norm", True) else "layernorm",
        norm_eps=MAMBA_SSM_NORM_EPS, tie_embeddings=config.get("tie_embeddings", True),
    )


def _hf_kwargs(config: dict, config_path: Path) -> dict:
    if config.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{config_path}: hidden_act={config['hidden_act']!r}; only 'silu' Mamba loads "
                              "(Hugging Face gates with SiLU whatever the conv activation)")
    return dict(
        vocab_size=config["vocab_size"], d_model=config["hidden_size"], n_layers=config["num_hidden_layers"],
        d_state=config.get("state_size", 16), d_conv=config.get("conv_kernel", 4), expand=config.get("expand", 2),
        dt_rank=config.get("time_step_rank", "auto"), bias=config.get("use_bias", False),
        conv_bias=config.get("use_conv_bias", True), norm="rmsnorm", norm_eps=config.get("layer_norm_epsilon", 1e-5),
        tie_embeddings=config.get("tie_word_embeddings", True),
    )


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The state dict in ``directory``: one weights file, or the shards an index file lists."""
    for name in WEIGHT_FILES:
        path = directory / name
        if not path.exists():
            continue
        try:
            if not name.endswith(".index.json"):
                return _load_file(path)
            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
            state_dict = {}
            for shard in shards:
                state_dict.update(_load_file(directory / shard))
            return state_dict
        except (OSError, RuntimeError, ValueError, KeyError) as err:
            raise CheckpointError(f"{path}: cannot read the weights ({err})") from err
    raise CheckpointError(f"{directory}: no weights file; expected one of {', '.join(WEIGHT_FILES)}")


def load_pretrained_mamba(path, scan_backend: str = "auto") -> MambaLM:
    """A :class:`MambaLM` with the weights of the mamba_ssm or Hugging Face checkpoint directory ``path``.

    The model is in eval mode, fp32; its vocabulary is the checkpoint's (mamba_ssm's padded one).
    """
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such directory; pass a directory written by mamba_ssm's or "
                              "transformers' save_pretrained")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{config_path}: missing; a pretrained Mamba directory has config.json and weights")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{config_path}: cannot read it as JSON ({err})") from err
    if "d_model" in config and "n_layer" in config:
        kwargs, renames = _mamba_ssm_kwargs(config, config_path), {}
    elif config.get("model_type", "mamba") == "mamba" and "hidden_size" in config and "state_size" in config:
        kwargs, renames = _hf_kwargs(config, config_path), {"backbone.embeddings.": "backbone.embedding."}
    else:
        raise CheckpointError(f"{config_path}: not a Mamba-1 config of mamba_ssm (d_model, n_layer, ...) or of "
                              "Hugging Face (model_type 'mamba', hidden_size, state_size, ...)")

    state_dict = {}
    for key, value in _read_weights(directory).items():
        for old, new in renames.items():
            if key.startswith(old):
                key = new + key[len(old):]
        state_dict[key] = value
    if kwargs["tie_embeddings"] and "lm_head.weight" not in state_dict:  # tied: saved once
        state_dict["lm_head.weight"] = state_dict.get("backbone.embedding.weight")

    model = MambaLM(**kwargs, scan_backend=scan_backend)
    expected = model.state_dict()
    missing = sorted(k for k in expected if state_dict.get(k) is None)
    unexpected = sorted(k for k in state_dict if k not in expected)
    wrong_shape = sorted(k for k in expected if k not in missing and state_dict[k].shape != expected[k].shape)
    if missing or unexpected or wrong_shape:
        raise CheckpointError(f"{directory}: weights do not match config.json: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}, wrong shape {wrong_shape[:5]}")
    model.load_state_dict(state_dict)
    return model.eval()

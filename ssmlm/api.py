"""The Python API: ``ssmlm.create_model`` for every family, and the layers and the encoder-decoder Transformer
under the names of the "universal SSM" project ssmlm replaces.

``create_model`` builds the classes the Hydra configs (conf/model/*.yaml) instantiate, with the same defaults;
the seed's keyword names are translated: ``num_layers`` -> ``n_layers``, ``expand_factor`` -> ``expand``,
``init_method`` -> ``init``.
"""

from __future__ import annotations

import inspect
from typing import Any

from ssmlm.errors import ConfigError
from ssmlm.models.base import LanguageModel
from ssmlm.models.diag_ssm import DiagSSMLM
from ssmlm.models.h3 import H3Layer, H3LM
from ssmlm.models.hybrid import HybridLM
from ssmlm.models.mamba import MambaLayer, MambaLM
from ssmlm.models.s4 import S4Layer, S4LM
from ssmlm.models.s4d import S4DLayer, S4DLM
from ssmlm.models.s5 import S5Layer, S5LM
from ssmlm.models.transformer import TransformerLM, TransformerModel

__all__ = ["create_model", "ARCHITECTURES", "S4Layer", "S4DLayer", "S5Layer", "MambaLayer", "H3Layer",
           "TransformerModel"]

# architecture -> (class, the ssm_layer values it takes (the first is the default), the keyword ssm_layer becomes)
ARCHITECTURES: dict[str, tuple[type[LanguageModel], tuple[str, ...], str | None]] = {
    "mamba": (MambaLM, ("mamba", "selective"), None),
    "h3": (H3LM, ("s4d", "s4", "diag"), "ssm_layer"),
    "s4": (S4LM, ("s4",), None),
    "s4d": (S4DLM, ("s4d",), None),
    "s5": (S5LM, ("s5",), None),
    "diag_ssm": (DiagSSMLM, ("diag",), None),
    "gated_mlp": (HybridLM, ("s4d", "selective"), "ssm"),
    "hybrid": (HybridLM, ("s4d", "selective"), "ssm"),
    "transformer": (TransformerLM, ("attention",), None),
}
SEED_NAMES = {"num_layers": "n_layers", "expand_factor": "expand", "init_method": "init"}


def _translate(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {SEED_NAMES.get(k, k): v for k, v in kwargs.items()}


def create_model(architecture: str, ssm_layer: str | None = None, d_model: int = 256, d_state: int | None = None,
                 num_layers: int = 4, vocab_size: int = 256, layer_kwargs: dict | None = None,
                 architecture_kwargs: dict | None = None, **kwargs) -> LanguageModel:
    """A language model of ``architecture`` (mamba, h3, s4, s4d, s5, diag_ssm, gated_mlp / hybrid, transformer):
    tokens (batch, L) -> logits (batch, L, vocab_size), with ``step`` and ``allocate_state`` for generation.

    ``ssm_layer``: the SSM inside (h3: s4d | s4 | diag; gated_mlp: s4d | selective; the others have one).
    ``d_state``: None keeps the family's default (the transformer and diag_ssm have none). ``layer_kwargs`` go to
    the layers (e.g. ``init_method``, ``bidirectional``, ``dt_min``), ``architecture_kwargs`` and ``kwargs`` to the
    model (e.g. ``dropout``, ``activation``, ``tie_embeddings``). ``bidirectional=True`` layers make a non-causal
    model (every output sees the whole sequence: no ``step``), which language-model training refuses.
    """
    if architecture not in ARCHITECTURES:
        raise ConfigError(f"architecture={architecture!r}: use one of {', '.join(ARCHITECTURES)}")
    cls, ssm_layers, ssm_keyword = ARCHITECTURES[architecture]
    if ssm_layer is not None and ssm_layer not in ssm_layers:
        raise ConfigError(f"ssm_layer={ssm_layer!r} for architecture={architecture!r}: use one of "
                          f"{', '.join(ssm_layers)}")
    layer = _translate(layer_kwargs or {})
    model = _translate({**(architecture_kwargs or {}), **kwargs})
    params = inspect.signature(cls).parameters
    if architecture == "h3":  # H3's own options at the top, the SSM core's in ssm_kwargs
        core = {k: layer.pop(k) for k in list(layer) if k not in params}
        if core:
            model["ssm_kwargs"] = {**model.get("ssm_kwargs", {}), **core}
    if any(options.get("bidirectional") for options in (layer, model, model.get("ssm_kwargs", {}))):
        model.setdefault("causal", False)
    width = {"diag_ssm": "ssm_hidden"}.get(architecture, "d_model")
    model.update({width: d_model, "n_layers": num_layers, "vocab_size": vocab_size, **layer})
    if d_state is not None:
        if "d_state" not in params:
            raise ConfigError(f"architecture={architecture!r} has no d_state; leave it None")
        model["d_state"] = d_state
    if ssm_keyword is not None and ssm_layer is not None:
        model[ssm_keyword] = ssm_layer
    unknown = sorted(set(model) - set(params))
    if unknown:
        raise ConfigError(f"{', '.join(unknown)}: not an option of architecture={architecture!r} "
                          f"({cls.__name__}); its options: {', '.join(params)}")
    return cls(**model)

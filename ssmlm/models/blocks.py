"""The mixer contract, the residual block and the one backbone every family's language model is built on.

A *mixer* mixes tokens: (batch, L, d) -> (batch, L, d), with a recurrent twin:

* ``forward(x, state=None, need_state=True) -> (y, state)``: the parallel form, continuing from ``state`` (None:
  the start of a sequence). The state after the last token comes back; ``need_state=False`` lets a mixer whose
  final state costs extra work skip it (it may then return None), which is what training asks for.
* ``step(x, state) -> (y, state)``: one token, x (batch, d).
* ``allocate_state(batch_size, device=None, dtype=None)``: the state before any token.

``step`` over a sequence from ``allocate_state`` gives what ``forward`` gives; tests/test_contract.py checks this
for every family. A mixer also declares what it can do: ``causal`` (False: it reads later tokens, so it has no
recurrent form and no language model accepts it) and ``reserve_positions(n)`` (a KV cache making room for n
positions before generation; SSM states have no positions).

A :class:`Block` is ``x + gate * dropout(mixer(norm(x)))`` and then ``x + mlp(x)`` when it has an MLP; a
:class:`BackboneLM` is embedding -> blocks built by ``make_mixer(layer_index)`` -> final norm -> head.
"""

from __future__ import annotations

import abc
import re
from typing import Any, Callable

import torch
from torch import nn

from ssmlm.errors import ConfigError
from ssmlm.models.base import LanguageModel, set_optim
from ssmlm.ops.selective_scan import resolve_backend


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` (same parameters) computed in one pass by the Triton kernel (ssmlm.ops.rms_norm) where the
    Triton kernels run, with its output in the autocast dtype as the next matmul reads it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if resolve_backend("auto", x.device) != "triton":
            return super().forward(x)
        from ssmlm.ops.rms_norm import add_rms_norm  # here: Triton is optional

        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        return add_rms_norm(x, self.weight, eps=eps, out_dtype=dtype)[0]


NORMS = {"layernorm": nn.LayerNorm, "rmsnorm": RMSNorm}
RESIDUAL_GATES = ("none", "scalar", "channel")


class Mixer(nn.Module, abc.ABC):
    """A token mixer: (batch, L, d) -> (batch, L, d) in parallel, and one token at a time from a state."""

    causal: bool = True

    @abc.abstractmethod
    def forward(self, x: torch.Tensor, state: Any = None, need_state: bool = True) -> tuple[torch.Tensor, Any]:
        """x (batch, L, d), continuing from ``state`` -> (y (batch, L, d), state after the last token)."""

    @abc.abstractmethod
    def step(self, x: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        """One token: x (batch, d) -> (y (batch, d), next state)."""

    @abc.abstractmethod
    def allocate_state(self, batch_size: int, device=None, dtype=None) -> Any:
        """The state before any token."""

    def reserve_positions(self, n_positions: int) -> bool:
        """Make room for ``n_positions`` in position-dependent state; True when that grew past the configured size."""
        return False


class SequenceLayer(nn.Module):
    """A mixer as a plain layer: ``layer(x)`` is a tensor of x's shape; the state goes through explicit methods
    (``forward_with_state``, ``step``, ``allocate_state``). Other attributes are the mixer's or its SSM core's."""

    def __init__(self, mixer: Mixer, dropout: float = 0.0):
        super().__init__()
        self.mixer = mixer
        self.dropout = nn.Dropout(dropout)  # on the output (layers whose mixer has none inside)

    def _owner_of(self, name: str) -> nn.Module | None:
        """The mixer, else its SSM core, when it has attribute ``name`` and this layer has none of its own."""
        d = self.__dict__
        if name in d or any(name in d.get(k, {}) for k in ("_parameters", "_buffers", "_modules")):
            return None
        mixer = d.get("_modules", {}).get("mixer")  # none yet while constructing or unpickling
        for owner in (mixer, None if mixer is None else mixer._modules.get("ssm")):  # e.g. layer.kernel(L)
            if owner is not None and hasattr(owner, name):
                return owner
        return None

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            pass
        owner = self._owner_of(name)
        if owner is None:
            raise AttributeError(f"{type(self).__name__} (and its mixer) has no attribute {name!r}")
        return getattr(owner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        # a setting of the mixer or its core (layer.kernel_chunk = None) is set there, where it is read; modules
        # and tensors assigned to the layer stay the layer's own
        owner = None if isinstance(value, (nn.Module, torch.Tensor)) else self._owner_of(name)
        if owner is not None:
            setattr(owner, name, value)
        else:
            super().__setattr__(name, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.mixer(x, need_state=False)[0])

    def forward_with_state(self, x: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        """x (batch, L, d) continuing from ``state`` -> (y, the state after the last token)."""
        if not self.mixer.causal:
            raise ConfigError(f"a bidirectional {type(self).__name__} reads later tokens and has no recurrent "
                              "state; build it with bidirectional=False to continue from a state")
        y, state = self.mixer(x, state)
        return self.dropout(y), state

    def step(self, x: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        y, state = self.mixer.step(x, state)
        return self.dropout(y), state

    def allocate_state(self, batch_size: int, device=None, dtype=None) -> Any:
        return self.mixer.allocate_state(batch_size, device, dtype)


def make_norm(kind: str, dim: int, eps: float = 1e-5) -> nn.Module:
    if kind not in NORMS:
        raise ConfigError(f"model.norm={kind!r}: use one of {', '.join(NORMS)}")
    return NORMS[kind](dim, eps=eps)


ACTIVATIONS = {"gelu": nn.GELU, "silu": nn.SiLU, "relu": nn.ReLU}


def feed_forward(d_model: int, hidden: int, dropout: float, activation: str = "gelu") -> nn.Sequential:
    """LayerNorm -> Linear(d, hidden) -> activation -> Linear(hidden, d) -> dropout: an MLP branch of a block."""
    if activation not in ACTIVATIONS:
        raise ConfigError(f"model.activation={activation!r}: use one of {', '.join(ACTIVATIONS)}")
    return nn.Sequential(nn.LayerNorm(d_model), nn.Linear(d_model, hidden), ACTIVATIONS[activation](),
                         nn.Linear(hidden, d_model), nn.Dropout(dropout))


class Block(nn.Module):
    """``x + gate * dropout(mixer(norm(x)))``, then ``x + mlp(x)`` when there is an MLP (it brings its own norm).

    ``residual_gate``: "none", or a learnable "scalar" / per-"channel" gate starting at 1 (the plain block at
    init) and not decayed (which would switch the block off). ``norm`` None: no pre-norm.
    """

    def __init__(self, d_model: int, mixer: Mixer, norm: nn.Module | None = None, mlp: nn.Module | None = None,
                 residual_gate: str = "none", dropout: float = 0.0):
        super().__init__()
        if residual_gate not in RESIDUAL_GATES:
            raise ConfigError(f"model.residual_gate={residual_gate!r}: use one of {', '.join(RESIDUAL_GATES)}")
        self.norm = nn.Identity() if norm is None else norm
        self.mixer = mixer
        self.dropout = nn.Dropout(dropout)
        self.mlp = mlp
        shape = {"none": None, "scalar": (), "channel": (d_model,)}[residual_gate]
        self.residual_gate = None if shape is None else set_optim(nn.Parameter(torch.ones(shape)), weight_decay=0.0)

    def _residual(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        out = self.dropout(out)
        x = x + (out if self.residual_gate is None else self.residual_gate * out)
        return x if self.mlp is None else x + self.mlp(x)

    def forward(self, x: torch.Tensor, state: Any = None, need_state: bool = True):
        out, state = self.mixer(self.norm(x), state, need_state)
        return self._residual(x, out), state

    def step(self, x: torch.Tensor, state: Any):
        out, state = self.mixer.step(self.norm(x), state)
        return self._residual(x, out), state

    def allocate_state(self, batch_size: int, device=None, dtype=None) -> Any:
        return self.mixer.allocate_state(batch_size, device, dtype)


def _rename(key: str, rules) -> tuple[str, Callable | None]:
    """The first rule (pattern, replacement[, value transform]) matching ``key`` renames it."""
    for pattern, replacement, *transform in rules:
        new, n = re.subn(pattern, replacement, key, count=1)
        if n:
            return new, (transform[0] if transform else None)
    return key, None


class BackboneLM(LanguageModel):
    """embedding [-> dropout -> input projection] -> n_layers x Block(make_mixer(i)) -> final norm [-> head norm]
    [-> dropout] -> head.

    Every family is this with its own mixers and switches. Names in state dicts: ``embedding``, ``positions``,
    ``in_proj``, ``blocks.{i}.{norm,mixer,mlp,residual_gate}``, ``norm_f``, ``head_norm``, ``head``. A family
    whose checkpoints use other names declares them: ``external_names`` (internal prefix, external prefix) pairs
    used both when saving and loading (Mamba: mamba_ssm's), and ``legacy_names`` (marker regex, rules) for state
    dicts written by earlier versions of ssmlm, renamed on loading only when a key matches the marker.
    """

    external_names: tuple[tuple[str, str], ...] = ()
    legacy_names: tuple[str, tuple] | None = None

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, make_mixer: Callable[[int], Mixer], *,
                 make_mlp: Callable[[int], nn.Module | None] | None = None, norm: str = "layernorm",
                 norm_eps: float = 1e-5, block_norm: bool = True, residual_gate: str = "none", dropout: float = 0.0,
                 emb_dim: int | None = None, max_positions: int | None = None, embed_dropout: float = 0.0,
                 final_norm: bool = True, head_norm: bool = False, head_dropout: float = 0.0,
                 head_bias: bool = False, tie_embeddings: bool = False, causal: bool = True):
        super().__init__()
        self.vocab_size = vocab_size
        projected = emb_dim is not None  # an embedding of its own width, projected to d_model
        emb_dim = emb_dim if projected else d_model
        self.embedding = nn.Embedding(vocab_size, emb_dim)
        self.max_positions = max_positions
        self.positions = None if max_positions is None else nn.Embedding(max_positions, emb_dim)
        self.embed_dropout = nn.Dropout(embed_dropout)
        self.in_proj = nn.Linear(emb_dim, d_model) if projected else None
        blocks = []
        for i in range(n_layers):
            mixer = make_mixer(i)
            if causal and not mixer.causal:
                raise ConfigError("model.bidirectional=true lets every position see later tokens, which a language "
                                  "model must not; set model.bidirectional=false (the layers support it for "
                                  "non-causal use through ssmlm.create_model)")
            blocks.append(Block(d_model, mixer, make_norm(norm, d_model, norm_eps) if block_norm else None,
                                None if make_mlp is None else make_mlp(i), residual_gate, dropout))
        self.blocks = nn.ModuleList(blocks)
        self.causal = all(block.mixer.causal for block in self.blocks)
        self.norm_f = make_norm(norm, d_model, norm_eps) if final_norm else nn.Identity()
        self.head_norm = nn.LayerNorm(d_model) if head_norm else None
        self.head_dropout = nn.Dropout(head_dropout)
        self.head = nn.Linear(d_model, vocab_size, bias=head_bias)
        if tie_embeddings:
            self.head.weight = self.embedding.weight
        if self.external_names:
            self._register_state_dict_hook(BackboneLM._export_names)
        self._register_load_state_dict_pre_hook(BackboneLM._import_names, with_module=True)

    # --- state dict names ---------------------------------------------------------------------------------
    @staticmethod
    def _export_names(module: BackboneLM, state_dict: dict, prefix: str, local_metadata) -> None:
        rules = [("^" + re.escape(prefix + inner), prefix + outer) for inner, outer in module.external_names]
        items = list(state_dict.items())
        state_dict.clear()
        for key, value in items:
            state_dict[_rename(key, rules)[0]] = value

    @staticmethod
    def _import_names(self: BackboneLM, state_dict: dict, prefix: str, *args) -> None:
        rules = [("^" + re.escape(prefix + outer), prefix + inner) for inner, outer in self.external_names]
        ours = [k for k in state_dict if k.startswith(prefix)]
        if self.legacy_names is not None:
            marker, legacy = self.legacy_names
            if any(re.search(marker, k[len(prefix):]) for k in ours):
                rules += [("^" + re.escape(prefix) + pattern, prefix + repl, *rest) for pattern, repl, *rest in legacy]
        if not rules:
            return
        renamed = {}
        for key in ours:
            new, transform = _rename(key, rules)
            value = state_dict.pop(key)
            renamed[new] = value if transform is None else transform(value)
        state_dict.update(renamed)  # after every pop: an old name may be another's new one

    # --- the language model -------------------------------------------------------------------------------
    def _embed(self, tokens: torch.Tensor, state: Any) -> torch.Tensor:
        """Token embeddings (families with positions add them: TransformerLM)."""
        return self.embedding(tokens)

    def _input(self, tokens: torch.Tensor, state: Any) -> torch.Tensor:
        x = self.embed_dropout(self._embed(tokens, state))
        return x if self.in_proj is None else self.in_proj(x)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm_f(x)
        if self.head_norm is not None:
            x = self.head_norm(x)
        return self.head(self.head_dropout(x))

    def _check_recurrent(self) -> None:
        if not self.causal:
            raise ConfigError(f"this {type(self).__name__} has bidirectional layers: it reads whole sequences and "
                              "has no recurrent state; build it with bidirectional=False to step or continue it")

    def forward(self, tokens: torch.Tensor, state: Any = None, return_state: bool = False):
        if state is not None or return_state:
            self._check_recurrent()
        x = self._input(tokens, state)
        next_state = []
        for i, block in enumerate(self.blocks):
            x, layer_state = block(x, None if state is None else state[i], return_state)
            next_state.append(layer_state)
        logits = self._logits(x)
        return (logits, next_state) if return_state else logits

    def allocate_state(self, batch_size: int, device=None, dtype=None) -> list:
        """One state per block. SSM states keep their own precision (fp32 / complex64); KV caches take ``dtype``
        (default: the embedding's)."""
        self._check_recurrent()
        device = device if device is not None else self.embedding.weight.device
        dtype = dtype if dtype is not None else self.embedding.weight.dtype
        return [block.allocate_state(batch_size, device, dtype) for block in self.blocks]

    def step(self, tokens: torch.Tensor, state: list) -> tuple[torch.Tensor, list]:
        self._check_recurrent()
        x = self._input(tokens, state)
        next_state = []
        for block, layer_state in zip(self.blocks, state):
            x, layer_state = block.step(x, layer_state)
            next_state.append(layer_state)
        return self._logits(x), next_state

    def reserve_positions(self, n_positions: int) -> bool:
        grew = [block.mixer.reserve_positions(n_positions) for block in self.blocks]
        return any(grew)

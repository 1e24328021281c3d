"""Shared fixtures: the real data directory and Hydra config composition like the entry point does it."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from ssmlm import resolvers
from ssmlm.data import builtin_corpus

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"
resolvers.register()


def pytest_configure(config):
    """Derived files (token caches, the decompressed built-in corpus) of this session, runs it starts included,
    go to a fresh folder rather than the user's cache (unless SSMLM_CACHE_DIR is set)."""
    if not os.environ.get("SSMLM_CACHE_DIR"):
        config.ssmlm_cache = tempfile.mkdtemp(prefix="ssmlm-test-cache-")
        os.environ["SSMLM_CACHE_DIR"] = config.ssmlm_cache


def pytest_unconfigure(config):
    if getattr(config, "ssmlm_cache", None):
        shutil.rmtree(config.ssmlm_cache, ignore_errors=True)
        os.environ.pop("SSMLM_CACHE_DIR", None)


def reference_presets() -> dict[str, tuple[int, int, int]]:
    """The reference grid's presets (the list in conf/sweep/sizes.yaml) as conf/experiment/ holds them:
    name -> (emb_dim, hidden, n_layers)."""
    presets = {}
    for name in OmegaConf.load(CONF_DIR / "sweep" / "sizes.yaml").hydra.sweeper.params.experiment.split(","):
        size = OmegaConf.load(CONF_DIR / "experiment" / f"{name}.yaml").size
        presets[name] = (size.emb_dim, size.hidden, size.n_layers)
    return presets


def data_dir() -> Path:
    """$SSMLM_DATA_DIR (CI: ../shared/data, which also holds the TinyStories and Kaldi samples)."""
    return (REPO / os.environ.get("SSMLM_DATA_DIR", "../shared/data")).resolve()


def hindi_data_dir() -> Path:
    """A data dir holding hindi/premchand/{train,valid,test}.txt: ``data_dir()`` when it has them, else the
    corpus built into ssmlm, decompressed into the cache dir as a run would do it (so no test skips for want
    of Hindi text)."""
    if all((data_dir() / "hindi" / "premchand" / f).is_file() for f in ("train.txt", "valid.txt", "test.txt")):
        return data_dir()
    copies = [builtin_corpus.extract(f"hindi/premchand/{name}") for name in builtin_corpus.files("hindi/premchand")]
    return copies[0].parents[2]  # <cache_dir>/builtin, laid out like a data dir


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return hindi_data_dir()


def compose_cfg(overrides: list[str], output_dir: Path):
    """The config ssmlm-train would run with these overrides, with its run dir set to ``output_dir``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.data_dir={data_dir()}", *overrides], return_hydra_config=True)
    OmegaConf.set_readonly(cfg.hydra, False)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.paths.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    return cfg


@pytest.fixture
def make_cfg(tmp_path):
    def _make(*overrides: str, output_dir: Path | None = None):
        return compose_cfg(list(overrides), output_dir or tmp_path / "run")

    return _make


@pytest.fixture(scope="session")
def compose_config():
    """``compose(overrides, output_dir)`` for fixtures wider than one test."""
    return compose_cfg


def move_norms_and_gates_off_init(model):
    """Norm scales and residual gates start at 1 (0 for biases): moved, a check sees them work."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "residual_gate" in name or "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


def run_steps(model, tokens, state):
    """Feed ``tokens`` (batch, L) through ``model.step`` one position at a time: (logits (batch, L, V), state)."""
    import torch

    logits = []
    for t in range(tokens.shape[1]):
        out, state = model.step(tokens[:, t], state)
        logits.append(out)
    return torch.stack(logits, dim=1), state


def assert_states_close(mine, ref, atol: float = 1e-4) -> None:
    """Recurrent states equal: tensors, or (nested) lists/tuples of them; a (one-layer) KV cache over its filled
    positions."""
    import torch

    if isinstance(ref, torch.Tensor):
        torch.testing.assert_close(mine, ref, atol=atol, rtol=0)
    elif isinstance(ref, (list, tuple)):
        assert isinstance(mine, (list, tuple)) and len(mine) == len(ref)
        for a, b in zip(mine, ref):
            assert_states_close(a, b, atol)
    else:  # a KV cache: same length, same keys and values where filled
        assert type(mine) is type(ref) and mine.length == ref.length
        filled = slice(0, ref.length)
        for a, b in ((mine.keys, ref.keys), (mine.values, ref.values)):
            torch.testing.assert_close(a[:, :, filled], b[:, :, filled], atol=atol, rtol=0)


def check_recurrent_form(model, tokens, prompt: int, prefix: int, atol: float = 1e-4) -> None:
    """The contract every family keeps (ssmlm/models/base.py), checked on ``tokens`` (batch, L):

    * ``step`` over the whole sequence from ``allocate_state`` gives ``forward``'s logits;
    * a prompt of ``prompt`` tokens read in parallel (``return_state=True``), then stepped, gives the same
      logits and ends in the same state;
    * ``forward`` continued from the state after ``prefix`` tokens gives the rest of the logits and that state.
    """
    import torch

    with torch.no_grad():
        full = model(tokens)
        stepped, last = run_steps(model, tokens, model.allocate_state(tokens.shape[0]))
        torch.testing.assert_close(stepped, full, atol=atol, rtol=0)
        prompt_logits, state = model(tokens[:, :prompt], return_state=True)
        rest, state = run_steps(model, tokens[:, prompt:], state)
        torch.testing.assert_close(torch.cat([prompt_logits, rest], 1), full, atol=atol, rtol=0)
        assert_states_close(state, last, atol)
        _, prefix_state = model(tokens[:, :prefix], return_state=True)
        cont, cont_state = model(tokens[:, prefix:], state=prefix_state, return_state=True)
        torch.testing.assert_close(cont, full[:, prefix:], atol=atol, rtol=0)
        assert_states_close(cont_state, last, atol)


def check_gradients_reach_every_parameter(model, vocab_size: int) -> None:
    """A loss on a sequence continued from a state read in parallel gives every parameter a nonzero gradient."""
    import torch

    model.train()
    tokens = torch.randint(0, vocab_size, (2, 12))
    _, state = model(tokens[:, :5], return_state=True)
    logits = model(tokens[:, 5:], state=state)
    torch.nn.functional.cross_entropy(logits.reshape(-1, vocab_size), tokens[:, 5:].reshape(-1)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def check_causal(model, vocab_size: int, length: int = 20, at: int = 12, atol: float = 1e-10) -> None:
    """Changing the token at ``at`` changes no logit before it (to ``atol``), and some after it (fp64)."""
    import torch

    model = model.double()
    tokens = torch.randint(0, vocab_size, (1, length))
    changed = tokens.clone()
    changed[0, at] = (tokens[0, at] + 1) % vocab_size
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :at], b[:, :at], atol=atol, rtol=0)
    assert (a[:, at:] - b[:, at:]).abs().max() > 1e-4

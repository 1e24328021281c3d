"""The mixer contract (ssmlm/models/blocks.py) over every family: recurrent form == parallel form, prompt then
step, causality, gradient reach, a state whose size does not grow; and checkpoints written before the contract."""

from __future__ import annotations

import itertools
from pathlib import Path

import hydra
import pytest
import torch

from ssmlm.models.blocks import Mixer
from ssmlm.models.diag_ssm import DiagSSMLM
from ssmlm.models.h3 import H3LM
from ssmlm.models.hybrid import HybridLM
from ssmlm.models.mamba import MambaLM
from ssmlm.models.s4 import S4LM
from ssmlm.models.s4d import S4DLM
from ssmlm.models.s5 import S5LM
from ssmlm.models.hippo import INITS, MEASURES
from ssmlm.models.transformer import KVCache, TransformerLM
from conftest import (check_causal, check_gradients_reach_every_parameter, check_recurrent_form,
                      move_norms_and_gates_off_init)

FIXTURE = Path(__file__).parent / "fixtures" / "pre_contract_models.pt"
CLASSES = {cls.__name__: cls for cls in (MambaLM, DiagSSMLM, S4DLM, S4LM, S5LM, H3LM, HybridLM, TransformerLM)}
PRE_CONTRACT = torch.load(FIXTURE, weights_only=False)


@pytest.mark.parametrize("name", sorted(PRE_CONTRACT["models"]))
def test_a_model_saved_before_the_contract_loads_and_computes_the_same(name):
    """tests/fixtures/pre_contract_models.pt was written by the code before the contract (its script beside it):
    every family's state dict loads strictly into today's model and gives the logits it gave then."""
    saved = PRE_CONTRACT["models"][name]
    model = CLASSES[saved["cls"]](**saved["kwargs"]).eval()
    model.load_state_dict(saved["state_dict"])
    with torch.no_grad():
        torch.testing.assert_close(model(PRE_CONTRACT["tokens"]), saved["logits"], atol=1e-5, rtol=1e-5)
    # as a Lightning checkpoint would hold it: under a prefix, inside another module
    wrapper = torch.nn.ModuleDict({"model": CLASSES[saved["cls"]](**saved["kwargs"])})
    wrapper.load_state_dict({f"model.{k}": v for k, v in saved["state_dict"].items()})


@pytest.mark.parametrize("name", sorted(PRE_CONTRACT["models"]))
def test_the_same_seed_gives_the_same_initial_weights_as_before_the_contract(name):
    """The fixture's models were built right after torch.manual_seed(1): today's code draws the same numbers, so
    runs started before and after the contract are the same runs. The parameter order (what an optimizer state
    is keyed by) is kept too, except H3's, whose SSM moved into its core (its C gained the kernels axis)."""
    saved = PRE_CONTRACT["models"][name]
    torch.manual_seed(1)
    fresh = CLASSES[saved["cls"]](**saved["kwargs"])
    loaded = CLASSES[saved["cls"]](**saved["kwargs"])
    loaded.load_state_dict(saved["state_dict"])
    for key, value in loaded.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    if name != "h3":
        old = [saved["state_dict"][n] for n in saved["param_names"]]
        new = [p.detach() for _, p in loaded.named_parameters()]
        assert len(old) == len(new) and all(torch.equal(a, b) for a, b in zip(old, new))


def test_mamba_keeps_mamba_ssm_names():
    saved = PRE_CONTRACT["models"]["mamba_improved"]
    model = MambaLM(**saved["kwargs"])
    assert list(model.state_dict()) == list(saved["state_dict"])


# Every family in the configurations its own tests used: name -> (build, vocab, (batch, L), prompt, prefix).
# prompt: tokens read in parallel before stepping; prefix: a state to continue ``forward`` from (short ones cross
# the conv kernel / shift register, longer ones the kernel chunks).
MAMBA = dict(vocab_size=37, d_model=24, n_layers=2, d_state=8)
SSM = dict(vocab_size=17, d_model=8, n_layers=2, d_state=8, dropout=0.0)
HYBRID = dict(vocab_size=17, d_model=16, n_layers=3, d_state=6, dropout=0.0, kernel_chunk=5, max_seq_len=8,
              scan_backend="chunked")  # max_seq_len 8 < the 23 tokens: the KV caches grow on the way
TRANSFORMER = dict(vocab_size=17, d_model=16, n_layers=2, head_dim=8, max_seq_len=32, dropout=0.0)
CASES = {
    **{f"mamba-{name}": (lambda kw=kw: MambaLM(**MAMBA, **kw), 37, (3, 19), 7, 2) for name, kw in {
        "plain": {}, "improved": dict(residual_gate="channel", head_norm=True, dropout=0.1, activation="gelu"),
        "scalar_gate_layernorm": dict(residual_gate="scalar", norm="layernorm"), "init_inv": dict(init="inv")}.items()},
    **{f"diag_ssm-{a}": (lambda a=a: DiagSSMLM(50, emb_dim=16, ssm_hidden=32, n_layers=2, dropout=0.0, a_param=a),
                         50, (2, 37), 20, 9) for a in ("stable", "unconstrained")},
    **{f"s4d-{i}-{d}": (lambda i=i, d=d: S4DLM(**SSM, init=i, discretization=d, kernel_chunk=5), 17, (2, 23), 11, 6)
       for i, d in itertools.product(INITS, ("zoh", "bilinear"))},
    **{f"s4-{m}-{d}": (lambda m=m, d=d: S4LM(**SSM, init=m, discretization=d, kernel_chunk=5), 17, (2, 23), 11, 6)
       for m, d in itertools.product(MEASURES, ("bilinear", "zoh"))},
    **{f"s5-blocks{b}": (lambda b=b: S5LM(**SSM, blocks=b), 17, (2, 23), 11, 6) for b in (1, 2)},
    **{f"h3-{core}-mlp{e}": (lambda core=core, e=e: H3LM(**{**SSM, "d_state": 6}, ssm_layer=core, mlp_expand=e,
                                                         kernel_chunk=5), 17, (2, 23), 11, 3)
       for core, e in (("s4d", 0), ("s4d", 2), ("s4", 2), ("diag", 2))},
    **{f"hybrid-{name}": (lambda ssm=ssm, attn=attn, dim=dim: HybridLM(**HYBRID, ssm=ssm, attn_layers=attn,
                                                                       ssm_dim=dim), 17, (2, 23), 11, 3)
       for name, (ssm, attn, dim) in {"s4d": ("s4d", [], None), "s4d-attn-middle-narrow": ("s4d", [1], 6),
                                      "selective": ("selective", [], None),
                                      "selective-attn-first-last": ("selective", [0, -1], None)}.items()},
    **{f"transformer-{p}": (lambda p=p: TransformerLM(**TRANSFORMER, pos_emb=p), 17, (2, 21), 9, 5)
       for p in ("rope", "learned")},
}
# the selective scan and the reference's diagonal scan compute in fp32 even in an fp64 model: FFT rounding (diag)
FP32_INSIDE = ("mamba", "hybrid-selective", "diag_ssm", "h3-diag")


def build(name: str):
    """The case's model in eval mode, its norms and residual gates moved off their init so that the checks see them."""
    torch.manual_seed(0)
    return move_norms_and_gates_off_init(CASES[name][0]().eval())


@pytest.mark.parametrize("name", CASES)
def test_recurrent_form_equals_parallel_form(name):
    """step == forward from the start, after a prompt read in parallel, and forward continued from a state."""
    model, (_, vocab, shape, prompt, prefix) = build(name), CASES[name]
    check_recurrent_form(model, torch.randint(0, vocab, shape), prompt=prompt, prefix=prefix)


@pytest.mark.parametrize("name", CASES)
def test_causal(name):
    check_causal(build(name), CASES[name][1], atol=1e-5 if name.startswith(FP32_INSIDE) else 1e-10)


@pytest.mark.parametrize("name", CASES)
def test_gradients_reach_every_parameter(name):
    check_gradients_reach_every_parameter(build(name), CASES[name][1])


def _leaves(state) -> list:
    if isinstance(state, (list, tuple)):
        return [leaf for part in state for leaf in _leaves(part)]
    return [state]


@pytest.mark.parametrize("name", CASES)
def test_state_size_does_not_grow_with_the_sequence(name):
    """SSM states have one size whatever was read; a KV cache (the attention layers) holds every position read."""
    model, vocab = build(name), CASES[name][1]
    with torch.no_grad():
        shapes = {}
        for length in (3, 17):
            _, state = model(torch.randint(0, vocab, (2, length)), return_state=True)
            caches = [leaf for leaf in _leaves(state) if isinstance(leaf, KVCache)]
            assert all(cache.length == length for cache in caches)
            shapes[length] = [leaf.shape for leaf in _leaves(state) if not isinstance(leaf, KVCache)]
            assert shapes[length] == [leaf.shape for leaf in _leaves(model.allocate_state(2))
                                      if not isinstance(leaf, KVCache)]
    assert shapes[3] == shapes[17] and (shapes[3] or caches)


@pytest.mark.parametrize("name", [n for n in CASES if n.endswith(("plain", "stable", "lin-zoh", "legs-bilinear",
                                                                   "blocks1", "s4d-mlp2", "-s4d", "rope"))])
def test_every_mixer_keeps_the_contract(name):
    """Each block's mixer: forward(x) -> (y of x's shape, state), step and allocate_state agree with it."""
    model = build(name)
    for block in model.blocks:
        mixer = block.mixer
        assert isinstance(mixer, Mixer) and mixer.causal
        x = torch.randn(2, 6, model.head.in_features)
        with torch.no_grad():
            y, state = mixer(x)
            assert y.shape == x.shape
            stepped, step_state = [], mixer.allocate_state(2, dtype=x.dtype)
            for t in range(6):
                out, step_state = mixer.step(x[:, t], step_state)
                stepped.append(out)
        torch.testing.assert_close(torch.stack(stepped, 1), y, atol=1e-4, rtol=0)


@pytest.mark.parametrize("core", ["s4d", "s4", "diag"])
def test_h3_hosts_any_lti_core_through_the_config(make_cfg, core):
    cfg = make_cfg("model=h3", f"model.ssm_layer={core}", "experiment=tiny", "hardware=cpu")
    model = hydra.utils.instantiate(cfg.model, vocab_size=141).eval()
    assert type(model.blocks[0].mixer.ssm).__name__ == {"s4d": "DiagonalSSM", "s4": "DPLRSSM",
                                                        "diag": "RealDiagonalSSM"}[core]
    with torch.no_grad():
        assert model(torch.randint(0, 141, (1, 8))).shape == (1, 8, 141)

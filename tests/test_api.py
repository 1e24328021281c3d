"""The Python API (ssmlm/api.py): the README's examples, create_model against the Hydra configs, the layers,
non-causal use, and the encoder-decoder Transformer learning a sequence-to-sequence task."""

from __future__ import annotations

import re

import hydra
import pytest
import torch

import ssmlm
from ssmlm.errors import ConfigError
from ssmlm.lm import LMModule
from conftest import REPO

FAMILIES = {  # conf/model/<name>.yaml -> (architecture, ssm_layer)
    "mamba": ("mamba", None), "mamba_improved": ("mamba", None), "h3": ("h3", None), "s4": ("s4", None),
    "s4d": ("s4d", None), "s5": ("s5", None), "diag_ssm": ("diag_ssm", None), "hybrid": ("gated_mlp", "s4d"),
    "hybrid_attn": ("hybrid", "s4d"), "transformer": ("transformer", None),
}


def test_readme_python_api_section_runs():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Python API", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md (Python API)", "exec"), namespace)
    assert namespace["output"].shape == (2, 15, 512)
    assert namespace["y"].shape == namespace["x"].shape
    assert not namespace["model"].causal and namespace["next_logits"].shape == (2, 256)


def test_from_ssmlm_ops_import_selective_scan_is_the_function():
    from ssmlm.ops import selective_scan
    from ssmlm.ops.selective_scan import selective_scan as function

    assert selective_scan is function and callable(selective_scan)


@pytest.mark.parametrize("family", FAMILIES)
def test_create_model_builds_what_the_hydra_config_builds(make_cfg, family):
    cfg = make_cfg(f"model={family}", "experiment=tiny", "hardware=cpu")
    from_config = hydra.utils.instantiate(cfg.model, vocab_size=141)
    options = {k: v for k, v in hydra.utils.instantiate(cfg.model, _convert_="all", _partial_=True).keywords.items()}
    width = options.pop("ssm_hidden" if family == "diag_ssm" else "d_model")
    architecture, ssm_layer = FAMILIES[family]
    if ssm_layer is not None:
        options.pop("ssm")
    made = ssmlm.create_model(architecture, ssm_layer, d_model=width, num_layers=options.pop("n_layers"),
                              vocab_size=141, architecture_kwargs=options)
    assert type(made) is type(from_config)
    assert {k: v.shape for k, v in made.state_dict().items()} == {k: v.shape for k, v in from_config.state_dict().items()}


def test_create_model_translates_the_seed_names_and_rejects_unknown_ones():
    model = ssmlm.create_model("mamba", d_model=16, d_state=4, num_layers=3, layer_kwargs={"expand_factor": 3})
    assert len(model.blocks) == 3 and model.blocks[0].mixer.d_inner == 48
    h3 = ssmlm.create_model("h3", "s4", d_model=16, d_state=8, num_layers=1, layer_kwargs={"init_method": "legt"})
    assert type(h3.blocks[0].mixer.ssm).__name__ == "DPLRSSM"
    with pytest.raises(ConfigError, match="architecture='rnn'"):
        ssmlm.create_model("rnn")
    with pytest.raises(ConfigError, match="ssm_layer='s4' for architecture='mamba'"):
        ssmlm.create_model("mamba", "s4")
    with pytest.raises(ConfigError, match="colour: not an option"):
        ssmlm.create_model("s4d", colour="blue")


@pytest.mark.parametrize("architecture, ssm_layer", [("s4", None), ("s4d", None), ("h3", "s4d"), ("h3", "s4")])
def test_bidirectional_models_see_the_whole_sequence_and_are_not_language_models(architecture, ssm_layer):
    torch.manual_seed(0)
    model = ssmlm.create_model(architecture, ssm_layer, d_model=8, d_state=4, num_layers=2, vocab_size=11,
                               layer_kwargs={"bidirectional": True}, architecture_kwargs={"dropout": 0.0}).eval()
    tokens = torch.randint(0, 11, (1, 12))
    changed = tokens.clone()
    changed[0, -1] = (tokens[0, -1] + 1) % 11
    with torch.no_grad():
        first, first_changed = model(tokens)[0, 0], model(changed)[0, 0]
    assert (first - first_changed).abs().max() > 1e-6  # the first output depends on the last input
    with pytest.raises(ConfigError, match="bidirectional"):
        model.allocate_state(1)
    # the training path refuses it, whatever the config says
    target = f"ssmlm.models.{'h3.H3LM' if architecture == 'h3' else f'{architecture}.{architecture.upper()}LM'}"
    cfg = {"_target_": target, "d_model": 8, "n_layers": 1, "d_state": 4, "causal": False}
    cfg.update({"ssm_kwargs": {"bidirectional": True}} if architecture == "h3" else {"bidirectional": True})
    with pytest.raises(ConfigError, match="must be causal"):
        LMModule(cfg, vocab_size=11, optim={"lr": 1e-3, "weight_decay": 0.0})


@pytest.mark.parametrize("name", ["S4Layer", "S4DLayer", "S5Layer", "MambaLayer", "H3Layer"])
def test_layers_return_a_tensor_and_their_state_through_methods(name):
    torch.manual_seed(0)
    layer = getattr(ssmlm, name)(d_model=8, d_state=4).double().eval()
    x = torch.randn(2, 10, 8, dtype=torch.float64)
    with torch.no_grad():
        y = layer(x)
        assert isinstance(y, torch.Tensor) and y.shape == x.shape
        prompt, state = layer.forward_with_state(x[:, :6])
        steps = []
        for t in range(6, 10):
            out, state = layer.step(x[:, t], state)
            steps.append(out)
    torch.testing.assert_close(torch.cat([prompt, torch.stack(steps, 1)], 1), y, atol=1e-6, rtol=0)


def test_transformer_model_learns_to_reverse_padded_sequences():
    """Variable-length reversal needs the padding mask (the first output is the last real token) and the
    cross-attention; teacher forcing needs the causal target mask. Greedy decoding then reverses unseen inputs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a small model: threads only contend on a shared CPU
    try:
        torch.manual_seed(0)
        V, L, PAD, BOS = 12, 8, 0, 1
        model = ssmlm.TransformerModel(d_model=32, num_encoder_layers=1, num_decoder_layers=1, num_heads=4, d_ff=64,
                                       dropout=0.0, attention_dropout=0.0, max_seq_len=16, vocab_size=V)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)

        def batch(n):
            lengths = torch.randint(4, L + 1, (n,))
            real = torch.arange(L)[None] < lengths[:, None]
            src = torch.where(real, torch.randint(2, V, (n, L)), PAD)
            reverse = (lengths[:, None] - 1 - torch.arange(L)[None]).clamp(min=0)
            tgt = torch.where(real, src.gather(1, reverse), PAD)
            return src, real, torch.cat([torch.full((n, 1), BOS), tgt[:, :-1]], 1), tgt

        for _ in range(150):
            src, real, tgt_in, tgt = batch(32)
            logits = model(src, tgt_in, src_mask=real, tgt_mask=ssmlm.TransformerModel.causal_mask(L))
            loss = torch.nn.functional.cross_entropy(logits[real], tgt[real])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        src, real, _, tgt = batch(256)
        with torch.no_grad():
            memory = model.encode(src, real)
            out = torch.full((256, 1), BOS)
            for _ in range(L):
                out = torch.cat([out, model.decode(out, memory, src_mask=real)[:, -1].argmax(-1, keepdim=True)], 1)
        accuracy = (out[:, 1:] == tgt)[real].float().mean().item()
    finally:
        torch.set_num_threads(threads)
    assert accuracy > 0.95, accuracy


def test_layers_take_the_seed_keyword_names():
    x = torch.randn(1, 5, 8)
    for layer in (ssmlm.S4Layer(8, 4, init_method="legt", bidirectional=True, dropout=0.1),
                  ssmlm.S4DLayer(8, 4, init_method="inv", bidirectional=True, dropout=0.1),
                  ssmlm.S5Layer(8, 4, init_method="legs", dropout=0.1),
                  ssmlm.H3Layer(8, 4, init_method="real", bidirectional=True, dropout=0.1),
                  ssmlm.MambaLayer(8, 4, expand_factor=3, init_method="lin", dropout=0.1)):
        assert layer.eval()(x).shape == x.shape
    assert ssmlm.MambaLayer(8, 4, expand_factor=3).d_inner == 24
    assert not ssmlm.H3Layer(8, 4, bidirectional=True).causal and ssmlm.H3Layer(8, 4).causal
    for refused in (lambda: ssmlm.MambaLayer(8, 4, bidirectional=True), lambda: ssmlm.S5Layer(8, 4, init_method="lin")):
        with pytest.raises(ConfigError):
            refused()


def test_bidirectional_given_as_a_model_keyword_builds_the_non_causal_model():
    for kwargs in ({"bidirectional": True}, {"architecture_kwargs": {"bidirectional": True}}):
        model = ssmlm.create_model("s4d", d_model=8, d_state=4, num_layers=1, vocab_size=11, **kwargs)
        assert not model.causal


def test_a_layer_setting_written_through_the_layer_reaches_the_core_that_reads_it():
    layer = ssmlm.S4Layer(4, 8, kernel_chunk=6)
    layer.kernel_chunk = None
    assert layer.mixer.ssm.kernel_chunk is None and "kernel_chunk" not in vars(layer)
    layer.extra = torch.nn.Linear(2, 2)  # modules stay the layer's own
    assert "extra" in layer._modules and not hasattr(layer.mixer, "extra")

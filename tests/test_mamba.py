"""Mamba LM: recurrent step equals the parallel forward, backends agree, configs build, checkpoints load."""

import json

import hydra
import pytest
import torch

from ssmlm.errors import CheckpointError, ConfigError
from ssmlm.models.mamba import MambaLM
from ssmlm.models.pretrained import load_pretrained_mamba
from conftest import move_norms_and_gates_off_init, reference_presets, run_steps

IMPROVED = dict(residual_gate="channel", head_norm=True, dropout=0.1, activation="gelu")
VARIANTS = {"plain": {}, "improved": IMPROVED, "scalar_gate_layernorm": dict(residual_gate="scalar", norm="layernorm")}


def make_model(variant="plain", vocab_size=37, **kwargs):
    torch.manual_seed(0)
    return move_norms_and_gates_off_init(MambaLM(vocab_size, d_model=24, n_layers=2, d_state=8, **VARIANTS[variant],
                                                 **kwargs).eval())


@pytest.mark.parametrize("variant", VARIANTS)
def test_state_precision_and_continuations_shorter_than_the_conv_kernel(variant):
    """(step == forward, causality, gradients: tests/test_contract.py)"""
    model = make_model(variant)
    tokens = torch.randint(0, 37, (3, 19))
    with torch.no_grad():
        logits = model(tokens)
        _, state = model(tokens[:, :7], return_state=True)
        assert state[0][1].dtype == torch.float32
        # a continuation shorter than the conv kernel, then the rest
        short, state = model(tokens[:, 7:9], state=state, return_state=True)
        rest = model(tokens[:, 9:], state=state)
        torch.testing.assert_close(torch.cat([short, rest], dim=1), logits[:, 7:], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", ["plain", "improved"])
def test_scan_backends_give_the_same_logits(variant):
    tokens = torch.randint(0, 37, (2, 150))  # more than one chunk of the chunked scan
    with torch.no_grad():
        ref = make_model(variant, scan_backend="ref")(tokens)
        chunked = make_model(variant, scan_backend="chunked")(tokens)
    torch.testing.assert_close(chunked, ref, rtol=1e-4, atol=1e-4)


def test_init_and_optimizer_hints():
    model = MambaLM(37, d_model=32, n_layers=2, residual_gate="scalar")
    mixer = model.blocks[0].mixer
    torch.testing.assert_close(-torch.exp(mixer.A_log[0]), -torch.arange(1.0, 17.0))
    torch.testing.assert_close(mixer.D, torch.ones_like(mixer.D))
    dt = torch.nn.functional.softplus(mixer.dt_proj.bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 1e-1 * 1.001
    for p in (mixer.A_log, mixer.D, mixer.dt_proj.bias, model.blocks[0].residual_gate):
        assert p._optim == {"weight_decay": 0.0}
    assert model.blocks[0].residual_gate.item() == 1.0
    assert model.head.weight is model.embedding.weight
    with pytest.raises(ConfigError, match="model.activation"):
        MambaLM(37, activation="relu")
    with pytest.raises(ConfigError, match="hardware.scan_backend"):
        MambaLM(37, scan_backend="cuda")


@pytest.mark.parametrize("preset", reference_presets())
def test_configs_build_with_sizes_comparable_to_the_diag_ssm(make_cfg, preset):
    def build(model):
        cfg = make_cfg(f"model={model}", f"experiment={preset}", "hardware=gtx1080ti")
        return hydra.utils.instantiate(cfg.model, vocab_size=141), cfg.size.n_layers

    (plain, n_layers), (improved, _), (diag, _) = build("mamba"), build("mamba_improved"), build("diag_ssm")
    assert isinstance(plain, MambaLM) and plain.blocks[0].residual_gate is None
    assert plain.head_norm is None and plain.embed_dropout.p == 0.0
    assert improved.blocks[0].residual_gate.shape == (improved.head.in_features,)
    assert improved.head_norm is not None and improved.embed_dropout.p == 0.1
    assert improved.blocks[0].mixer.activation == "gelu"
    assert improved.blocks[0].mixer.scan_backend == "chunked"  # from hardware.scan_backend
    assert len(plain.blocks) == n_layers
    assert 0.9 < plain.num_params() / diag.num_params() < 1.1


# --- pretrained checkpoints -------------------------------------------------------------------------------------

def hf_model(vocab_size=40, tie=True):
    """A random Hugging Face MambaForCausalLM: its slow path is an implementation independent of ours."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.MambaConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, state_size=8,
                                      expand=2, conv_kernel=4, use_bias=True, tie_word_embeddings=tie)
    model = transformers.MambaForCausalLM(config).eval()
    with torch.no_grad():  # away from the init values (ones, zeros) that would hide a mix-up
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias") or name.endswith(".D"):
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("tie, shard", [(True, False), (False, True)])
def test_load_hugging_face_checkpoint(tmp_path, tie, shard):
    hf = hf_model(tie=tie)
    hf.save_pretrained(tmp_path, **({"max_shard_size": "20KB"} if shard else {}))
    if shard:
        assert list(tmp_path.glob("*.index.json"))
    model = load_pretrained_mamba(tmp_path, scan_backend="chunked")
    tokens = torch.randint(0, 40, (2, 21))
    with torch.no_grad():
        expected = hf(tokens).logits
        torch.testing.assert_close(model(tokens), expected, rtol=1e-4, atol=1e-4)
        stepped, _ = run_steps(model, tokens, model.allocate_state(2))
    torch.testing.assert_close(stepped, expected, rtol=1e-4, atol=1e-4)


def test_load_mamba_ssm_checkpoint(tmp_path):
    hf = hf_model(vocab_size=40)  # the checkpoint's vocab 37 is padded to a multiple of 8 = 40
    state_dict = {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in hf.state_dict().items()}
    state_dict["lm_head.weight"] = state_dict["backbone.embedding.weight"]
    torch.save(state_dict, tmp_path / "pytorch_model.bin")
    config = dict(d_model=32, d_intermediate=0, n_layer=2, vocab_size=37, ssm_cfg=dict(d_state=8, bias=True),
                  attn_layer_idx=[], attn_cfg={}, rms_norm=True, residual_in_fp32=True, fused_add_norm=True,
                  pad_vocab_size_multiple=8, tie_embeddings=True)
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = load_pretrained_mamba(tmp_path, scan_backend="ref")
    tokens = torch.randint(0, 37, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, rtol=1e-4, atol=1e-4)


def test_mamba_ssm_layernorm_checkpoint_round_trip(tmp_path):
    model = make_model("plain", norm="layernorm", tie_embeddings=False)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    config = dict(d_model=24, n_layer=2, vocab_size=37, ssm_cfg=dict(d_state=8), rms_norm=False,
                  pad_vocab_size_multiple=1, tie_embeddings=False)
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = load_pretrained_mamba(tmp_path)
    tokens = torch.randint(0, 37, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), model(tokens))


def test_pretrained_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such directory"):
        load_pretrained_mamba(tmp_path / "absent")
    with pytest.raises(CheckpointError, match="config.json: missing"):
        load_pretrained_mamba(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(CheckpointError, match="not a Mamba-1 config"):
        load_pretrained_mamba(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"d_model": 8, "n_layer": 1, "vocab_size": 8,
                                                      "ssm_cfg": {"layer": "Mamba2"}}))
    with pytest.raises(CheckpointError, match="Mamba2"):
        load_pretrained_mamba(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"d_model": 8, "n_layer": 1, "vocab_size": 8}))
    with pytest.raises(CheckpointError, match="no weights file"):
        load_pretrained_mamba(tmp_path)
    torch.save({"backbone.embedding.weight": torch.zeros(8, 8)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="missing"):
        load_pretrained_mamba(tmp_path)

"""S4 family: DPLR kernel against the dense SSM, HiPPO init, recurrence == convolution, causality, config sizing."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ssmlm.errors import ConfigError
from ssmlm.models.hippo import MEASURES, transition
from ssmlm.models.s4 import (DISCRETIZATIONS, MIN_DECAY, S4Layer, S4LM, hippo_half, krylov_products, readout,
                             real_form, solve_small)
from ssmlm.train import train
from conftest import reference_presets
from tiny_runs import TINY, tiny_data

REPO = Path(__file__).resolve().parents[1]
PRESETS = reference_presets()


def small_lm(**kwargs):
    torch.manual_seed(0)
    defaults = dict(vocab_size=17, d_model=8, n_layers=2, d_state=8, dropout=0.0, kernel_chunk=5)
    return S4LM(**{**defaults, **kwargs}).eval()


def perturbed_layer(measure, discretization, **kwargs):
    """An fp64 layer whose Lambda, P, B have moved away from HiPPO (so the test covers any DPLR matrix)."""
    torch.manual_seed(0)
    layer = S4Layer(4, 8, init=measure, discretization=discretization, **kwargs).double()
    with torch.no_grad():
        for p in (layer.log_Lambda_real, layer.Lambda_imag, layer.P, layer.B):
            p.add_(0.2 * torch.randn_like(p))
    return layer


def full_eigenbasis(measure, N):
    V = hippo_half(measure, N)[3]
    return torch.cat([V.conj(), V], dim=1)  # conj(V) holds the eigenvectors of the conjugate eigenvalues


def dense_reference(layer, measure, L):
    """K_l = C dA^l dB (fp64) from the materialised A = V (Lambda - P P^*) V^* in the HiPPO basis."""
    with torch.no_grad():
        Lambda, P, B, dt = layer.dplr()
        C = torch.view_as_complex(layer.C)
    V = full_eigenbasis(measure, layer.d_state)
    both = lambda half: torch.cat([half.conj(), half], dim=-1)  # noqa: E731 - a mode and its conjugate
    P_full = both(P).permute(1, 2, 0)  # (H, N, r)
    A = V @ (torch.diag_embed(both(Lambda)) - P_full @ P_full.mH) @ V.mH
    B_hippo = (V @ both(B)[..., None])[..., 0]  # (H, N)
    C_hippo = both(C) @ V.mH  # (kernels, H, N): y = C x with x in the HiPPO basis
    assert A.imag.abs().max() < 1e-10 and B_hippo.imag.abs().max() < 1e-10  # a real system
    eye = torch.eye(layer.d_state, dtype=A.dtype)
    dt = dt[:, None, None].to(A.dtype)
    if layer.discretization == "bilinear":
        dA = torch.linalg.solve(eye - dt / 2 * A, eye + dt / 2 * A)
        dB = torch.linalg.solve(eye - dt / 2 * A, dt[..., 0] * B_hippo)
    else:
        dA = torch.linalg.matrix_exp(dt * A)
        dB = torch.linalg.solve(A, ((dA - eye) @ B_hippo[..., None])[..., 0])
    K, x = [], dB
    for _ in range(L):
        K.append(torch.einsum("khn,hn->kh", C_hippo, x).real)
        x = (dA @ x[..., None])[..., 0]
    return torch.stack(K, dim=-1)


@pytest.mark.parametrize("measure", MEASURES)
def test_conjugate_half_rebuilds_the_hippo_matrix(measure):
    N = 16
    Lambda, P, B, V = hippo_half(measure, N)
    assert (Lambda.imag > 0).all() and P.shape == (2 if measure == "legt" else 1, N // 2)
    V_full = full_eigenbasis(measure, N)
    torch.testing.assert_close(V_full.mH @ V_full, torch.eye(N, dtype=torch.complex128), atol=1e-10, rtol=0)
    P_full = torch.cat([P.conj(), P], dim=1).T
    rebuilt = V_full @ (torch.diag(torch.cat([Lambda.conj(), Lambda])) - P_full @ P_full.mH) @ V_full.mH
    A, B_hippo = transition(measure, N)
    torch.testing.assert_close(rebuilt.real, A, atol=1e-8, rtol=0)
    assert rebuilt.imag.abs().max() < 1e-8
    torch.testing.assert_close((V_full @ torch.cat([B.conj(), B])).real, B_hippo, atol=1e-8, rtol=0)
    with pytest.raises(ConfigError, match="even d_state"):  # odd N: one eigenvalue is its own conjugate
        hippo_half(measure, 7)


def test_solve_small_pivots_like_lu():
    torch.manual_seed(0)
    M = torch.randn(3, 40, 2, 2, dtype=torch.complex128)
    M[..., :20, 0, 0] *= 1e-6  # a tiny first pivot: elimination without a row swap loses the answer in fp32
    b = torch.randn(5, 1, 40, 2, dtype=torch.complex128)  # batch dimensions broadcast against M's
    expected = torch.linalg.solve(M, b[..., None])[..., 0]
    torch.testing.assert_close(solve_small(M.to(torch.complex64), b.to(torch.complex64)).to(expected.dtype),
                               expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(solve_small(M[..., :1, :1], b[..., :1]), b[..., :1] / M[..., 0, :1])


@pytest.mark.parametrize("measure", MEASURES)
def test_initial_A_is_the_hippo_matrix(measure):
    N = 16
    layer = S4Layer(3, N, init=measure).double()
    Lambda, P, B, _ = layer.dplr()
    A_real, B_real = real_form(Lambda, P, B)  # on [Re x, Im x], x the N/2 modes
    V = hippo_half(measure, N)[3]
    W = 2 * torch.cat([V.real, -V.imag], dim=1)  # x_hippo = 2 Re(V x) = W [Re x, Im x]; W^T W = 2 I
    torch.testing.assert_close(W.T @ W, 2 * torch.eye(N, dtype=torch.float64), atol=1e-10, rtol=0)
    A, B_hippo = transition(measure, N)
    # legt and lagt have Re Lambda = 0, clamped to -MIN_DECAY: A shifts by -MIN_DECAY I (as in S4)
    shift = 0.0 if measure == "legs" else MIN_DECAY
    for h in range(3):  # every channel starts from the same HiPPO matrix (up to fp32 storage)
        torch.testing.assert_close(W @ A_real[h] @ W.T / 2, A - shift * torch.eye(N, dtype=torch.float64),
                                   atol=1e-5, rtol=1e-6)
        torch.testing.assert_close(W @ B_real[h], B_hippo, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("measure,discretization", list(itertools.product(MEASURES, DISCRETIZATIONS)))
def test_kernel_equals_the_dense_ssm(measure, discretization):
    """fp64: the Cauchy/Woodbury (bilinear) or dense-block (zoh) kernels against C dA^l dB, both directions,
    at an odd length and at an even one (where z = -1 is among the roots of unity), chunked and not."""
    layer = perturbed_layer(measure, discretization, bidirectional=True, n_ssm=2, kernel_chunk=6)
    for L in (37, 40):
        reference = dense_reference(layer, measure, L)
        with torch.no_grad():
            chunked = layer.kernel(L)
            layer.kernel_chunk = None
            whole = layer.kernel(L)
            layer.kernel_chunk = 6
        assert chunked.shape == (2, 4, L)
        torch.testing.assert_close(chunked, reference, atol=1e-10, rtol=1e-8)
        torch.testing.assert_close(whole, reference, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("measure", MEASURES)
def test_fp32_kernel_is_accurate_at_full_state_size(measure):
    """The bilinear kernel runs in complex64; against fp64 at N = 64, L = 2048 it keeps ~4 digits or more."""
    torch.manual_seed(0)
    layer = S4Layer(4, 64, init=measure, dt_min=1e-3, dt_max=1e-1)
    with torch.no_grad():
        k32 = layer.kernel(2048).double()
        layer.double()
        dA, dB = layer.discretise()
        reference = krylov_products(readout(torch.view_as_complex(layer.C)), dA, dB[..., None], 2048, 512)[:, 0]
    error = (k32 - reference).abs().amax(-1) / reference.abs().amax(-1)
    assert error.max() < (1e-4 if measure != "lagt" else 2e-3), error  # lagt: near-zero frequencies at z = 1


def test_chunked_gradients_states_and_kernels_equal_unchunked():
    tokens = torch.randint(0, 17, (2, 30))
    for discretization in DISCRETIZATIONS:
        chunked = small_lm(kernel_chunk=4, discretization=discretization).double()
        whole = small_lm(kernel_chunk=None, discretization=discretization).double()
        whole.load_state_dict(chunked.state_dict())
        for model in (chunked, whole):  # a loss through a state-continued forward: kernels and both state paths
            _, state = model(tokens[:, :13], return_state=True)
            logits, state = model(tokens[:, 13:], state=state, return_state=True)
            (logits.square().mean() + sum(s.abs().square().sum() for s in state)).backward()
        for (name, a), b in zip(chunked.named_parameters(), whole.parameters()):
            torch.testing.assert_close(a.grad, b.grad, atol=1e-9, rtol=1e-7, msg=name)
        with torch.no_grad():
            for a, b in zip(chunked.blocks, whole.blocks):
                torch.testing.assert_close(a.mixer.ssm.kernel(30), b.mixer.ssm.kernel(30), atol=1e-10, rtol=1e-8)


def test_bidirectional_lm_refused_and_layer_is_noncausal():
    with pytest.raises(ConfigError, match="bidirectional"):
        S4LM(17, 8, 2, bidirectional=True)
    torch.manual_seed(0)
    bi = S4Layer(6, 8, bidirectional=True).double().eval()
    causal = S4Layer(6, 8).double().eval()
    weights = bi.state_dict()
    causal.load_state_dict({**weights, "mixer.ssm.C": weights["mixer.ssm.C"][1:]})
    u = torch.randn(2, 15, 6, dtype=torch.float64)
    with torch.no_grad():
        # forward kernel and skip off: what is left is the anti-causal half, the causal layer run on the
        # time-reversed input shifted by one step
        bi.C[0] = 0
        bi.D.zero_()
        causal.D.zero_()
        shifted = torch.nn.functional.pad(u.flip(1), (0, 0, 1, 0))[:, :-1]
        torch.testing.assert_close(bi(u), causal(shifted).flip(1))
        with pytest.raises(ConfigError, match="bidirectional"):
            bi.step(u[:, 0], causal.allocate_state(2))
        with pytest.raises(ConfigError, match="bidirectional"):
            bi.forward_with_state(u)


def test_dt_log_uniform_tied_copies_and_optimizer_hints():
    layer = S4Layer(4096, 4, n_ssm=2, dt_min=1e-3, dt_max=1e-1, ssm_lr=2e-3)
    dt = layer.log_dt.exp()
    assert dt.min() >= 1e-3 and dt.max() <= 1e-1 and 0.45 < (dt < 1e-2).float().mean() < 0.55
    Lambda, P, B, _ = layer.dplr()
    assert layer.Lambda_imag.shape == (2, 2) and Lambda.shape == (4096, 2) and P.shape == (1, 4096, 2)
    with torch.no_grad():
        layer.B[1] += 1  # the second copy serves the second half of the channels
    B = layer.dplr()[2]
    assert torch.equal(B[:2048], B[:1].expand(2048, -1)) and not torch.equal(B[2047], B[2048])
    for p in (layer.log_dt, layer.log_Lambda_real, layer.Lambda_imag, layer.P, layer.B):
        assert p._optim == {"weight_decay": 0.0, "lr": 2e-3}
    assert getattr(layer.C, "_optim", None) is None
    assert S4Layer(4, 4, ssm_lr=None).P._optim == {"weight_decay": 0.0}


def test_bad_config_values_are_config_errors():
    with pytest.raises(ConfigError, match="model.init"):
        S4Layer(4, 8, init="fourier")
    with pytest.raises(ConfigError, match="model.discretization"):
        S4Layer(4, 8, discretization="euler")
    with pytest.raises(ConfigError, match="model.n_ssm"):
        S4Layer(6, 8, n_ssm=4)
    with pytest.raises(ConfigError, match="model.d_state"):
        S4Layer(4, 7)


@pytest.mark.parametrize("vocab", [141, 257])
def test_config_matches_reference_param_count(vocab):
    model_cfg = OmegaConf.load(REPO / "conf/model/s4.yaml")
    for e, h, n in PRESETS.values():
        cfg = OmegaConf.create({"size": {"emb_dim": e, "hidden": h, "n_layers": n, "dropout": 0.1},
                                "model": model_cfg})
        model = instantiate(cfg.model, vocab_size=vocab)
        reference = vocab * e + e * h + n * (h * h + 6 * h) + h * vocab + vocab
        assert 0.9 < model.num_params() / reference < 1.1, (h, model.num_params(), reference)
        assert isinstance(model, S4LM) and len(model.blocks) == n


def test_trains_through_the_composed_config(make_cfg, shared_data, tmp_path):
    cfg = make_cfg("model=s4", "hardware=cpu", "logger=csv", *TINY, *tiny_data(tmp_path / "data", shared_data),
                   "trainer.max_steps=40", "trainer.max_epochs=5", "trainer.val_check_interval=20",
                   "trainer.check_val_every_n_epoch=null", "optim.lr=1e-2", "optim.warmup_steps=5")
    results = train(cfg)
    data = instantiate(cfg.data)
    data.prepare_data()
    data.setup("fit")
    assert results["global_step"] == 40
    assert results["test_bpt"] < data.unigram_entropy_bits(), results  # it learned to use the context

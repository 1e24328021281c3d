"""The Mamba Triton kernels against their PyTorch specifications: causal conv1d + SiLU (forward, backward,
decoding update), residual-add + RMSNorm, the decoding state update, and the fused mixer (``mamba_inner_fn``)
against ``MambaMixer``'s PyTorch path — outputs and every gradient.

The ``check_*`` functions run on any device. On a GPU (marker ``gpu``) they run at several sizes and dtypes;
on the CPU one small case of each runs in Triton's interpreter (a subprocess: the interpreter is chosen when
the kernels are defined), so CI checks the kernels' logic too.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from triton_interpreter import run_in_interpreter  # noqa: E402

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernels need a CUDA GPU")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, g, scale=1.0):
    return scale * torch.randn(*shape, generator=g)


def assert_close(name, got, want, dtype):
    """fp32 kernels against a float64 reference: tight; half precision: relative error in norm."""
    assert got.shape == want.shape, (name, got.shape, want.shape)
    assert torch.isfinite(got).all(), name
    got, want = got.double().cpu(), want.double().cpu()
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item() + 1e-6,
                                   msg=lambda m: f"{name}: {m}")
    else:
        rel = (got - want).norm() / want.norm().clamp_min(1e-12)
        assert rel < 2e-2, f"{name}: relative error {rel:.3g}"


def _grads(out_fn, leaves, seed=7):
    """Outputs of out_fn(*leaves) and the gradients of a fixed random projection of them."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in leaves]
    outs = out_fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = _gen(seed)
    loss = sum((o.double() * _randn(*o.shape, g=g).to(o.device, torch.float64)).sum() for o in outs if o is not None)
    present = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(loss, present)
    return outs, grads


def _layout(t, layout):
    """Same values as t (batch, dim, L), stored another way: 'contiguous'; 'channels_last' (batch, L, dim)
    storage, as a slice of a wider projection; 'dim_major' (dim, batch, L) storage, as the fused mixer keeps it."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":
        wide = torch.cat([t, t], dim=1).transpose(1, 2).contiguous()  # (batch, L, 2 dim)
        return wide.transpose(1, 2)[:, : t.shape[1]]
    if layout == "dim_major":
        return t.permute(1, 0, 2).contiguous().permute(1, 0, 2)
    raise ValueError(layout)


def check_conv(batch, dim, L, width, dtype, device, layout="contiguous", with_bias=True, seed=0):
    from ssmlm.ops.causal_conv1d import causal_conv1d, causal_conv1d_ref

    g = _gen(seed)
    x = _randn(batch, dim, L, g=g).to(device, dtype)
    w = _randn(dim, 1, width, g=g, scale=0.5).to(device)  # nn.Conv1d's shape, fp32 like the parameter
    b = _randn(dim, g=g).to(device) if with_bias else None

    def fused(x, w, b):
        return causal_conv1d(_layout(x, layout), w, b)

    def ref(x, w, b):
        return causal_conv1d_ref(x.double(), w.double(), None if b is None else b.double())

    (y,), grads = _grads(fused, [x, w, b])
    (y_ref,), grads_ref = _grads(ref, [x, w, b])
    assert y.dtype == dtype
    assert_close("y", y, y_ref, dtype)
    for name, a, r in zip(["dx", "dw", "db"], grads, grads_ref):
        assert_close(name, a, r, dtype)


def check_conv_update(batch, dim, L, width, dtype, device, seed=0):
    """Step-by-step updates from a zero state reproduce the causal conv; the state is the last inputs."""
    from ssmlm.ops.causal_conv1d import causal_conv1d_ref, causal_conv1d_update, causal_conv1d_update_ref

    g = _gen(seed)
    x = _randn(batch, dim, L, g=g).to(device, dtype)
    w = _randn(dim, 1, width, g=g, scale=0.5).to(device)
    b = _randn(dim, g=g).to(device)
    state = torch.zeros(batch, dim, width - 1, device=device, dtype=dtype)
    ref_state = state.double()
    outs = []
    for t in range(L):
        y, state = causal_conv1d_update(x[..., t], state, w, b)
        y_ref, ref_state = causal_conv1d_update_ref(x[..., t].double(), ref_state, w.double(), b.double())
        assert_close(f"step {t}", y, y_ref, dtype)
        outs.append(y)
    assert_close("steps vs conv", torch.stack(outs, -1), causal_conv1d_ref(x.double(), w.double(), b.double()),
                 dtype)
    assert_close("state", state, ref_state, dtype)


def check_rms_norm(rows, n, dtype, device, with_residual=True, residual_in_fp32=True, out_dtype=None, seed=0):
    from ssmlm.ops.rms_norm import add_rms_norm, add_rms_norm_ref

    g = _gen(seed)
    x = _randn(2, rows, n, g=g).to(device, dtype)
    res = _randn(2, rows, n, g=g).to(device, torch.float32) if with_residual else None
    w = (1 + 0.1 * _randn(n, g=g)).to(device)
    kw = dict(eps=1e-5, residual_in_fp32=residual_in_fp32, out_dtype=out_dtype)

    def fused(x, w, res):
        out, res_out = add_rms_norm(x, w, res, **kw)
        return out, res_out

    def ref(x, w, res):
        return add_rms_norm_ref(x.double(), w.double(), None if res is None else res.double(), **kw)

    outs, grads = _grads(fused, [x, w, res])
    (out_ref, res_out_ref), grads_ref = _grads(ref, [x, w, res])
    assert outs[0].dtype == (out_dtype or dtype)
    assert_close("out", outs[0], out_ref, dtype if out_dtype is None else torch.bfloat16)
    if with_residual:
        assert outs[1].dtype == (torch.float32 if residual_in_fp32 else dtype)
        assert_close("residual_out", outs[1], res_out_ref, dtype if not residual_in_fp32 else torch.float32)
    else:
        assert outs[1] is None
    for name, a, r in zip(["dx", "dw", "dres"], grads, grads_ref):
        assert_close(name, a, r, dtype)


def check_norm_module(device, seed=0):
    """The models' RMSNorm (the Triton kernel where it runs) against torch's: same output and gradients."""
    from ssmlm.models import blocks

    torch.manual_seed(seed)
    norm = blocks.RMSNorm(24, eps=1e-5).to(device)
    with torch.no_grad():
        norm.weight.mul_(1 + 0.1 * torch.randn(24, device=device))
    x = torch.randn(3, 5, 24, device=device)
    outs, grads = _grads(lambda x, w: torch.func.functional_call(norm, {"weight": w}, (x,)), [x, norm.weight])
    outs_ref, grads_ref = _grads(lambda x, w: F.rms_norm(x.double(), (24,), w.double(), 1e-5), [x, norm.weight])
    assert_close("out", outs[0], outs_ref[0], torch.float32)
    for name, a, r in zip(["dx", "dw"], grads, grads_ref):
        assert_close(name, a, r, torch.float32)


def check_state_update(batch, dim, N, dtype, device, seed=0):
    from ssmlm.ops.mamba_inner import selective_state_update

    g = _gen(seed)
    state = _randn(batch, dim, N, g=g).to(device)
    x, dt, z = (_randn(batch, dim, g=g).to(device, dtype) for _ in range(3))
    A = -(0.2 + 2 * torch.rand(dim, N, generator=g)).to(device)
    bc = _randn(batch, 2 * N + 3, g=g).to(device, dtype)  # B and C as slices of one projection
    B, C = bc[:, 3:3 + N], bc[:, 3 + N:]
    D, bias = _randn(dim, g=g).to(device), _randn(dim, g=g, scale=0.3).to(device)
    y, new = selective_state_update(state, x, dt, A, B, C, D, z, bias)
    d = torch.nn.functional.softplus(dt.double() + bias.double())
    new_ref = state.double() * torch.exp(d[..., None] * A.double()) + (d * x.double())[..., None] * B.double()[:, None]
    y_ref = (new_ref * C.double()[:, None]).sum(-1) + D.double() * x.double()
    y_ref = y_ref * torch.nn.functional.silu(z.double())
    assert y.dtype == dtype and new.dtype == torch.float32
    assert_close("state", new, new_ref, torch.float32)
    assert_close("y", y, y_ref, dtype)


def _mixer(d_model, d_state, device, seed=0, conv_bias=True):
    from ssmlm.models.mamba import MambaMixer

    torch.manual_seed(seed)
    mixer = MambaMixer(d_model, d_state=d_state, conv_bias=conv_bias, scan_backend="ref").to(device)
    with torch.no_grad():  # not the zero-ish init: every parameter matters in the gradients
        for p in mixer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return mixer


def check_mamba_inner(batch, L, d_model, d_state, device, autocast=False, conv_bias=True, save_xz=False, seed=0):
    """mamba_inner_fn against MambaMixer's PyTorch path (sequential reference scan) in fp32: output, returned
    state, the input's and every parameter's gradient. With ``autocast`` the fused side runs in bf16."""
    from ssmlm.ops import mamba_inner

    def fused(h):
        saved, mamba_inner.SAVE_XZ = mamba_inner.SAVE_XZ, save_xz
        try:
            return mamba_inner.mamba_mixer_forward(mixer, h)
        finally:
            mamba_inner.SAVE_XZ = saved

    mixer = _mixer(d_model, d_state, device, seed, conv_bias)
    hidden = torch.randn(batch, L, d_model, generator=_gen(seed + 1)).to(device)
    dout = torch.randn(batch, L, d_model, generator=_gen(seed + 2)).to(device)
    params = list(mixer.parameters())

    def run(fn):
        h = hidden.clone().requires_grad_()
        with torch.autocast(device.type if isinstance(device, torch.device) else device, dtype=torch.bfloat16,
                            enabled=autocast):
            out, (conv_state, ssm_state) = fn(h)
        grads = torch.autograd.grad((out.float() * dout).sum(), [h, *params])
        return out, conv_state, ssm_state, grads

    out, conv_state, ssm_state, grads = run(fused)
    out_ref, conv_ref, ssm_ref, grads_ref = run(lambda h: mixer(h))
    dtype = torch.bfloat16 if autocast else torch.float32
    assert_close("out", out, out_ref, dtype)
    assert_close("conv_state", conv_state, conv_ref, dtype)
    assert_close("ssm_state", ssm_state, ssm_ref, dtype)
    names = ["hidden", *(n for n, _ in mixer.named_parameters())]
    for name, a, r in zip(names, grads, grads_ref):
        assert a.dtype == r.dtype, name
        assert_close(f"d{name}", a, r, dtype)


def check_mixer_step(batch, d_model, d_state, steps, device, seed=0):
    """mamba_mixer_step (Triton step kernels) against MambaMixer.step, several steps from a random state."""
    from ssmlm.ops.mamba_inner import mamba_mixer_step

    mixer = _mixer(d_model, d_state, device, seed)
    g = _gen(seed + 1)
    state = tuple(_randn(*s.shape, g=g).to(device) for s in mixer.allocate_state(batch, device=device))
    ref_state = state
    with torch.no_grad():
        for t in range(steps):
            h = _randn(batch, d_model, g=g).to(device)
            out, state = mamba_mixer_step(mixer, h, state)
            out_ref, ref_state = mixer.step(h, ref_state)
            assert_close(f"out {t}", out, out_ref, torch.float32)
    assert_close("conv_state", state[0], ref_state[0], torch.float32)
    assert_close("ssm_state", state[1], ref_state[1], torch.float32)


def check_lm_fused_vs_unfused(device, autocast=False, seed=0, d_model=32, n_layers=3, d_state=8, L=77):
    """MambaLM with the fused mixer and norm against the same model on the PyTorch mixer (Triton scan in both):
    logits and every parameter's gradient; then prompt-then-step equals the parallel forward."""
    from ssmlm.models.mamba import MambaLM, MambaMixer

    torch.manual_seed(seed)
    model = MambaLM(50, d_model=d_model, n_layers=n_layers, d_state=d_state, scan_backend="triton").to(device)
    tokens = torch.randint(0, 50, (2, L), generator=_gen(seed)).to(device)

    def run():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            logits = model(tokens)
        logits.float().square().mean().backward()
        return logits, [p.grad.clone() for p in model.parameters()]

    logits, grads = run()
    saved = MambaMixer._fused
    MambaMixer._fused = lambda self, x: False
    try:
        logits_ref, grads_ref = run()
    finally:
        MambaMixer._fused = saved
    dtype = torch.bfloat16 if autocast else torch.float32
    assert_close("logits", logits, logits_ref, dtype)
    for (name, _), a, r in zip(model.named_parameters(), grads, grads_ref):
        assert_close(f"d{name}", a, r, dtype)
    with torch.no_grad():
        out, state = model(tokens[:, :L // 2], return_state=True)
        for t in range(L // 2, L):
            out, state = model.step(tokens[:, t], state)
        assert_close("step vs forward", out, logits[:, -1].detach(), dtype)


# ----------------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("autocast", [False, True])
def test_lm_fused_vs_unfused_gpu(autocast):
    check_lm_fused_vs_unfused("cuda", autocast)


DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "dim_major"])
@pytest.mark.parametrize("L", [1, 3, 130, 1037])
@pytest.mark.gpu
@needs_cuda
def test_conv_gpu(L, layout, dtype):
    check_conv(2, 70, L, 4, dtype, "cuda", layout)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("width,with_bias", [(2, False), (3, True)])
def test_conv_widths_gpu(width, with_bias):
    check_conv(3, 33, 257, width, torch.float32, "cuda", "channels_last", with_bias)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_conv_update_gpu(dtype):
    check_conv_update(3, 70, 9, 4, dtype, "cuda")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("n", [64, 768, 1000])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual,residual_in_fp32", [(True, True), (True, False), (False, True)])
def test_rms_norm_gpu(n, dtype, with_residual, residual_in_fp32):
    check_rms_norm(37, n, dtype, "cuda", with_residual, residual_in_fp32)


@pytest.mark.gpu
@needs_cuda
def test_rms_norm_out_dtype_gpu():
    check_rms_norm(5, 512, torch.float32, "cuda", out_dtype=torch.bfloat16)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_state_update_gpu(dtype):
    check_state_update(3, 100, 16, dtype, "cuda")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("L", [1, 2, 67, 300])
def test_mamba_inner_gpu(L):
    check_mamba_inner(2, L, 32, 16, "cuda")


@pytest.mark.gpu
@needs_cuda
def test_mamba_inner_no_conv_bias_gpu():
    check_mamba_inner(3, 130, 24, 8, "cuda", conv_bias=False)


@pytest.mark.gpu
@needs_cuda
def test_mamba_inner_save_xz_gpu():
    check_mamba_inner(2, 129, 32, 16, "cuda", save_xz=True)


@pytest.mark.gpu
@needs_cuda
def test_mamba_inner_autocast_gpu():
    check_mamba_inner(2, 200, 64, 16, "cuda", autocast=True)


@pytest.mark.gpu
@needs_cuda
def test_mixer_step_gpu():
    check_mixer_step(3, 48, 16, 5, "cuda")


# ------------------------------------------------------------------------------------------- CPU (interpreter)

INTERPRETER_SCRIPT = """
    import torch
    import ssmlm.ops.causal_conv1d as cc
    import ssmlm.ops.triton_scan as ts
    from tests import test_mamba_kernels as t
    cc.FWD_BLOCK_D, cc.FWD_BLOCK_L, cc.BWD_BLOCK_D, cc.BWD_BLOCK_L, cc.BWD_TILES = 4, 8, 4, 4, 2  # partial tiles
    ts.CONFIG = ts.ScanConfig(t_chunk=8, fwd_block_d=4, bwd_block_d=4)
    which = sys.argv[2]
    if which == "conv":
        t.check_conv(2, 6, 19, 4, torch.float32, "cpu", "channels_last")
        t.check_conv(1, 5, 1, 3, torch.float32, "cpu", "dim_major", with_bias=False)
        t.check_conv_update(2, 5, 5, 4, torch.float32, "cpu")
    elif which == "norm":
        t.check_rms_norm(3, 24, torch.float32, "cpu")
        t.check_rms_norm(3, 10, torch.float32, "cpu", with_residual=False)
        from ssmlm.models import blocks
        blocks.resolve_backend = lambda backend, device: "triton"  # the interpreter runs the kernels on the CPU
        t.check_norm_module("cpu")
    elif which == "mixer":
        t.check_mamba_inner(2, 13, 8, 4, "cpu")
        t.check_mamba_inner(1, 1, 8, 4, "cpu", save_xz=True, conv_bias=False)
        t.check_state_update(2, 6, 4, torch.float32, "cpu")
        t.check_mixer_step(2, 8, 4, 3, "cpu")
    elif which == "lm":
        t.check_lm_fused_vs_unfused("cpu", d_model=8, n_layers=2, d_state=4, L=11)
    print("ok")
"""


@pytest.mark.parametrize("which", ["conv", "norm", "mixer", "lm"])
def test_kernels_in_triton_interpreter(which):
    """Small cases on the CPU: partial tiles, L=1, strided inputs, with and without bias / residual."""
    run_in_interpreter(INTERPRETER_SCRIPT, which)

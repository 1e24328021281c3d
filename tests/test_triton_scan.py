"""The fused Triton selective scan against the sequential reference: outputs and every gradient.

The GPU tests need CUDA (marker ``gpu``); on a CPU-only machine they skip. One small case also runs the
kernels on the CPU through Triton's interpreter (in a subprocess, because the interpreter is chosen when the
kernels are defined), so CI checks the kernel logic too.
"""

from __future__ import annotations

import pytest
import torch

from ssmlm.ops.scan_ref import selective_scan_ref
from triton_interpreter import run_in_interpreter

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernels need a CUDA GPU")


def make_inputs(batch, dim, N, L, *, dtype=torch.float32, variable_B=True, variable_C=True, with_D=True,
                with_z=True, with_bias=True, with_initial=False, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(device)

    return dict(
        u=randn(batch, dim, L).to(dtype),
        delta=randn(batch, dim, L, scale=0.5).to(dtype),
        A=-(0.2 + 2 * torch.rand(dim, N, generator=g)).to(device),
        B=randn(batch, N, L) if variable_B else randn(dim, N),
        C=randn(batch, N, L) if variable_C else randn(dim, N),
        D=randn(dim) if with_D else None,
        z=randn(batch, dim, L).to(dtype) if with_z else None,
        delta_bias=randn(dim, scale=0.3) if with_bias else None,
        initial_state=randn(batch, dim, N) if with_initial else None,
    )


def run_with_grads(fn, inputs, softplus, last_state, views=None, seed=1):
    """Output(s) and the gradients of a fixed random projection of them w.r.t. every tensor input.

    ``views`` maps an input name to a function applied to its leaf before the call (strided views).
    """
    views = views or {}
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items() if v is not None}
    args = {k: views.get(k, lambda t: t)(leaves[k]) if k in leaves else None for k in inputs}
    init = args.pop("initial_state")
    kwargs = dict(x0=init) if fn is selective_scan_ref else dict(initial_state=init)
    out = fn(**args, delta_softplus=softplus, return_last_state=last_state, **kwargs)
    y, last = out if last_state else (out, None)
    g = torch.Generator().manual_seed(seed)
    loss = (y.float() * torch.randn(y.shape, generator=g).to(y.device)).sum()
    if last_state:
        loss = loss + (last * torch.randn(last.shape, generator=g).to(last.device)).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return y, last, dict(zip(leaves, grads))


def assert_matches(triton_fn, inputs, softplus, last_state, dtype, views=None):
    y, last, grads = run_with_grads(triton_fn, inputs, softplus, last_state, views)
    y_ref, last_ref, grads_ref = run_with_grads(selective_scan_ref, inputs, softplus, last_state, views)
    assert y.dtype == y_ref.dtype and y.shape == y_ref.shape
    pairs = [("y", y, y_ref)] + [(f"d{k}", grads[k], grads_ref[k]) for k in grads_ref]
    if last_state:
        assert last.dtype == torch.float32
        pairs.append(("last_state", last, last_ref))
    for name, got, want in pairs:
        assert got.shape == want.shape and got.dtype == want.dtype, name
        assert torch.isfinite(got).all(), name
        got, want = got.double(), want.double()
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item() + 1e-6,
                                       msg=lambda m: f"{name}: {m}")
        else:  # half precision inputs: compare in norm, the reference rounds at different places
            rel = (got - want).norm() / want.norm().clamp_min(1e-12)
            assert rel < 2e-2, f"{name}: relative error {rel:.3g}"


CASES = {
    # name: (batch, dim, N, L, options)
    "full": (2, 37, 16, 100, {}),
    "single_step": (2, 5, 16, 1, {}),
    "n1_fixed_bc": (1, 12, 1, 67, dict(variable_B=False, variable_C=False)),
    "n64_long": (2, 40, 64, 300, dict(with_initial=True)),
    "fixed_B_plain": (3, 16, 16, 64, dict(variable_B=False, with_D=False, with_z=False, with_bias=False)),
    "fixed_C_initial": (2, 33, 16, 129, dict(variable_C=False, with_initial=True)),
}


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("softplus,last_state", [(True, True), (False, False)])
def test_matches_reference_fp32(case, softplus, last_state):
    from ssmlm.ops.triton_scan import selective_scan_triton

    batch, dim, N, L, opts = CASES[case]
    inputs = make_inputs(batch, dim, N, L, device="cuda", **opts)
    if not softplus:  # delta is used as given: keep it positive so the states decay
        inputs["delta"] = torch.nn.functional.softplus(inputs["delta"])
    assert_matches(selective_scan_triton, inputs, softplus, last_state, torch.float32)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["full", "n64_long"])
def test_matches_reference_half(case, dtype):
    from ssmlm.ops.triton_scan import selective_scan_triton

    batch, dim, N, L, opts = CASES[case]
    inputs = make_inputs(batch, dim, N, L, dtype=dtype, device="cuda", **opts)
    assert_matches(selective_scan_triton, inputs, True, True, dtype)


@pytest.mark.gpu
@needs_cuda
def test_non_contiguous_inputs():
    from ssmlm.ops.triton_scan import selective_scan_triton

    batch, dim, N, L = 2, 24, 16, 90
    inputs = make_inputs(batch, dim, N, L, device="cuda", with_initial=True)
    inputs["u"] = torch.cat([inputs["u"], inputs["z"]], dim=1)  # an xz projection, split below

    def time_major(t):  # same values, stored (batch, L, channels) as a Mamba block's projections are
        return t.transpose(1, 2).contiguous().transpose(1, 2)

    views = dict(
        u=lambda xz: xz[:, :dim],  # channel-strided slice, like x, z = xz.chunk(2, dim=1)
        z=time_major, delta=time_major, B=time_major, initial_state=time_major,
        A=lambda a: a.t().contiguous().t(),
    )
    assert views["u"](inputs["u"]).stride() == (2 * dim * L, L, 1)
    assert time_major(inputs["delta"]).stride(-1) != 1
    assert_matches(selective_scan_triton, inputs, True, True, torch.float32, views)


@pytest.mark.gpu
@needs_cuda
def test_launch_configs_agree():
    """Other chunk sizes, block sizes and the partial-sum reduction for dB/dC compute the same function."""
    import ssmlm.ops.triton_scan as ts

    inputs = make_inputs(2, 48, 16, 200, device="cuda", with_initial=True)
    default = ts.CONFIG
    try:
        for config in (ts.ScanConfig(t_chunk=64, fwd_block_d=16, fwd_warps=2, bwd_block_d=16, bwd_warps=2),
                       ts.ScanConfig(t_chunk=16, bwd_block_d=4, bc_partial=True)):
            ts.CONFIG = config
            assert_matches(ts.selective_scan_triton, inputs, True, True, torch.float32)
    finally:
        ts.CONFIG = default


INTERPRETER_SCRIPT = """
    import torch
    import ssmlm.ops.triton_scan as ts
    from tests.test_triton_scan import assert_matches, make_inputs
    ts.CONFIG = ts.ScanConfig(t_chunk=8, fwd_block_d=4, bwd_block_d=2)
    inputs = make_inputs(1, 3, 2, 13, variable_C=False, with_initial=True)
    assert_matches(ts.selective_scan_triton, inputs, True, True, torch.float32)
    strided = lambda t: t.transpose(-1, -2).contiguous().transpose(-1, -2)  # noqa: E731 - time stride != 1
    inputs = make_inputs(2, 5, 3, 11)
    assert_matches(ts.selective_scan_triton, inputs, True, False, torch.float32,
                   views={k: strided for k in ("u", "delta", "z", "B", "C")})
    print("ok")
"""


def test_kernels_in_triton_interpreter():
    """Tiny case on the CPU: a chunk boundary, a partial chunk, a partial channel block, fixed C, all options."""
    pytest.importorskip("triton")
    run_in_interpreter(INTERPRETER_SCRIPT)

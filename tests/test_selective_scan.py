"""Every selective-scan backend against the sequential specification, in outputs and gradients."""

import random
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ssmlm.errors import ConfigError
from ssmlm.ops.chunked_scan import default_chunk_size, selective_scan_chunked
from ssmlm.ops.scan_ref import selective_scan_ref
from ssmlm.ops.selective_scan import resolve_backend, selective_scan

ARG_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def _backends():
    names = ["chunked"]
    if torch.cuda.is_available() and resolve_backend("auto", torch.device("cuda")) == "triton":
        names.append("triton")
    return names


def make_inputs(batch, dim, N, L, *, fixed_B=False, fixed_C=False, D=True, z=True, delta_bias=True,
                softplus=True, initial_state=True, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, positive=False):
        x = torch.rand(*shape, generator=g) if positive else torch.randn(*shape, generator=g)
        return x * scale

    # without softplus delta itself must be positive, or exp(delta A) > 1 and the scan blows up
    delta = rand(batch, dim, L, scale=0.5) if softplus else rand(batch, dim, L, scale=0.5, positive=True) + 0.01
    inputs = dict(
        u=rand(batch, dim, L), delta=delta, A=-(rand(dim, N, scale=3.0, positive=True) + 0.1),
        B=rand(dim, N) if fixed_B else rand(batch, N, L), C=rand(dim, N) if fixed_C else rand(batch, N, L),
        D=rand(dim) if D else None, z=rand(batch, dim, L) if z else None,
        delta_bias=(rand(dim) if softplus else rand(dim, scale=0.1, positive=True)) if delta_bias else None,
        initial_state=rand(batch, dim, N) if initial_state else None,
    )
    # A and the scalar parameters stay fp32 (as in a model); the sequence tensors take `dtype`
    low_precision = ("u", "delta", "B", "C", "z") if dtype != torch.float32 else ()
    return {k: None if v is None else v.to(device=device, dtype=dtype if k in low_precision else torch.float32)
            .requires_grad_() for k, v in inputs.items()}


def run(scan, inputs, softplus, **kwargs):
    """Outputs (y, last state) and the gradients of all given inputs for fixed random output gradients."""
    y, last = scan(**inputs, delta_softplus=softplus, return_last_state=True, **kwargs)
    g = torch.Generator().manual_seed(1)
    grad_y = torch.randn(y.shape, generator=g).to(y)
    grad_last = torch.randn(last.shape, generator=g).to(last)
    given = [v for v in inputs.values() if v is not None]
    grads = torch.autograd.grad((y, last), given, (grad_y, grad_last))
    return y, last, dict(zip([k for k, v in inputs.items() if v is not None], grads))


def ref_scan(initial_state=None, **kwargs):
    return selective_scan_ref(**kwargs, x0=initial_state)


def assert_matches(inputs, softplus, scan, rtol, atol, **kwargs):
    y_ref, last_ref, grads_ref = run(ref_scan, inputs, softplus)
    scan_inputs = {k: None if v is None else v.detach().clone().requires_grad_() for k, v in inputs.items()}
    y, last, grads = run(scan, scan_inputs, softplus, **kwargs)
    assert y.dtype == inputs["u"].dtype and last.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(last, last_ref, rtol=rtol, atol=atol)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        assert grads[name].dtype == inputs[name].dtype, name
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


# Random cases over the option space: shapes with L = 1, L < chunk, L not a multiple of the chunk, several chunks.
_rng = random.Random(0)
FLAGS = ("fixed_B", "fixed_C", "D", "z", "delta_bias", "softplus", "initial_state")
CASES = [dict(batch=_rng.randint(1, 3), dim=_rng.randint(1, 5), N=_rng.randint(1, 6), L=L,
              chunk_size=_rng.choice([4, 8, 16]), **{f: _rng.random() < 0.5 for f in FLAGS})
         for L in (1, 2, 3, 5, 8, 13, 16, 17, 31, 40, 1, 7, 24, 33)]
CASES += [dict(batch=2, dim=3, N=4, L=21, chunk_size=8, **{f: on for f in FLAGS}) for on in (False, True)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join([f"L{c['L']}", f"T{c['chunk_size']}"]
                                                               + [f for f in FLAGS if c[f]]))
def test_chunked_matches_ref_fp32(case):
    case = dict(case)
    chunk_size, softplus = case.pop("chunk_size"), case["softplus"]
    inputs = make_inputs(**case, seed=case["L"])
    assert_matches(inputs, softplus, selective_scan_chunked, rtol=1e-4, atol=1e-5, chunk_size=chunk_size)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("L", [1, 75, 150])
def test_backend_matches_ref_through_dispatcher(backend, L):
    device = "cuda" if backend == "triton" else "cpu"
    inputs = make_inputs(2, 4, 8, L, device=device, seed=L)
    assert_matches(inputs, True, selective_scan, rtol=1e-4, atol=1e-4, backend=backend)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("fixed", [False, True])
def test_backend_matches_ref_bf16(backend, fixed):
    device = "cuda" if backend == "triton" else "cpu"
    inputs = make_inputs(2, 4, 8, 45, fixed_B=fixed, fixed_C=fixed, dtype=torch.bfloat16, device=device)
    assert_matches(inputs, True, selective_scan, rtol=2e-2, atol=2e-2, backend=backend)


def test_stable_for_fast_decay_and_long_chunks():
    """exp(cumsum) tricks overflow when delta*A sums past ~88 in a chunk; the chunked scan must not."""
    inputs = make_inputs(1, 2, 4, 300, softplus=False, delta_bias=False)
    with torch.no_grad():
        inputs["delta"].fill_(2.0)
        inputs["A"].fill_(-20.0)  # log-decay -40 per step: -2560 over a 64-step chunk
    y, last = selective_scan_chunked(**{k: v for k, v in inputs.items() if k != "initial_state"},
                                     initial_state=inputs["initial_state"], return_last_state=True, chunk_size=64)
    y_ref, last_ref = selective_scan_ref(**{k: v for k, v in inputs.items() if k != "initial_state"},
                                         x0=inputs["initial_state"], return_last_state=True)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(last, last_ref)


def test_default_chunk_sizes():
    assert default_chunk_size(torch.empty(2, 256, 8), 16) == 64  # CPU: short chunks
    # accelerators (a meta tensor stands in): the longest chunk whose (batch, dim, T, N) tensor fits 64 MB
    assert default_chunk_size(torch.empty(4, 624, 8, device="meta"), 16) == 256
    assert default_chunk_size(torch.empty(8, 1536, 8, device="meta"), 16) == 64
    assert default_chunk_size(torch.empty(64, 4096, 8, device="meta"), 16) == 32


def test_backend_names():
    assert resolve_backend("auto", torch.device("cpu")) == "chunked"
    assert resolve_backend("ref", torch.device("cpu")) == "ref"
    inputs = make_inputs(1, 2, 2, 3)
    with pytest.raises(ConfigError, match="hardware.scan_backend"):
        selective_scan(inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"], backend="fast")


class PeakNewTensorBytes(TorchDispatchMode):
    """Peak total size of the tensor storages created by ops while active (views of existing ones excluded).

    Counts live storages directly, so it does not depend on how the allocator returns memory to the system.
    """

    def __init__(self):
        super().__init__()
        self.live, self.peak, self.tracked = 0, 0, set()

    def _freed(self, key, nbytes):
        self.live -= nbytes
        self.tracked.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view or func._schema.is_mutable:  # views and in-place ops allocate nothing
            return out
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if key in self.tracked or nbytes == 0:
                continue
            self.tracked.add(key)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._freed, key, nbytes)
        return out


def test_chunked_memory_is_bounded_in_length():
    """Forward + backward never holds the (batch, dim, L, N) states: for 2 x 256 x 8192 x 16 those are 268 MB.

    Scaled to dim=64 (all sizes here are linear in dim): the states would be 67 MB. What must exist anyway are the
    output and the gradients (u, delta, z: 3 x batch*dim*L floats, B and C: 2 x batch*N*L); the rest is the
    chunk-boundary states (L/chunk x batch*dim*N) and one chunk's temporaries.
    """
    batch, dim, N, L = 2, 64, 16, 8192
    inputs = make_inputs(batch, dim, N, L, initial_state=False)
    args = {k: v for k, v in inputs.items() if k != "initial_state"}
    all_states = batch * dim * L * N * 4
    outputs_and_grads = (4 * batch * dim * L + 2 * batch * N * L) * 4
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tracking makes this op-bound: spare the shared CI cores the thread hand-offs
    try:
        with PeakNewTensorBytes() as memory:
            y = selective_scan_chunked(**args, delta_softplus=True)
            y.sum().backward()
    finally:
        torch.set_num_threads(threads)
    assert memory.peak < all_states / 2
    assert memory.peak - outputs_and_grads < all_states / 8

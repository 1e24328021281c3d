"""The selective scan behind one function, with a choice of backend.

``selective_scan`` takes the arguments of mamba_ssm's ``selective_scan_fn`` (plus ``initial_state``, the state
before the first step, so a model can continue from a prompt) and hands them to one of:

* ``ref``: :func:`ssmlm.ops.scan_ref.selective_scan_ref`, the sequential specification (slow);
* ``chunked``: :func:`ssmlm.ops.chunked_scan.selective_scan_chunked`, pure PyTorch, any device, memory
  bounded in the sequence length;
* ``triton``: ``ssmlm.ops.triton_scan.selective_scan_triton``, fused GPU kernels (CUDA);
* ``auto``: ``triton`` on CUDA devices of compute capability >= 8.0 where Triton imports, else ``chunked``.

The backend name comes from the config key ``hardware.scan_backend``.
"""

from __future__ import annotations

import functools

import torch

from ssmlm.errors import ConfigError
from ssmlm.ops.chunked_scan import selective_scan_chunked
from ssmlm.ops.scan_ref import selective_scan_ref

BACKENDS = ("auto", "triton", "chunked", "ref")


def check_backend(backend: str) -> str:
    """Return ``backend`` if it names a backend, else raise a ConfigError naming the config key."""
    if backend not in BACKENDS:
        raise ConfigError(f"hardware.scan_backend={backend!r} is not a selective-scan backend; "
                          f"use one of {', '.join(BACKENDS)}")
    return backend


@functools.cache
def _triton_scan():
    """The Triton kernel entry point, or None where Triton (or a CUDA build of it) is missing."""
    try:
        from ssmlm.ops.triton_scan import selective_scan_triton
    except ImportError:
        return None
    return selective_scan_triton


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend ``backend`` means for tensors on ``device`` (``auto`` resolved)."""
    check_backend(backend)
    if backend != "auto":
        return backend
    if device.type != "cuda":
        return "chunked"
    return _auto_on_gpu(torch.cuda.current_device() if device.index is None else device.index)


@functools.cache
def _auto_on_gpu(index: int) -> str:
    """``auto`` on GPU ``index``, decided once: every layer asks on every forward and decoding step."""
    return "triton" if torch.cuda.get_device_capability(index)[0] >= 8 and _triton_scan() is not None else "chunked"


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, backend="auto", initial_state=None):
    """``x_t = exp(delta_t A) x_{t-1} + delta_t B_t u_t``; ``y_t = <C_t, x_t> + D u_t``; ``y *= silu(z)``.

    u, delta, z: (batch, dim, L); A: (dim, N) real; B, C: (batch, N, L) input-dependent or (dim, N) fixed;
    D, delta_bias: (dim,); initial_state: (batch, dim, N) or None (zeros). ``delta_bias`` is added to delta and
    ``delta_softplus`` applies softplus before the scan. Returns y (batch, dim, L) in u's dtype and, with
    ``return_last_state``, the state after the last step (batch, dim, N), accumulated in fp32.
    """
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    name = resolve_backend(backend, u.device)
    if name == "ref":
        return selective_scan_ref(*args, x0=initial_state)
    if name == "chunked":
        return selective_scan_chunked(*args, initial_state=initial_state)
    triton_scan = _triton_scan()
    if triton_scan is None:
        raise ConfigError("hardware.scan_backend=triton needs the ssmlm.ops.triton_scan kernels, which need the "
                          "`triton` package and a CUDA GPU; use hardware.scan_backend=chunked (or auto)")
    if initial_state is None:
        return triton_scan(*args)
    return triton_scan(*args, initial_state=initial_state)

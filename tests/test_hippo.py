"""HiPPO matrices: known structure of LegS, the NPLR / DPLR identities, stability of every measure."""

from __future__ import annotations

import pytest
import torch

from ssmlm.errors import ConfigError
from ssmlm.models.hippo import MEASURES, dplr, low_rank, nplr, transition


def test_legs_is_lower_triangular_with_diagonal_minus_n_plus_one():
    N = 12
    A, B = transition("legs", N)
    assert torch.equal(A, torch.tril(A))
    torch.testing.assert_close(torch.diagonal(A), -torch.arange(1, N + 1, dtype=torch.float64))
    torch.testing.assert_close(A[3, 1], -torch.tensor(7.0 * 3.0, dtype=torch.float64).sqrt())
    torch.testing.assert_close(B, torch.sqrt(2 * torch.arange(N, dtype=torch.float64) + 1))


def test_legs_plus_rank_one_is_skew_minus_half_identity():
    N = 32
    A, _ = transition("legs", N)
    P = low_rank("legs", N)
    assert P.shape == (1, N) and torch.linalg.matrix_rank(P.T @ P) == 1
    torch.testing.assert_close(P[0], torch.sqrt(torch.arange(N, dtype=torch.float64) + 0.5))
    skew = A + P.T @ P + 0.5 * torch.eye(N, dtype=torch.float64)
    torch.testing.assert_close(skew, -skew.T, atol=1e-10, rtol=0)
    eig = torch.linalg.eigvals(A + P.T @ P)  # general eigensolver, independent of dplr's eigh
    torch.testing.assert_close(eig.real, torch.full((N,), -0.5, dtype=torch.float64), atol=1e-8, rtol=0)


@pytest.mark.parametrize("measure", MEASURES)
def test_normal_part_has_constant_symmetric_part(measure):
    N = 16
    normal, P, _ = nplr(measure, N)
    sym = (normal + normal.T) / 2
    c = {"legs": -0.5, "legt": 0.0, "lagt": 0.0}[measure]
    torch.testing.assert_close(sym, c * torch.eye(N, dtype=torch.float64), atol=1e-10, rtol=0)
    assert P.shape[0] == (2 if measure == "legt" else 1)


@pytest.mark.parametrize("measure", MEASURES)
def test_dplr_reconstructs_A(measure):
    N = 24
    A, B = transition(measure, N)
    Lambda, P, B_eig, V = dplr(measure, N)
    assert Lambda.shape == (N,) and V.shape == (N, N) and B_eig.shape == (N,)
    torch.testing.assert_close(V.conj().T @ V, torch.eye(N, dtype=torch.complex128), atol=1e-10, rtol=0)
    rebuilt = V @ (torch.diag(Lambda) - P.T @ P.conj()) @ V.conj().T
    assert (rebuilt - A).abs().max() < 1e-4
    assert rebuilt.imag.abs().max() < 1e-4
    torch.testing.assert_close((V @ B_eig).real, B, atol=1e-8, rtol=0)
    # conjugate pairs at mirrored positions: the upper half is what conj-symmetric models keep
    torch.testing.assert_close(Lambda[N // 2:].flip(0), Lambda[: N // 2].conj(), atol=1e-8, rtol=0)
    assert (Lambda[N // 2:].imag >= 0).all()


@pytest.mark.parametrize("measure", MEASURES)
def test_shapes_and_stability(measure):
    for N in (1, 7, 32):
        A, B = transition(measure, N)
        assert A.shape == (N, N) and B.shape == (N,)
        assert (torch.linalg.eigvals(A).real <= 1e-9).all(), measure


def test_unknown_measure_is_a_config_error():
    with pytest.raises(ConfigError, match="fourier"):
        transition("fourier", 4)

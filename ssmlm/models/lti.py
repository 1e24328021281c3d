"""The linear time-invariant SSM cores, behind one interface: a mixer on (batch, L, H) with one SSM per channel
(y = K * u in parallel, the recurrence in ``step``), whatever generates its kernel:

* ``diag``: one real scalar recurrence per channel, the reference's (:class:`ssmlm.models.diag_ssm.RealDiagonalSSM`);
* ``s4d``: N/2 complex diagonal modes per channel, a Vandermonde kernel (:class:`ssmlm.models.s4d.DiagonalSSM`);
* ``s4``: a diagonal-plus-low-rank HiPPO matrix, a Cauchy kernel (:class:`ssmlm.models.s4.DPLRSSM`).

H3 hosts any of them (``model.ssm_layer``).
"""

from __future__ import annotations

from ssmlm.errors import ConfigError
from ssmlm.models.blocks import Mixer
from ssmlm.models.diag_ssm import RealDiagonalSSM
from ssmlm.models.s4 import DPLRSSM
from ssmlm.models.s4d import DiagonalSSM

LTI_CORES = {"diag": RealDiagonalSSM, "s4d": DiagonalSSM, "s4": DPLRSSM}


def make_lti_core(kind: str, d_model: int, d_state: int, **kwargs) -> Mixer:
    """The ``kind`` core for ``d_model`` channels; ``d_state`` is N (the diag core's is 1 and takes none).
    ``kwargs`` go to the core's constructor as they are (None is a value: ``ssm_lr=None`` is the global lr)."""
    if kind not in LTI_CORES:
        raise ConfigError(f"model.ssm_layer={kind!r}: use one of {', '.join(LTI_CORES)}")
    if kind == "diag":
        return RealDiagonalSSM(d_model, **kwargs)
    return LTI_CORES[kind](d_model, d_state, **kwargs)

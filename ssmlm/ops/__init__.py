"""Sequence operators: the selective scan (``from ssmlm.ops import selective_scan``, the function), the diagonal
scan and FFT convolutions. The backends live in their own modules (``ssmlm.ops.selective_scan`` et al.)."""

from ssmlm.ops.selective_scan import selective_scan

__all__ = ["selective_scan"]

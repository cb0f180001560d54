"""The soft-label modes and their integer codes, defined once.

A mode's code is its position in ``MODES``; the native ops take the code (``mode`` of
lpqld::soft_label_kl / soft_label_kl_fwd). The C++ kernels read it through
csrc/common/label_modes.h and the Triton kernel (kernels/soft_label_kl.py) builds its
constants from ``MODE_CODES``; tests/test_label_modes.py checks the C++ header and the
Triton module against this table.
"""
from __future__ import annotations

__all__ = ["MODES", "MODE_CODES", "PROB_MODES"]

MODES = ("dense", "mr", "mrs", "ms", "topk_norenorm")
MODE_CODES = {name: code for code, name in enumerate(MODES)}
# Modes whose stored values are probabilities (the others store logits).
PROB_MODES = ("ms", "topk_norenorm")

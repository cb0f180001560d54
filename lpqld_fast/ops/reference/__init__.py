"""Plain-PyTorch references (the oracles) of every op, one file per op."""
from lpqld_fast.ops.reference import classwise_moments  # noqa: F401

"""Triton kernels of lpqld_fast, installed as ``lpqld_fast.kernels``.

One module per op (``kernels/<op>.py``); each exposes plain Python functions
with the same contract as the op's native backend and launches ``@triton.jit``
kernels. They run on CUDA tensors, and on CPU tensors under
``TRITON_INTERPRET=1`` (how they are tested without a GPU). Importing this
package does not import triton; the op modules do.
"""

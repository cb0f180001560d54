"""lpqld_fast.ops: the one public entry to every kernel.

Each op validates its inputs, then dispatches by device to the native C++
(CPU), CUDA or Triton kernel, or to the plain-PyTorch reference in
lpqld_fast.ops.reference. Force a backend with ``backend=`` per call,
``force_backend(name)`` per block or LPQLD_BACKEND per process.

The native (cpp, cuda) kernels are torch.library custom ops with their autograd
in C++ and fake implementations in lpqld_fast.ops._fake, so
torch.compile(fullgraph=True) traces the public ops (tests/test_opcheck.py).
Under torch.compile pass ``validate=False``: the data checks read values back
to the host, which breaks the graph (the cpp kernels still check their index
ranges themselves).
"""
from lpqld_fast.ops._dispatch import (  # noqa: F401
    BACKENDS,
    available_backends,
    force_backend,
    native_available,
    native_has_cuda,
)
from lpqld_fast.ops.classwise_moments import (  # noqa: F401
    ClasswiseMomentsAccumulator,
    Moments,
    classwise_ema_update_,
    classwise_moments,
    classwise_moments_accumulate_,
    merge_moments_,
)
from lpqld_fast.ops.segment_bn_loss import bn_eval_act, bn_eval_segment_loss, segment_bn_loss  # noqa: E402,F401
from lpqld_fast.ops.soft_label_kl import calibrate_student_temperature, decode_teacher, soft_label_kl  # noqa: F401,E402
from lpqld_fast.ops.crop_resize_flip import batched_roll, crop_resize_flip, crop_resize_flip_gather, pixel_boxes  # noqa: F401,E402

"""Diagnostics for a GPU machine (scripts/gpu_check.sh runs it): python3 scripts/gpu_probe.py [OUT_DIR].

1. C++ exceptions: on one H200 image (torch 2.11, GCC 13.3) every error raised by our
   extension's C++ code (a TORCH_CHECK in an op's argument checks, the CPU kernels' data errors) killed the
   process with SIGSEGV, while torch's own errors were fine. Each case runs in a subprocess; the first that
   crashes is re-run under cuda-gdb (the image has no gdb) for a backtrace.
2. Host-device syncs per step: recover's pass and the fused ops under torch.cuda.set_sync_debug_mode("warn"),
   counted (each sync stalls the launch queue; the session-8 benches were bound by per-call host work).
Writes OUT_DIR/probe.txt.
"""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

OUT = Path(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OUT", "."))
LOG = open(OUT / "probe.txt", "w")


def say(*parts: object) -> None:
    print(*parts, file=LOG, flush=True)


def sh(cmd: str, timeout: int = 60) -> tuple[int, str]:
    try:
        r = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -999, "timeout"
    return r.returncode, r.stdout + r.stderr


THROWS = {
    "torch_error": "import torch; torch.ones(2).view(3)",
    "check_args_throw": "import torch, lpqld_fast._C; z = torch.randn(4, 10); v = torch.randn(4, 2); "
                        "i = torch.zeros(4, 2, dtype=torch.long); "
                        "torch.ops.lpqld.soft_label_kl_fwd(z, v, i, None, None, None, 9, 1.0, 1.0, 1.0)",
    "kernel_throw": "import torch, lpqld_fast._C; torch.set_num_threads(1); z = torch.randn(4, 10); "
                    "v = torch.randn(4, 2); i = torch.tensor([[0, 1]] * 3 + [[0, 99]]); "
                    "torch.ops.lpqld.soft_label_kl_fwd(z, v, i, None, None, None, 1, 1.0, 1.0, 1.0)",
}


def probe_exceptions() -> None:
    say("== C++ exceptions (rc 1: a Python error, as it should be; -11 / 139: SIGSEGV)")
    # A build that went through /opt/gcc/bin/g++ ("g++-real") and its _C had no libstdc++ in ldd: a
    # libstdc++ linked statically (its own __cxa_throw / unwinder beside torch's) would explain the crashes.
    for c in ("readelf -p .comment lpqld_fast/_C*.so", "ldd lpqld_fast/_C*.so | grep -E 'gomp|stdc|gcc_s'",
              "nm -D --defined-only lpqld_fast/_C*.so | grep -E '__cxa_throw|_Unwind_RaiseException' || true",
              "env | grep -E '^(CC|CXX|LDSHARED)=' || true", "file /opt/gcc/bin/g++; head -c 600 /opt/gcc/bin/g++"):
        say("$", c)
        say(sh(c)[1].strip())
    for name, code in THROWS.items():
        Path("/tmp/lpqld_throw.py").write_text(code + "\n")
        rc, out = sh(f"{sys.executable} /tmp/lpqld_throw.py")
        say(f"{name}: rc={rc} :: {out.strip().splitlines()[-1:] if out.strip() else ''}")
        if rc not in (0, 1) and name != "torch_error":
            rc, out = sh(f"timeout 120 cuda-gdb -batch -ex run -ex bt --args {sys.executable} /tmp/lpqld_throw.py",
                         130)
            frames = [ln for ln in out.splitlines() if ln.startswith("#") or "signal" in ln.lower()]
            say("\n".join(frames[:60]))
            break


def count_syncs(fn, reps: int = 3) -> int:
    import torch

    fn()  # warm-up (first-call checks, allocator)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(reps):
                fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return round(sum("synchroniz" in str(w.message) for w in got) / reps)


def probe_syncs() -> None:
    import torch

    from bench.bench_recover import CFG, SHAPE, make_teacher
    from lpqld_fast.ops import segment_bn_loss, soft_label_kl
    from lpqld_fast.recover import make_units, synthesize_units

    say("== host-device syncs per call (torch.cuda.set_sync_debug_mode)")
    teacher, targets = make_teacher("convnet-bn", 10, device="cuda")
    units = make_units(10, 10, classwise_batching=True)
    mean, std = torch.tensor([0.286]), torch.tensor([0.353])
    for iters in (1, 5):
        cfg = {**CFG, "iterations": iters}
        n = count_syncs(lambda: synthesize_units(teacher, units, targets, cfg, SHAPE, mean, std, 0, "cuda",
                                                 progress=False), reps=1)
        say(f"recover pass, ConvNet, 10 classes x IPC 10, {iters} iteration(s): {n} syncs")
    x = torch.randn(100, 128, 28, 28, device="cuda", requires_grad=True)
    seg = torch.arange(10, device="cuda").repeat_interleave(10)
    tm, tv = torch.zeros(10, 128, device="cuda"), torch.ones(10, 128, device="cuda")
    for validate in (True, False):
        n = count_syncs(lambda: segment_bn_loss(x, seg, tm, tv, validate=validate).sum().backward())
        say(f"segment_bn_loss fwd+bwd validate={validate}: {n} syncs")
    z = torch.randn(128, 1000, device="cuda", requires_grad=True)
    top = torch.randn(128, 1000, device="cuda").topk(100, dim=1)
    for validate in (True, False):
        n = count_syncs(lambda: soft_label_kl(z, top.values.half(), top.indices, mode="mr", T=4.0,
                                              validate=validate).backward())
        say(f"soft_label_kl fwd+bwd validate={validate}: {n} syncs")


if __name__ == "__main__":
    for step in (probe_exceptions, probe_syncs):
        try:
            step()
        except Exception as e:  # noqa: BLE001 - one failed probe must not hide the other
            say(f"{step.__name__} failed: {type(e).__name__}: {e}")

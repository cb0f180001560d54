"""Build lpqld_fast and its native extension lpqld_fast._C.

C++ CPU kernels are always built. CUDA kernels are built when torch is a CUDA
build and CUDA_HOME holds nvcc and include/cuda_runtime.h; WITH_CUDA=0/1
overrides the detection. Portable flags by default; LPQLD_NATIVE=1 adds
-march=native. LPQLD_SANITIZE=1 builds with ASan/UBSan (CPU only).
"""
from __future__ import annotations

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _env_flag(name: str) -> bool | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    return value.lower() in ("1", "true", "yes", "on")


def _cuda_available_for_build() -> bool:
    forced = _env_flag("WITH_CUDA")
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    detected = (
        torch.version.cuda is not None
        and CUDA_HOME is not None
        and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
        and os.path.exists(os.path.join(CUDA_HOME, "include", "cuda_runtime.h"))
    )
    if forced is None:
        return detected
    if forced and not detected:
        sys.exit("WITH_CUDA=1 but no CUDA build of torch or no usable CUDA_HOME (nvcc, include/cuda_runtime.h)")
    return forced


def _extensions():
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-DAT_PARALLEL_OPENMP=1", "-g0"]
    nvcc = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
    # The C++ runtime always as shared libraries: a compiler that links libstdc++ / libgcc statically (one GPU
    # image's /opt/gcc g++ did) gives _C its own exception runtime beside torch's, and every C++ error of the
    # extension then killed the process (SIGSEGV there; SIGABRT in a -static-libstdc++ -static-libgcc build
    # here) instead of raising. Named explicitly, the shared libraries win over the static archives.
    link = ["-fopenmp", "-s", "-Wl,--no-as-needed", "-lstdc++", "-lgcc_s"]
    if _env_flag("LPQLD_NATIVE"):
        cxx.append("-march=native")
    if _env_flag("LPQLD_SANITIZE"):
        san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-O1"]
        cxx = [f for f in cxx if f not in ("-O3", "-g0")] + san
        link = [f for f in link if f != "-s"] + san
    define_macros = []
    include_dirs = [os.path.join(ROOT, "csrc")]
    if _cuda_available_for_build():
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        define_macros.append(("WITH_CUDA", None))
        # The local toolkit may lack headers that the CUDA build of torch pulls
        # in; the nvidia wheels that come with torch carry them.
        try:
            import nvidia  # type: ignore

            for base in nvidia.__path__:
                for inc in glob.glob(os.path.join(base, "*", "include")):
                    include_dirs.append(inc)
        except ImportError:
            pass
        return [
            CUDAExtension(
                "lpqld_fast._C",
                sources,
                include_dirs=include_dirs,
                define_macros=define_macros,
                extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                extra_link_args=link,
            )
        ]
    return [
        CppExtension(
            "lpqld_fast._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx},
            extra_link_args=link,
        )
    ]


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=True)


setup(
    name="lpqld_fast",
    version="0.1.0",
    description="Large-scale dataset distillation with soft-label pruning and quantization (LPLD/LPQLD)",
    python_requires=">=3.10",
    packages=find_packages(include=["lpqld_fast", "lpqld_fast.*"]) + ["lpqld_fast.kernels"],
    package_dir={"lpqld_fast.kernels": "kernels"},
    # LPQLD_PACKAGE_ONLY=1: register the package and the `lpqld` command only (make build installs it editable
    # after scripts/build_ext.sh has put lpqld_fast/_C in place, so the extension is not compiled twice).
    ext_modules=[] if os.environ.get("LPQLD_PACKAGE_ONLY") == "1" else _extensions(),
    cmdclass={"build_ext": _build_ext()},
    install_requires=["torch>=2.4", "numpy", "tqdm", "matplotlib"],
    entry_points={"console_scripts": ["lpqld=lpqld_fast.cli:main"]},
    zip_safe=False,
)

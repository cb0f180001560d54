"""lpqld_fast: large-scale dataset distillation with soft-label pruning and quantization."""
__version__ = "0.1.0"


def _enable_huge_page_allocations() -> None:
    """Ask torch's CPU allocator for 2 MiB-aligned, transparent-huge-page-backed blocks (>= 2 MiB).

    A fresh 77 MB replay batch (128 x 3 x 224 x 224 fp32) otherwise costs ~19k page faults on first touch
    (an ad-hoc timing, not a benchmark: docs/PERFORMANCE.md). torch reads THP_MEM_ALLOC_ENABLE at its first
    large allocation; a value the user set (e.g. 0) is kept.
    """
    import os

    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


_enable_huge_page_allocations()


def _alias_source_kernels() -> None:
    """Make ``lpqld_fast.kernels`` resolve to the top-level ``kernels/`` of a source checkout.

    An install gets the package from setup.py's ``package_dir``; running from
    the tree (in-place build) has no ``lpqld_fast/kernels``, so register
    ``kernels/__init__.py`` (a docstring, no triton import) under that name and
    let its submodules load from ``kernels/``.
    """
    import importlib.util
    import os
    import sys

    name = __name__ + ".kernels"
    here = os.path.dirname(os.path.abspath(__file__))
    if name in sys.modules or os.path.isdir(os.path.join(here, "kernels")):
        return
    src = os.path.join(os.path.dirname(here), "kernels")
    init = os.path.join(src, "__init__.py")
    if not os.path.isfile(init):
        return
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[src])
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


_alias_source_kernels()

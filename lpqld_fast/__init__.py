"""lpqld_fast: large-scale dataset distillation with soft-label pruning and quantization."""
__version__ = "0.1.0"

# Allocator settings (huge pages, glibc thresholds) are process-wide, so the entry points apply them
# (lpqld_fast.runtime.tune_cpu_allocator), never this import.


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

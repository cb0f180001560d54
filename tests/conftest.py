"""Shared pytest set-up.

Hypothesis profiles (tests/test_properties.py): "ci" is the default and keeps
the property suite within the `make test` budget on a loaded 2-core CPU;
"thorough" runs many more examples. Select with
LPQLD_HYPOTHESIS_PROFILE=thorough (or pytest's --hypothesis-profile=thorough).
"""
from __future__ import annotations

import os

import pytest

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # hypothesis is a test dependency; without it only test_properties.py is skipped
    settings = None

if settings is not None:
    # deadline=None: timings on a shared CPU vary by 10x; too_slow: the interpreted Triton backend is slow.
    _common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
                   print_blob=True)
    settings.register_profile("ci", max_examples=25, derandomize=True, **_common)
    settings.register_profile("thorough", max_examples=300, **_common)
    settings.load_profile(os.environ.get("LPQLD_HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="module")
def one_thread_module():
    """One torch thread for a module of tiny ops: on a shared CPU they are much faster without OpenMP's
    spinning threads (modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread_module")``)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture()
def synthetic_preset(monkeypatch):
    """Point the fashion-mnist preset at the small synthetic dataset (no 60k-image teacher training in tests)."""
    import lpqld_fast.presets as presets

    p = presets.get_preset("fashion-mnist")
    p["dataset"] = "synthetic"
    monkeypatch.setitem(presets.PRESETS, "fashion-mnist", p)
    return p


@pytest.fixture(scope="module")
def synthetic_run_module():
    """For a module fixture that runs whole stages once: the fashion-mnist preset pointed at the synthetic
    dataset, and one torch thread, for the module's lifetime."""
    import torch

    import lpqld_fast.presets as presets

    mp = pytest.MonkeyPatch()
    tiny = presets.get_preset("fashion-mnist")
    tiny["dataset"] = "synthetic"
    mp.setitem(presets.PRESETS, "fashion-mnist", tiny)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        mp.undo()

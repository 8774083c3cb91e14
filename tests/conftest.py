"""Shared test setup for the fp4lib unit suite.

* Seeds are set once, here (``torch.manual_seed(0)`` at import and again per test
  through an autouse fixture, so a test's random draws do not depend on which
  tests ran before it).
* One ``hypothesis`` profile, "fp4lib": no deadline (the machine is shared), a
  fixed number of examples and ``derandomize=True`` so CI sees the same examples
  every run.
* ``bnb`` fixture: ``bitsandbytes.functional`` imported through
  ``fp4lib.engines.bnb.import_bitsandbytes`` (which silences its start-up log).
* ``device`` fixture (and the ``DEVICES`` params behind it): a test that takes
  ``device`` runs for "cpu" and "cuda"; the CUDA case is skipped, with a reason, on
  machines without a GPU.
"""

from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import HealthCheck, settings

torch.manual_seed(0)

settings.register_profile(
    "fp4lib",
    deadline=None,
    max_examples=100,
    derandomize=True,
    database=None,  # no example database: examples are derandomized, nothing to replay
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("fp4lib")

CUDA_AVAILABLE = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not CUDA_AVAILABLE, reason="needs a CUDA GPU (torch.cuda.is_available() is False)")

#: Device params: the CUDA one carries the ``cuda`` marker (``-m "not cuda"`` drops it)
#: and is skipped without a GPU. Tests take the ``device`` fixture below.
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=[requires_cuda, pytest.mark.cuda])]


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: the test needs a CUDA GPU (skipped without one)")


@pytest.fixture(params=DEVICES)
def device(request):
    """"cpu", then "cuda" (skipped without a GPU)."""
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same global RNG state."""
    torch.manual_seed(0)
    yield


@pytest.fixture
def bnb():
    """``bitsandbytes.functional`` with its log quieted, and TorchDynamo off for the test.

    bitsandbytes 0.50.2 wraps its pure-torch CPU fallbacks (used for odd sizes) in
    ``torch.compile``; each new shape would recompile for 1-2 s on this 2-core
    machine. The fallbacks compute the same thing eagerly, so the comparisons are
    unchanged and the suite stays fast. Dynamo is disabled only while the test runs.
    """
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from fp4lib.engines.bnb import import_bitsandbytes

    F = import_bitsandbytes()
    import torch._dynamo

    with torch._dynamo.config.patch(disable=True):
        yield F


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors run faster on one thread, and the CI machine's cores are shared.

    Training-side test modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

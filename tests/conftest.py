"""Every test starts from the same random state, whatever ran before it.

The fused CPU kernels compile in the test process at their first call
(``LRNNX_NUMBA_COMPILE=wait``), not in a background process with the calls running on the
torch backend meanwhile: a test that asks for the default backend then gets the fused one, and
the suite starts no compile processes of its own (tests/test_cold_start.py sets the mode it
tests explicitly).  Subprocesses the tests start inherit it.
"""

import os

import pytest
import torch

os.environ.setdefault("LRNNX_NUMBA_COMPILE", "wait")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield

"""Every test starts from the same random state, whatever ran before it.

The fused CPU kernels compile in the test process at their first call
(``LRNNX_NUMBA_COMPILE=wait``), not in a background process with the calls running on the
torch backend meanwhile: a test that asks for the default backend then gets the fused one, and
the suite starts no compile processes of its own (tests/test_cold_start.py sets the mode it
tests explicitly).  Subprocesses the tests start inherit it.
"""

import os

# (before torch starts its OpenMP runtime) torch's threads sleep when idle instead of spinning:
# with the suite's pytest-xdist workers (make test) two processes share the cores, and a worker's
# spinning threads took the cores the other worker's threads waited for (the suite ran 1.5x
# longer on 2 cores)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("LRNNX_NUMBA_COMPILE", "wait")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _process_state():
    """A test leaves torch's thread count and default dtype as it found them: a leaked count
    changes what later tests in the process exercise (``lrnnx train`` times steps to choose the
    count only when torch has more than one thread; an interrupt test once passed only after a
    test that left one).  A leak fails the test that made it, and is undone.  (Set up before
    the test's own fixtures, so checked after monkeypatch has undone its patches.)"""
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    yield
    leaked = []
    if torch.get_num_threads() != threads:
        leaked.append(f"torch's thread count {threads} -> {torch.get_num_threads()}")
        torch.set_num_threads(threads)
    if torch.get_default_dtype() != dtype:
        leaked.append(f"torch's default dtype {dtype} -> {torch.get_default_dtype()}")
        torch.set_default_dtype(dtype)
    if leaked:
        pytest.fail("the test left " + "; ".join(leaked), pytrace=False)

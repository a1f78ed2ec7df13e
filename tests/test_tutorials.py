"""The tutorials in docs/tutorials run as written.

Each tutorial's Python blocks run top to bottom in one namespace (bash blocks are not run), in a
fresh working directory.  The namespace is a module registered in ``sys.modules``, as a user's
script is ``__main__``: classes a tutorial defines are then importable by their
``"module:Class"`` path, which the architectures store in their configs.
"""

import re
import sys
import time
import types
from pathlib import Path

import pytest
import torch

TUTORIAL_DIR = Path(__file__).resolve().parents[1] / "docs" / "tutorials"
TUTORIALS = sorted(TUTORIAL_DIR.glob("*.md"))
EXPECTED = [
    "01_models_and_inference.md",
    "02_event_data.md",
    "03_language_model_and_generation.md",
    "04_ops_and_backends.md",
    "05_hugging_face.md",
    "06_packed_and_bidirectional.md",
]


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def test_tutorials_present_and_indexed():
    assert [p.name for p in TUTORIALS] == EXPECTED
    for path in TUTORIALS:
        assert len(python_blocks(path)) >= 4, path.name
    index = (TUTORIAL_DIR.parent / "README.md").read_text()
    for name in EXPECTED:
        assert f"tutorials/{name}" in index, name


@pytest.fixture
def one_thread():
    # the tutorials' models are tiny: one thread is faster, above all on a busy machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


#: the tutorials taking seconds (a trained LM, every backend, a transformers round trip) run in
#: make test-slow
LONG_TUTORIALS = {
    "03_language_model_and_generation.md",
    "04_ops_and_backends.md",
    "05_hugging_face.md",
}


@pytest.mark.parametrize(
    "path",
    [pytest.param(p, marks=pytest.mark.slow) if p.name in LONG_TUTORIALS else p for p in TUTORIALS],
    ids=lambda p: p.stem,
)
def test_tutorial_runs(path, tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)  # tutorials save checkpoints into the working directory
    # the tutorials run on any backend; the torch one spares numba's first-use compilation
    # (tutorial 4 still asks for the fused backends by name)
    monkeypatch.setenv("LRNNX_BACKEND", "torch")
    module = types.ModuleType(f"lrnnx_tutorial_{path.stem}")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    start = time.perf_counter()
    for i, block in enumerate(python_blocks(path)):
        try:
            exec(compile(block, f"{path.name} python block {i}", "exec"), module.__dict__)
        except Exception as e:  # pragma: no cover - the message names the block
            pytest.fail(f"{path.name} python block {i} failed: {type(e).__name__}: {e}")
    print(f"{path.name}: {time.perf_counter() - start:.1f}s")

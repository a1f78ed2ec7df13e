"""Messages a new user meets: the numba fallback and first-compile notices, misspelled mixer
names in ``mixer_kwargs``, and README code blocks that must run on their own."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import lrnnx.ops.linear_scan.cpu  # noqa: F401 - imported with numba as it is, before any patching
from _tol import assert_close_rel
from lrnnx.architectures._common import split_mixer_kwargs
from lrnnx.ops import _dispatch, _numba, linear_scan

README = Path(__file__).resolve().parents[1] / "README.md"

# ----------------------------------------------------------------------------- numba


def test_missing_numba_warning_names_the_fallback_and_the_fix(monkeypatch):
    monkeypatch.delenv("LRNNX_BACKEND", raising=False)
    monkeypatch.setattr(_numba, "HAVE_NUMBA", False)
    monkeypatch.setattr(_dispatch, "_LOADED", {})
    monkeypatch.setattr(_dispatch, "_WARNED", set())
    a, b = torch.rand(1, 5, 3), torch.randn(1, 5, 3)
    with pytest.warns(RuntimeWarning) as record:
        h = linear_scan(a, b)
    messages = [str(w.message) for w in record if "linear_scan" in str(w.message)]
    assert len(messages) == 1
    msg = messages[0]
    assert "'cpu' of linear_scan is unavailable" in msg and "numba is not installed" in msg
    assert "falling back to 'torch'" in msg and 'pip install "lrnnx[cpu]"' in msg
    torch.testing.assert_close(h, linear_scan(a, b, backend="torch"))


def test_backend_variable_sets_a_whole_model(monkeypatch):
    """LRNNX_BACKEND names a backend some ops lack (no Triton causal convolution or Cauchy
    product): those ops take lrnnx's choice with one warning each, so Mamba and S4 run (they
    raised a ValueError about causal_conv1d / cauchy).  Case and spaces are ignored, as in the
    other variables; a name no op has is refused, naming the variable."""
    from lrnnx.models.lti import S4
    from lrnnx.models.ltv import Mamba

    monkeypatch.setattr(_dispatch, "_WARNED", set())
    x = torch.randn(2, 16, 8)
    mamba, s4 = Mamba(8, d_state=4), S4(8, d_state=4, transposed=False)
    expect = (mamba(x), s4(x)[0])
    monkeypatch.setenv("LRNNX_BACKEND", "triton")
    with pytest.warns(RuntimeWarning) as record:
        got = (mamba(x), s4(x)[0])
    messages = " ".join(str(w.message) for w in record)
    assert "causal_conv1d has no 'triton' backend" in messages
    assert "cauchy has no 'triton' backend" in messages
    for a, b in zip(got, expect, strict=True):
        assert_close_rel(a, b, length=16)
    monkeypatch.setenv("LRNNX_BACKEND", " Torch ")
    assert_close_rel(mamba(x), expect[0], length=16)
    monkeypatch.setenv("LRNNX_BACKEND", "cuda")
    with pytest.raises(ValueError, match="^LRNNX_BACKEND: expected one of"):
        mamba(x)


# the first-compile notice (only when numba compiles, once per process, logger or stderr) is
# tested in test_cold_start.py with real numba compilations


# ----------------------------------------------------------------------------- mixer_kwargs


def test_misspelled_mixer_name_in_mixer_kwargs_suggests_the_name():
    with pytest.raises(ValueError, match=r"'mamab' is not a mixer name; did you mean 'mamba'\?"):
        split_mixer_kwargs({"mamab": {"expand": 2}}, ["mamba"])
    with pytest.raises(ValueError, match=r"did you mean 's5'\?"):
        split_mixer_kwargs({"mamba": {"expand": 2}, "s5x": {}}, ["mamba", "s5"])
    # real names and flat arguments are unchanged
    assert split_mixer_kwargs({"Mamba": {"expand": 2}}, ["mamba"]) == {"mamba": {"expand": 2}}
    assert split_mixer_kwargs({"expand": 2}, ["mamba", "attn"]) == {
        "mamba": {"expand": 2},
        "attn": {},
    }
    # a mixer's own dict-valued argument that looks like a name (S4's lr, like "lru") is no typo
    lr = {"dt": 1e-3, "A": 1e-3}
    assert split_mixer_kwargs({"lr": lr}, ["s4"]) == {"s4": {"lr": lr}}


# ----------------------------------------------------------------------------- README


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_each_readme_python_block_runs_on_its_own(index, tmp_path, monkeypatch):
    """A reader copies one block at a time: each must carry its own imports."""
    monkeypatch.chdir(tmp_path)
    block = _python_blocks()[index]
    exec(compile(block, f"README.md python block {index}", "exec"), {})


def test_readme_says_how_to_run_the_installed_command_and_what_make_demo_costs():
    text = README.read_text()
    setup = text.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    assert "source .venv/bin/activate" in setup and ".venv/bin/lrnnx" in setup
    assert "--time-budget" in setup and "DEMO_ARGS" in setup and "minutes" in setup


def test_warnings_point_at_the_callers_line():
    """A warning raised deep inside a model's forward (under nn.Module's call machinery and
    lrnnx's helpers) is reported at the user's line, as warnings' stacklevel intends."""
    import warnings

    from lrnnx.models.lti import S4D, S5

    x = torch.randn(1, 5, 4)
    ts = torch.ones(1, 5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        S4D(d_model=4, d_state=4, transposed=False)(x, integration_timesteps=ts)
        S5(4, 4, "zoh")(x, integration_timesteps=ts)
    assert len(caught) == 2
    assert all(w.filename == __file__ for w in caught), [w.filename for w in caught]


def test_loading_another_architecture_or_a_run_folder_names_the_way(tmp_path):
    """from_pretrained on the wrong kind of directory says which class loads it, and on an
    `lrnnx train` --out folder points at its best/ and last/ directories."""
    import warnings

    from lrnnx.architectures import Classifier, LRNNLMHeadModel, UNet

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        saved = {
            LRNNLMHeadModel: LRNNLMHeadModel(
                d_model=8, d_state=4, n_layer=1, vocab_size=10, mixer_types="s5"
            ),
            Classifier: Classifier(d_input=2, n_classes=3, d_model=8, d_state=8, n_layers=1),
            UNet: UNet(d_input=2, d_output=2, d_model=8, d_state=8, depth=1),
        }
    for cls, model in saved.items():
        model.save_pretrained(tmp_path / cls.__name__)
    for cls in saved:
        for other in saved:
            if other is not cls:
                with pytest.raises(ValueError, match=f"{other.__name__}.from_pretrained"):
                    cls.from_pretrained(tmp_path / other.__name__)
    saved[LRNNLMHeadModel].save_pretrained(tmp_path / "run" / "best")
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "run" / "best"))):
        LRNNLMHeadModel.from_pretrained(tmp_path / "run")
    with pytest.raises(ValueError, match=r"allocate_inference_cache\(batch_size\)"):
        saved[LRNNLMHeadModel].step(torch.tensor([1, 2]), {})


def test_flags_and_choices_are_named_by_their_argument():
    """String flags ("False" from a config file) are refused, not read as True; Centaurus's
    norm/activation choices are named by the argument that took them."""
    from lrnnx.models.lti import Centaurus
    from lrnnx.models.ltv import RGLRU, Mamba

    for cls in (Mamba, RGLRU):
        for flag in ("conv_bias", "bias", "use_fast_path"):
            with pytest.raises(TypeError, match=f"{flag}: expected a bool"):
                cls(d_model=4, **{flag: "False"})
    for arg, value in (("out_norm", "group"), ("out_activation", "softmax")):
        with pytest.raises(ValueError, match=f"^{arg}: expected None or one of"):
            Centaurus(d_model=4, d_state=4, sub_state_dim=2, **{arg: value})
    for arg, value in (("mix_norm", "group"), ("mix_activation", "softmax")):
        with pytest.raises(ValueError, match=f"^{arg}: expected None or one of"):
            Centaurus(d_model=4, d_state=4, sub_state_dim=2, mode="dws", **{arg: value})

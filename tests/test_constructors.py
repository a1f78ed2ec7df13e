"""Constructor validation (one shared validator), compatibility with the original lrnnx's
public signatures, and the conventions that used to trap users (S4D disc / discretization,
S4D(64, 16), isinstance(Centaurus(...), Centaurus), S4's default_state + step)."""

from __future__ import annotations

import copy
import inspect
import pickle
import warnings

import numpy as np
import pytest
import torch

from lrnnx.architectures._common import positive_int
from lrnnx.core.checks import (
    ArgumentTypeError,
    check_dt_range,
    check_positive_float,
    check_positive_int,
    merge_alias,
)
from lrnnx.models.lti import (
    LRU,
    S4,
    S4D,
    S5,
    Centaurus,
    CentaurusDWS,
    CentaurusFull,
    CentaurusNeck,
    CentaurusPWNeck,
)
from lrnnx.models.lti._s4_block import ORIGINAL_INIT_OPTIONS
from lrnnx.models.ltv import RGLRU, S7, Mamba
from lrnnx.models.ltv import S5 as EventS5
from lrnnx.models.registry import build_mixer

H, N = 8, 4

#: name -> (class, the keyword arguments of a small valid model)
MODELS = {
    "s4": (S4, dict(d_model=H, d_state=N, transposed=False, verbose=False)),
    "s4d": (S4D, dict(d_model=H, d_state=N, transposed=False, verbose=False)),
    "s5": (S5, dict(d_model=H, d_state=N, discretization="zoh")),
    "lru": (LRU, dict(d_model=H, d_state=N)),
    "centaurus-neck": (Centaurus, dict(d_model=H, d_state=N, sub_state_dim=2, mode="neck")),
    "centaurus-pw": (Centaurus, dict(d_model=H, d_state=N, sub_state_dim=2, mode="pointwise")),
    "centaurus-dws": (Centaurus, dict(d_model=H, d_state=H, sub_state_dim=2, mode="dws")),
    "centaurus-full": (Centaurus, dict(d_model=H, d_state=N, sub_state_dim=2, mode="full")),
    "mamba": (Mamba, dict(d_model=H, d_state=N)),
    "event-s5": (EventS5, dict(d_model=H, d_state=N)),
    "s7": (S7, dict(d_model=H, d_state=N)),
    "rglru": (RGLRU, dict(d_model=H)),
}

#: integer size arguments checked for every model, besides d_model
SIZE_ARGS = {
    "s4": ["d_state", "channels", "rank", "n_ssm", "l_max", "gate"],
    "s4d": ["d_state", "channels", "rank", "l_max"],
    "s5": ["d_state"],
    "lru": ["d_state"],
    "centaurus-neck": ["d_state", "sub_state_dim"],
    "centaurus-pw": ["d_state", "sub_state_dim"],
    "centaurus-dws": ["d_state", "sub_state_dim"],
    "centaurus-full": ["d_state", "sub_state_dim"],
    "mamba": ["d_state", "d_conv", "dt_rank"],
    "event-s5": ["d_state"],
    "s7": ["d_state", "J", "dt_rank"],
    "rglru": ["d_conv", "lru_width", "num_heads", "d_state"],
}
#: positive real arguments, for which 16.5 is a valid value
FLOAT_ARGS = {
    "s4": ["dt_min", "dt_max"],
    "s4d": ["dt_min", "dt_max"],
    "s5": ["dt_min", "dt_max"],
    "lru": ["max_phase"],
    "mamba": ["expand", "dt_min"],
    "event-s5": ["dt_min", "step_rescale"],
    "s7": ["dt_min", "step_rescale", "reparam_a"],
    "rglru": ["expand", "c"],
}
VALUE_ERRORS = [0, -1]
TYPE_ERRORS = [16.5, 16.0, True, "16", None]


def build(name, **overrides):
    cls, kwargs = MODELS[name]
    return cls(**{**kwargs, **overrides})


def _int_cases():
    for name in MODELS:
        for arg in ["d_model"] + SIZE_ARGS[name]:
            for value in VALUE_ERRORS + TYPE_ERRORS:
                if value is None and arg in ("n_ssm", "l_max", "gate", "d_state", "lru_width"):
                    continue  # None is valid for these (and RG-LRU's d_state)
                yield pytest.param(name, arg, value, id=f"{name}-{arg}-{value!r}")


def _float_cases():
    for name, args in FLOAT_ARGS.items():
        for arg in args:
            for value in [0, -1.0, float("nan"), float("inf"), True, "0.1", None]:
                yield pytest.param(name, arg, value, id=f"{name}-{arg}-{value!r}")


# ---------------------------------------------------------------------------------------------
# Task A: one shared validator


@pytest.mark.parametrize("name,arg,value", list(_int_cases()))
def test_bad_size_argument(name, arg, value):
    expected = ValueError if value in VALUE_ERRORS and not isinstance(value, bool) else TypeError
    with pytest.raises(expected) as info:
        build(name, **{arg: value})
    msg = str(info.value)
    assert msg.startswith(f"{arg}: expected"), msg
    assert repr(value) in msg, msg
    if expected is ValueError:
        assert not isinstance(info.value, TypeError)


@pytest.mark.parametrize("name,arg,value", list(_float_cases()))
def test_bad_float_argument(name, arg, value):
    with pytest.raises(ValueError) as info:  # ArgumentTypeError is a ValueError too
        build(name, **{arg: value})
    assert arg in str(info.value)
    wrong_type = isinstance(value, (bool, str)) or value is None
    assert isinstance(info.value, TypeError) == wrong_type


@pytest.mark.parametrize("name", [n for n in MODELS if "dt_min" in FLOAT_ARGS.get(n, [])])
def test_dt_range(name):
    with pytest.raises(ValueError, match="dt_min, dt_max: expected 0 < dt_min <= dt_max"):
        build(name, dt_min=0.5, dt_max=0.1)
    with pytest.raises(ValueError, match="dt_min"):
        build(name, dt_min=0)


@pytest.mark.parametrize("name", list(MODELS))
def test_numpy_ints_are_accepted(name):
    cls, kwargs = MODELS[name]
    kw = {k: np.int64(v) if type(v) is int else v for k, v in kwargs.items()}
    m = cls(**kw)
    assert type(m.d_model) is int and m.d_model == H
    x = torch.randn(2, 5, H)
    y = m(x)
    y = y[0] if isinstance(y, tuple) else y
    assert y.shape[:2] == (2, 5)


def test_model_specific_values():
    for kw in (dict(d_conv=0), dict(expand=0), dict(dt_rank=0), dict(expand=0.01)):
        with pytest.raises(ValueError, match=next(iter(kw))):
            Mamba(H, **kw)
    assert Mamba(H, expand=1.5).d_inner == 12
    with pytest.raises(ValueError, match="J"):
        S7(H, N, J=3)
    with pytest.raises(ValueError, match="expand"):
        RGLRU(H, expand=0.01)
    with pytest.raises(ValueError, match="drop_kernel"):
        S4D(H, d_state=N, drop_kernel=1.0)
    with pytest.raises(ValueError, match="bottleneck"):
        S4(H, bottleneck=0)


def test_shared_validators():
    assert check_positive_int("n", np.int32(3)) == 3 and type(check_positive_int("n", 3)) is int
    with pytest.raises(TypeError, match=r"n: expected a positive int, got 3\.0 \(float\)"):
        check_positive_int("n", 3.0)
    with pytest.raises(TypeError, match=r"got True \(bool\)"):
        check_positive_int("n", True)
    with pytest.raises(ValueError, match="n: expected an int >= 2, got 1"):
        check_positive_int("n", 1, minimum=2)
    assert issubclass(ArgumentTypeError, TypeError) and issubclass(ArgumentTypeError, ValueError)
    assert check_positive_float("f", 0, allow_zero=True) == 0.0
    assert check_positive_float("f", np.float32(0.5)) == 0.5
    assert check_dt_range(0.001, 0.1) == (0.001, 0.1)
    assert merge_alias("a", None, "b", None, default=1) == 1
    assert merge_alias("a", 2, "b", None) == 2 and merge_alias("a", None, "b", 3) == 3
    with pytest.raises(ValueError, match="a, b: two names of the same argument"):
        merge_alias("a", 2, "b", 3)
    # the architectures' helper delegates to the shared validator
    assert positive_int("d_model", np.int64(4)) == 4
    with pytest.raises(TypeError, match="d_model"):
        positive_int("d_model", 4.0)
    with pytest.raises(ValueError, match="d_model"):
        positive_int("d_model", 0)


# ---------------------------------------------------------------------------------------------
# Task B: the original lrnnx's public signatures
#
# Parameter names of the original library's public methods (SforAiDl/lrnnx), in order.  Names
# it accepts only through **kwargs are listed under "extra".

_S4_INIT = (
    "d_model bottleneck gate final_act postact dropout tie_dropout transposed l_max channels "
    "d_state dt_min dt_max dt_tie dt_transform dt_fast rank n_ssm init deterministic "
    "real_transform imag_transform is_real lr wd verbose"
).split()
_S4_EXTRA = ["kernel", "swap_channels", "drop_kernel", *ORIGINAL_INIT_OPTIONS]
_LTI_ALLOC = ["batch_size", "max_seqlen", "dtype"]
_LTV_FWD = ["hidden_states", "integration_timesteps", "lengths", "inference_cache"]
ORIGINAL = {
    S4: {
        "__init__": (_S4_INIT, _S4_EXTRA),
        "forward": (["x", "lengths"], ["state", "rate"]),
        "step": (["x", "inference_cache"], []),
        "allocate_inference_cache": (_LTI_ALLOC, ["device"]),
        "default_state": ([], ["device"]),
    },
    S4D: {
        "__init__": (_S4_INIT + ["disc"], _S4_EXTRA),
        "forward": (["x", "lengths"], ["state", "rate"]),
        "step": (["x", "inference_cache"], []),
        "allocate_inference_cache": (_LTI_ALLOC, ["device"]),
        "default_state": ([], ["device"]),
    },
    S5: {
        "__init__": (["d_model", "d_state", "discretization", "conj_sym"], []),
        "forward": (["x", "integration_timesteps", "lengths"], []),
        "step": (["x", "inference_cache"], []),
        "allocate_inference_cache": (_LTI_ALLOC, ["device"]),
    },
    LRU: {
        "__init__": (["d_model", "d_state", "r_min", "r_max", "max_phase"], []),
        "forward": (["x", "integration_timesteps", "lengths"], []),
        "step": (["x", "inference_cache"], []),
        "allocate_inference_cache": (_LTI_ALLOC, ["device"]),
    },
    Centaurus: {
        "__new__": (["d_model", "d_state", "sub_state_dim", "discretization", "mode"], []),
        "forward": (["x", "integration_timesteps", "lengths"], []),
        "step": (["x", "inference_cache"], []),
        "allocate_inference_cache": (["batch_size", "max_seqlen"], ["device"]),
    },
    Mamba: {
        "__init__": (
            (
                "d_model d_state d_conv expand dt_rank dt_min dt_max dt_init dt_scale "
                "dt_init_floor conv_bias bias use_fast_path layer_idx device dtype discretization"
            ).split(),
            [],
        ),
        "forward": (_LTV_FWD, []),
        "step": (["x", "inference_cache", "integration_timesteps"], []),
        "allocate_inference_cache": (_LTI_ALLOC, ["device"]),
    },
    RGLRU: {
        "__init__": (
            (
                "d_model d_conv expand c a_init_range conv_bias bias use_fast_path layer_idx "
                "device dtype"
            ).split(),
            [],
        ),
        "forward": (_LTV_FWD, []),
        "step": (["hidden_states", "inference_cache"], []),
        "allocate_inference_cache": (_LTI_ALLOC, ["device"]),
    },
    EventS5: {
        "__init__": (
            (
                "d_model d_state discretization conj_sym dt_min dt_max step_rescale "
                "use_fast_path device dtype"
            ).split(),
            [],
        ),
        "forward": (["x", "integration_timesteps", "lengths", "inference_cache"], []),
        "step": (["x", "inference_cache", "integration_timesteps"], []),
        "allocate_inference_cache": (_LTI_ALLOC, ["device"]),
    },
    S7: {
        # positional order differs after J (see test_s7_positional_use_fast_path)
        "__init__": (
            ["d_model", "d_state", "J"],
            ["use_fast_path", "layer_idx", "device", "dtype"],
        ),
        "forward": (_LTV_FWD, []),
        "step": (["hidden_states", "inference_cache"], []),
        "allocate_inference_cache": (_LTI_ALLOC, ["device"]),
    },
}


@pytest.mark.parametrize(
    "cls,method",
    [pytest.param(c, m, id=f"{c.__name__}.{m}") for c, ms in ORIGINAL.items() for m in ms],
)
def test_original_signature(cls, method):
    positional, extra = ORIGINAL[cls][method]
    params = inspect.signature(getattr(cls, method)).parameters
    ours = [
        n
        for n, p in params.items()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and n not in ("self", "cls")
    ]
    for i, name in enumerate(positional):  # same positional order
        assert i < len(ours) and (ours[i] == name or (name, ours[i]) == ("hidden_states", "x")), (
            method,
            i,
            name,
            ours,
        )
    for name in positional + extra:  # every name is accepted by keyword
        assert name in params, (method, name)


@pytest.mark.parametrize("name", list(MODELS))
def test_allocate_inference_cache_device(name):
    m = build(name).eval()
    cache = m.allocate_inference_cache(2, device="cpu")
    assert cache["lrnn_state"].device.type == "cpu"
    cache = m.allocate_inference_cache(2, device=torch.device("cpu"))
    y, _ = m.step(torch.randn(2, H), cache)
    assert y.shape[0] == 2


def test_s4_kernel_names():
    assert S4D(H, d_state=N, kernel="s4d", verbose=False).disc == "zoh"
    S4(H, d_state=N, kernel="s4", verbose=False)
    with pytest.raises(
        ValueError, match="kernel: S4D always computes the 's4d' kernel.*use the S4"
    ):
        S4D(H, d_state=N, kernel="s4")
    with pytest.raises(ValueError, match="use the S4D class"):
        S4(H, d_state=N, kernel="s4d")
    with pytest.raises(ValueError, match="kernel"):
        S4(H, d_state=N, kernel="fftconv")


@pytest.mark.parametrize("cls", [S4, S4D])
def test_s4_swap_channels(cls):
    kw = dict(d_state=N, channels=2, final_act=None, transposed=False, verbose=False)
    m = cls(H, **kw).eval()
    swapped = cls(H, swap_channels=True, **kw).eval()
    swapped.load_state_dict(m.state_dict())
    x = torch.randn(2, 6, H)
    y, ys = m(x)[0], swapped(x)[0]  # (B, L, C * H)
    perm = torch.arange(2 * H).view(2, H).transpose(0, 1).reshape(-1)  # (h, c) -> c * H + h
    torch.testing.assert_close(ys, y[..., perm])
    cache = swapped.allocate_inference_cache(2)
    steps = torch.stack([swapped.step(x[:, t], cache)[0] for t in range(6)], 1)
    torch.testing.assert_close(steps, ys, atol=1e-5, rtol=1e-5)


def test_s4_drop_kernel():
    m = S4D(H, d_state=N, drop_kernel=0.5, transposed=False, verbose=False)
    ref = S4D(H, d_state=N, transposed=False, verbose=False)
    ref.load_state_dict(m.state_dict())
    assert isinstance(m.kernel_dropout, torch.nn.Dropout) and m.kernel_dropout.p == 0.5
    x = torch.randn(2, 6, H)
    m.eval(), ref.eval()
    torch.testing.assert_close(m(x)[0], ref(x)[0])
    m.train()
    assert not torch.allclose(m(x)[0], ref(x)[0])


@pytest.mark.parametrize("cls", [S4, S4D])
def test_s4_original_init_options(cls):
    cls(H, d_state=N, verbose=False, **ORIGINAL_INIT_OPTIONS)  # the defaults are accepted
    for name, value in [("real_scale", 2.0), ("B_init", "random"), ("normalize", True)]:
        with pytest.raises(ValueError, match=f"{name}: an option of the original lrnnx"):
            cls(H, d_state=N, **{name: value})


@pytest.mark.parametrize("cls", [S4, S4D])
def test_s4_forward_rate_and_one_length(cls):
    m = cls(H, d_state=N, transposed=False, verbose=False).eval()
    x = torch.randn(3, 6, H)
    y = m(x)[0]
    torch.testing.assert_close(m(x, rate=1.0)[0], y)
    with pytest.raises(ValueError, match="rate: only 1.0 is supported"):
        m(x, rate=2.0)
    # a single length for the whole batch, as the original accepts
    torch.testing.assert_close(m(x, lengths=torch.tensor([4]))[0], m(x, lengths=4)[0])


def test_rglru_use_fast_path_and_positional_order():
    m = RGLRU(H, 4, 1, 8.0, (0.9, 0.999), True, False, False, 3)
    assert m.use_fast_path is False and m.layer_idx == 3
    fast = RGLRU(H, use_fast_path=True)
    fast.load_state_dict(m.state_dict())
    x = torch.randn(2, 7, H)
    torch.testing.assert_close(fast(x), m(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["mamba", "rglru", "s7", "event-s5"])
def test_hidden_states_keyword(name):
    m = build(name).eval()
    x = torch.randn(2, 5, H)
    y = m(x)
    torch.testing.assert_close(m(hidden_states=x), y)
    with pytest.raises(ValueError, match="x, hidden_states"):
        m(x, hidden_states=x + 1)
    if name in ("rglru", "s7", "event-s5"):
        c1, c2 = m.allocate_inference_cache(2), m.allocate_inference_cache(2)
        torch.testing.assert_close(
            m.step(hidden_states=x[:, 0], inference_cache=c1)[0], m.step(x[:, 0], c2)[0]
        )


def test_s7_positional_use_fast_path():
    with pytest.raises(TypeError, match="use_fast_path"):
        S7(H, N, 1, False)
    assert S7(H, N, 1, use_fast_path=False, layer_idx=2).layer_idx == 2


# ---------------------------------------------------------------------------------------------
# Task C: conventions


def test_s4d_disc_and_discretization():
    assert S4D(H, d_state=N, verbose=False).disc == "zoh"
    assert S4D(H, d_state=N, discretization="bilinear", verbose=False).disc == "bilinear"
    assert S4D(H, d_state=N, disc="dirac", verbose=False).disc == "dirac"
    assert S4D(H, d_state=N, disc="zoh", discretization="zoh", verbose=False).disc == "zoh"
    with pytest.raises(ValueError, match="disc, discretization"):
        S4D(H, d_state=N, disc="zoh", discretization="bilinear")
    with pytest.raises(ValueError, match="disc"):
        S4D(H, d_state=N, discretization="euler")


@pytest.mark.parametrize("cls", [S4, S4D])
def test_positional_bottleneck_warns(cls):
    with pytest.warns(UserWarning, match=r"second positional argument .* is bottleneck.*d_state=4"):
        m = cls(H, 4, verbose=False)
    assert m.H == H // 4  # the call still means bottleneck=4, as in the original
    assert "bottleneck" in cls.__doc__.split("\n\n")[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        cls(H, 4, d_state=N, verbose=False)
        cls(H, bottleneck=4, d_state=N, verbose=False)
        cls(H, None, verbose=False)
        cls(H, d_state=N, verbose=False)
        cls(H, 2, None, "glu", None, 0.0, False, True, None, 1, N, verbose=False)
    copy.deepcopy(m)  # rebuilding the object does not warn or fail


@pytest.mark.parametrize(
    "mode,cls",
    [
        ("neck", CentaurusNeck),
        ("pointwise", CentaurusPWNeck),
        ("pw", CentaurusPWNeck),
        ("s5", CentaurusPWNeck),
        ("dws", CentaurusDWS),
        ("full", CentaurusFull),
    ],
)
def test_centaurus_isinstance(mode, cls):
    m = Centaurus(H, H, 2, mode=mode)
    assert isinstance(m, Centaurus) and type(m) is cls
    assert isinstance(cls(H, H, 2), Centaurus) and issubclass(cls, Centaurus)
    assert type(cls(H, H, 2, mode=mode)) is cls
    for other in ("neck", "dws"):
        if not issubclass(cls, type(Centaurus(H, H, 2, mode=other))):
            with pytest.raises(ValueError, match="mode"):
                cls(H, H, 2, mode=other)
    for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert type(clone) is cls
        torch.testing.assert_close(clone.state_dict(), m.state_dict())
    assert type(Centaurus(H, H, 2)) is CentaurusNeck
    with pytest.raises(ValueError, match="mode: expected one of"):
        Centaurus(H, H, 2, mode="bogus")
    assert isinstance(build_mixer("centaurus", H, H).model, Centaurus)


@pytest.mark.parametrize("cls", [S4, S4D])
def test_default_state_step(cls):
    m = cls(H, d_state=N, transposed=False, l_max=8, verbose=False).eval()
    x = torch.randn(2, 8, H)
    y_ref, final = m(x, state=m.default_state(2))
    state = m.default_state(2)
    zero = state.clone()
    ys = []
    for t in range(8):
        y, state = m.step(x[:, t], state)
        ys.append(y)
    torch.testing.assert_close(torch.stack(ys, 1), y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state, final, atol=1e-5, rtol=1e-5)
    s0 = m.default_state(2)
    m.step(x[:, 0], s0)
    assert torch.equal(s0, zero)  # the state passed in is not modified
    with pytest.raises(ValueError, match="state"):
        m.step(x[:, 0], m.default_state(3))
    # the step constants follow parameter updates
    with torch.no_grad():
        m.D.add_(1.0)
    y2, _ = m.step(x[:, 0], m.default_state(2))
    cache = m.allocate_inference_cache(2)
    torch.testing.assert_close(y2, m.step(x[:, 0], cache)[0])


# constructor arguments found unchecked by a probe: each now names itself
BAD_CONSTRUCTORS = {
    "S5 discretization None": (lambda: _cls("s5")(4, 4, None), ValueError, "discretization"),
    "event S5 discretization None": (
        lambda: _cls("event-s5")(4, 4, discretization=None), ValueError, "discretization"),
    "Mamba dt_scale < 0": (lambda: _cls("mamba")(4, dt_scale=-1.0), ValueError, "dt_scale"),
    "Mamba dt_init_floor < 0": (
        lambda: _cls("mamba")(4, dt_init_floor=-1.0), ValueError, "dt_init_floor"),
    "Mamba int dtype": (lambda: _cls("mamba")(4, dtype=torch.int64), TypeError, "dtype"),
    "RGLRU a_init_range of one": (
        lambda: _cls("rglru")(4, a_init_range=(0.9,)), TypeError, "a_init_range"),
    "S4D dropout str": (lambda: _cls("s4d")(4, d_state=4, dropout="0.1"), TypeError, "dropout"),
    "S4D lr < 0": (lambda: _cls("s4d")(4, d_state=4, lr=-1.0), ValueError, "lr"),
    "S5 conj_sym str": (lambda: _cls("s5")(4, 4, "zoh", conj_sym="no"), TypeError, "conj_sym"),
    "S4D transposed str": (
        lambda: _cls("s4d")(4, d_state=4, transposed="no"), TypeError, "transposed"),
}  # fmt: skip


def _cls(name):
    from lrnnx.models.registry import get_model_class

    return get_model_class(name)


@pytest.mark.parametrize("case", sorted(BAD_CONSTRUCTORS))
def test_bad_constructor_arguments_are_named(case):
    build, error, name = BAD_CONSTRUCTORS[case]
    with pytest.raises(error, match=f"^{name}"):
        build()


def test_mamba_float64_constructor_is_float64_end_to_end():
    """Mamba(dtype=torch.float64): A_log and D float64 too (the recurrence in float64), as
    .double() gives."""
    m = _cls("mamba")(8, d_state=4, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in m.parameters())
    assert m.allocate_inference_cache(1)["lrnn_state"].dtype == torch.float64


def test_print_shows_each_models_sizes():
    """print(model) says what model it is: its sizes and rules, not a bare ``S5()``."""
    import warnings

    from lrnnx.models.registry import available_models, build_mixer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in available_models():
            text = repr(build_mixer(name, 8, 8).model).splitlines()
            sizes = text[0] if text[0].endswith(")") else text[1]
            assert "d_model=8" in sizes, (name, text[:2])

"""Official Centaurus layers -> lrnnx (lrnnx.interop.centaurus), against a float64 loop of their layer.

Matched: github.com/Brainchip-Inc/Centaurus at commit b394bd737ad7c5b04fd93b5253843ccd8a8ed538,
``centaurus/ssm.py`` (``SSMLayer.__init__``: parameter names, shapes and layouts;
``Kernelizer.discretize``: Re(A) = -softplus(A[..., 0]), Im(A) = A[..., 1], dt = exp(log_dt)
broadcast per mode, the B / E weights times dt; ``SSMLayer.forward``: the ``mixer``),
``centaurus/opt_fft.py`` (``_K``: kernel Re(exp(dt A l)) weighted by E and summed over the
sub-states; the causal convolutions) and ``centaurus/utils.py`` (``get_activations``: norm, then
postact).  Their code is not a package, so it is not imported here: ``their_layer`` below
restates its equations as a step-by-step recurrence over their own tensors, in float64:

    s5:   h_k[t] = exp(dt_k a_k) h_k[t-1] + dt_k (B u[t])_k                 k = 1..J*M
          y = C Re(h)
    neck: h_jm[t] = exp(dt_j a_jm) h_jm[t-1] + dt_j (B u[t])_j
          y = C (sum_m E_jm Re h_jm)
    dws:  h_cm[t] = exp(dt_cm a_cm) h_cm[t-1] + dt_cm u_c[t]
          y = W act(norm(sum_m E_cm Re h_cm))            W = mixer.1.weight[:, :, 0]
    full: h_dcm[t] = exp(dt_dm a_dcm) h_dcm[t-1] + dt_dm u_c[t]
          y_d = sum_cm E_dcm Re h_dcm

with a_* = -softplus(A[..., 0]) + i A[..., 1], followed by act(norm(y)) when use_activations.
"""

import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _tol import assert_close_rel
from lrnnx.interop.centaurus import from_ssm_layer, from_state_dict
from lrnnx.models.lti.centaurus import Centaurus

CIN, COUT, J, M, L = 3, 4, 2, 3, 24
MODES = ["s5", "neck", "dws", "full"]
#: (norm, postact) pairs of their utils.get_activations
ACTS = [("batch", "relu"), (None, None), ("layer-feature", "silu"), ("rms", "gelu")]


# ------------------------------------------------------------------------------ their layer
def their_keys(mode, norm="batch", use_activations=False, cin=CIN, cout=COUT):
    """Key -> shape of SSMLayer(num_states=M, cin, cout, state_blocks=J, mode, norm).state_dict()."""
    keys = {
        "s5": {"A": (J * M, 2), "log_dt": (J * M,), "B": (J * M, cin), "C": (cout, J * M)},
        "neck": {"A": (J, M, 2), "log_dt": (J,), "B": (J, cin), "C": (cout, J), "E": (J, M)},
        "dws": {
            "A": (cin, M, 2),
            "log_dt": (cin, M),
            "E": (cin, M),
            "mixer.1.weight": (cout, cin, 1),
        },
        "full": {"A": (cout, cin, M, 2), "log_dt": (cout, M), "E": (cout, cin, M)},
    }[mode]
    norms = []
    if mode == "dws":
        norms.append(("mixer.0.0.", cin))
    if use_activations:
        norms.append(("mixer.2.0." if mode == "dws" else "mixer.0.", cout))
    for prefix, c in norms:
        if norm == "batch":
            names = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
        else:
            names = {None: [], "layer-feature": ["weight", "bias"], "rms": ["rms_norm.weight"]}[
                norm
            ]
        keys.update({prefix + n: (() if n == "num_batches_tracked" else (c,)) for n in names})
    return keys


def random_state_dict(mode, norm="batch", use_activations=False, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in their_keys(mode, norm, use_activations).items():
        if key == "log_dt":
            t = torch.empty(shape, dtype=dtype).uniform_(math.log(0.05), math.log(0.5), generator=g)
        elif key.endswith("num_batches_tracked"):
            t = torch.tensor(7)
        elif key.endswith("running_var"):
            t = torch.empty(shape, dtype=dtype).uniform_(0.5, 2.0, generator=g)
        elif key.endswith("weight") and key.startswith("mixer") and key != "mixer.1.weight":
            t = 1.0 + 0.3 * torch.randn(shape, dtype=dtype, generator=g)  # a norm's gain
        else:
            t = 0.5 * torch.randn(shape, dtype=dtype, generator=g)
        sd[key] = t
    if "A" in sd:  # Im(A) spread like their pi * m initialisation, not all near 0
        sd["A"][..., 1] *= 6.0
    return sd


def norm_act(z, sd, prefix, norm, postact, train=False, mask=None, eps=1e-5):
    """Their get_activations(norm, postact) on z (B, L, C), float64.  BatchNorm in train mode
    uses the batch's statistics (biased variance) over every (sequence, step) position, or over
    those where ``mask`` (B, L) holds."""
    if norm == "batch":
        if train:
            zz = z.reshape(-1, z.shape[-1]) if mask is None else z[mask]
            mean, var = zz.mean(0), zz.var(0, unbiased=False)
        else:
            mean, var = sd[prefix + "running_mean"], sd[prefix + "running_var"]
        z = (z - mean) / torch.sqrt(var + eps) * sd[prefix + "weight"] + sd[prefix + "bias"]
    elif norm == "layer-feature":
        mean, var = z.mean(-1, keepdim=True), z.var(-1, unbiased=False, keepdim=True)
        z = (z - mean) / torch.sqrt(var + eps) * sd[prefix + "weight"] + sd[prefix + "bias"]
    elif norm == "rms":  # torch's RMSNorm with eps=None: the dtype's machine epsilon
        ms = z.pow(2).mean(-1, keepdim=True)
        z = z / torch.sqrt(ms + torch.finfo(z.dtype).eps) * sd[prefix + "rms_norm.weight"]
    acts = {None: lambda v: v, "relu": torch.relu, "silu": F.silu, "gelu": F.gelu}
    return acts[postact](z)


def their_ssm(sd, mode, x):
    """Their Kernelizer on x (B, C_in, L) as a float64 recurrence -> (B, L, C): the layer's output
    before its ``mixer`` (dws: the depthwise SSM's output, before the norm and the 1x1 mixing)."""
    a = -F.softplus(sd["A"][..., 0]) + 1j * sd["A"][..., 1]
    dt = torch.exp(sd["log_dt"])
    if mode == "neck":  # (J, 1): one step per state block, shared by its sub-states
        dt = dt[:, None]
    elif mode == "full":  # (C_out, 1, M): shared by the inputs of an output channel
        dt = dt[:, None, :]
    a_bar = torch.exp(dt * a)
    h = torch.zeros((x.shape[0],) + a.shape, dtype=torch.complex128)
    outs = []
    for t in range(x.shape[-1]):
        u = x[..., t]  # (B, C_in)
        if mode == "s5":
            h = a_bar * h + dt * (u @ sd["B"].T)
            outs.append(h.real @ sd["C"].T)
        elif mode == "neck":
            h = a_bar * h + dt * (u @ sd["B"].T)[:, :, None]
            outs.append((sd["E"] * h.real).sum(-1) @ sd["C"].T)
        elif mode == "dws":
            h = a_bar * h + dt * u[:, :, None]
            outs.append((sd["E"] * h.real).sum(-1))
        else:
            h = a_bar * h + dt * u[:, None, :, None]
            outs.append((sd["E"] * h.real).sum((-1, -2)))
    return torch.stack(outs, 1)


def their_layer(
    sd, mode, x, norm="batch", postact="relu", use_activations=False, train=False, mask=None
):
    """Their SSMLayer.forward on x (B, C_in, L) -> (B, C_out, L), float64 (``mask``: see norm_act)."""
    sd = {k: v.double() if v.is_floating_point() else v for k, v in sd.items()}
    y = their_ssm(sd, mode, x.double())
    if mode == "dws":
        y = norm_act(y, sd, "mixer.0.0.", norm, postact, train, mask)
        y = y @ sd["mixer.1.weight"][:, :, 0].T
    if use_activations:
        prefix = "mixer.2.0." if mode == "dws" else "mixer.0."
        y = norm_act(y, sd, prefix, norm, postact, train, mask)
    return y.transpose(1, 2)


# ------------------------------------------------------------------------------ lrnnx
def ours_all_paths(model, x):
    """{path: (B, C_out, L)} from lrnnx's forward (scan, FFT latent / kernel) and step, x (B, C, L)."""
    u = x.transpose(1, 2)
    outs = {}
    for path in ("scan", "latent", "kernel"):
        if path == "kernel" and not model.mix_act.is_identity:
            continue  # a nonlinearity between the SSM and C: no kernel contraction (tested below)
        model.mode = "scan" if path == "scan" else "fft"
        model.contraction = "auto" if path == "scan" else path
        outs[path] = model(u).transpose(1, 2)
    cache = model.allocate_inference_cache(u.shape[0])
    steps = [model.step(u[:, t], cache)[0] for t in range(u.shape[1])]
    outs["step"] = torch.stack(steps, -1)
    return outs


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("use_activations", [False, True])
@pytest.mark.parametrize("norm,postact", ACTS)
def test_import_matches_their_layer(mode, use_activations, norm, postact):
    sd = random_state_dict(mode, norm, use_activations)
    kw = dict(num_states=M, in_channels=CIN, out_channels=COUT, state_blocks=J, mode=mode)
    model = from_state_dict(sd, **kw, norm=norm, postact=postact, use_activations=use_activations)
    model.eval()
    assert model.discretization == "simplified_zoh" and model.log_dt.dtype == torch.float64
    x = torch.randn(2, CIN, L, dtype=torch.float64)
    ref = their_layer(sd, mode, x, norm, postact, use_activations)
    assert ref.shape == (2, COUT, L)
    with torch.no_grad():
        for path, y in ours_all_paths(model, x).items():
            assert_close_rel(y, ref, length=L, msg=f"{mode} {path}")


@pytest.mark.parametrize("mode", MODES)
def test_float32_checkpoint(mode):
    """Their layers train in float32: the import stays float32 and is exact to float32 rounding."""
    sd = random_state_dict(mode, dtype=torch.float32)
    model = from_state_dict(sd, M, CIN, COUT, J, mode).eval()
    assert model.A_real_raw.dtype == model.log_dt.dtype == torch.float32
    x = torch.randn(2, CIN, L)
    ref = their_layer(sd, mode, x)
    with torch.no_grad():
        y = model(x.transpose(1, 2)).transpose(1, 2)
    assert_close_rel(y, ref, dtype=torch.float32, length=L)


def test_dws_batchnorm_train_mode():
    """Train mode: BatchNorm uses the batch's statistics (as theirs) and moves its running
    statistics the same way; with lengths, padding is left out of the statistics."""
    sd = random_state_dict("dws", use_activations=True)
    x = torch.randn(3, CIN, L, dtype=torch.float64)
    z = their_ssm(sd, "dws", x)  # (B, L, C_in): what the first BatchNorm sees
    lengths = torch.tensor([L, 10, 17])
    mask = torch.arange(L)[None, :] < lengths[:, None]
    for lens, m in ((None, None), (lengths, mask)):
        model = from_state_dict(sd, M, CIN, COUT, mode="dws", use_activations=True)
        assert model.training
        y = model(x.transpose(1, 2), lengths=lens).transpose(1, 2)
        ref = their_layer(sd, "dws", x, use_activations=True, train=True, mask=m)
        valid = torch.ones_like(y, dtype=torch.bool) if m is None else m[:, None, :].expand_as(y)
        assert_close_rel(y[valid], ref[valid], length=L)
        assert torch.all(y[~valid] == 0)
        zz = z.reshape(-1, CIN) if m is None else z[m]
        bn = model.mix_act.norm  # momentum 0.1, unbiased variance, as torch's BatchNorm1d
        assert_close_rel(bn.running_mean, 0.9 * sd["mixer.0.0.running_mean"] + 0.1 * zz.mean(0))
        assert_close_rel(bn.running_var, 0.9 * sd["mixer.0.0.running_var"] + 0.1 * zz.var(0))
        assert int(bn.num_batches_tracked) == 8


def test_step_in_train_mode_is_the_eval_function():
    sd = random_state_dict("dws", use_activations=True)
    model = from_state_dict(sd, M, CIN, COUT, mode="dws", use_activations=True)
    x = torch.randn(2, CIN, L, dtype=torch.float64)
    ref = their_layer(sd, "dws", x, use_activations=True, train=False)
    assert model.training
    cache = model.allocate_inference_cache(2)
    with torch.no_grad():
        ys = torch.stack([model.step(x[..., t], cache)[0] for t in range(L)], -1)
    assert_close_rel(ys, ref, length=L)
    assert torch.equal(model.mix_act.norm.running_mean, sd["mixer.0.0.running_mean"])


class _LayerLike(nn.Module):
    """An object with the attributes and submodule layout their SSMLayer has (dws, BatchNorm +
    ReLU inside, use_activations=True), built from torch modules to test ``from_ssm_layer``."""

    def __init__(self, sd):
        super().__init__()
        self.mode, self.in_channels, self.out_channels = "dws", CIN, COUT
        self.state_blocks, self.norm, self.postact, self.dropout = 1, "batch", "relu", None
        for name in ("A", "log_dt", "E"):
            setattr(self, name, nn.Parameter(sd[name].clone()))
        self.B = self.C = None
        act = [nn.Sequential(nn.BatchNorm1d(c), nn.ReLU()) for c in (CIN, COUT)]
        self.mixer = nn.Sequential(act[0], nn.Conv1d(CIN, COUT, 1, bias=False), act[1]).double()
        self.load_state_dict(sd)


def test_from_ssm_layer():
    sd = random_state_dict("dws", use_activations=True)
    layer = _LayerLike(sd).eval()
    model = from_ssm_layer(layer)
    assert not model.training and isinstance(model, Centaurus) and model.d_output == COUT
    x = torch.randn(2, CIN, L, dtype=torch.float64)
    with torch.no_grad():
        assert_close_rel(
            model(x.transpose(1, 2)).transpose(1, 2),
            their_layer(sd, "dws", x, use_activations=True),
            length=L,
        )
    layer.mixer[2] = nn.Identity()  # use_activations=False
    assert model.out_act.norm is not None and from_ssm_layer(layer).out_act.is_identity
    with pytest.raises(TypeError, match="layer"):
        from_ssm_layer(nn.Linear(2, 2))


def test_s5_layer_sizes_from_a_layer():
    """s5 flattens (state_blocks, num_states): from_ssm_layer splits them back."""
    sd = random_state_dict("s5", use_activations=False)
    layer = nn.Module()
    layer.A, layer.log_dt = nn.Parameter(sd["A"]), nn.Parameter(sd["log_dt"])
    layer.B, layer.C = nn.Parameter(sd["B"]), nn.Parameter(sd["C"])
    layer.mixer = nn.Identity()
    layer.mode, layer.in_channels, layer.out_channels, layer.state_blocks = "s5", CIN, COUT, J
    layer.norm, layer.postact = "batch", "relu"
    model = from_ssm_layer(layer)
    assert (model.d_state, model.sub_state_dim, model.log_dt.shape) == (J, M, (J * M,))


def test_bad_checkpoints_are_refused():
    sd = random_state_dict("neck")
    kw = dict(num_states=M, in_channels=CIN, out_channels=COUT, state_blocks=J)
    with pytest.raises(TypeError, match="^state_dict: expected a mapping"):
        from_state_dict(list(sd.items()), **kw, mode="neck")
    with pytest.raises(ValueError, match="mode.*'s5'.*'conv'"):
        from_state_dict(sd, **kw, mode="conv")
    with pytest.raises(ValueError, match="norm.*'group'"):
        from_state_dict(sd, **kw, mode="neck", norm="group")
    with pytest.raises(ValueError, match="postact.*'lelu'"):
        from_state_dict(sd, **kw, mode="neck", postact="lelu")
    with pytest.raises(
        ValueError, match=re.escape("state_dict['E']: expected shape (2, 3), got (2, 4)")
    ):
        from_state_dict({**sd, "E": torch.zeros(J, M + 1)}, **kw, mode="neck")
    with pytest.raises(ValueError, match="missing.*mixer.0.weight"):
        from_state_dict(sd, **kw, mode="neck", use_activations=True)
    with pytest.raises(ValueError, match="unexpected.*'extra'"):
        from_state_dict({**sd, "extra": torch.zeros(1)}, **kw, mode="neck")
    with pytest.raises(ValueError, match="num_states"):
        from_state_dict(sd, 0, CIN, COUT, J, "neck")
    # an int would be read as a float silently, a complex tensor lose its imaginary part, a
    # NaN pole give NaN outputs
    for bad in (sd["A"].long(), sd["A"].to(torch.complex128), [[0.0]]):
        with pytest.raises(TypeError, match=r"state_dict\['A'\]: expected a"):
            from_state_dict({**sd, "A": bad}, **kw, mode="neck")
    nan = sd["A"].clone()
    nan[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"state_dict\['A'\]: expected finite"):
        from_state_dict({**sd, "A": nan}, **kw, mode="neck")


def test_mixed_dtypes_keep_the_widest():
    """float32 A with float64 B, C, E: a float64 block, nothing rounded."""
    sd = random_state_dict("neck")
    kw = dict(num_states=M, in_channels=CIN, out_channels=COUT, state_blocks=J, mode="neck")
    mixed = {**sd, "A": sd["A"].float()}
    model = from_state_dict(mixed, **kw)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    ref = from_state_dict({**sd, "A": sd["A"].float().double()}, **kw).eval()
    x = torch.randn(2, 16, CIN, dtype=torch.float64)
    assert_close_rel(model.eval()(x), ref(x), dtype=torch.float64, length=16)


def test_warnings_for_what_is_not_carried():
    sd = random_state_dict("neck")
    kw = dict(num_states=M, in_channels=CIN, out_channels=COUT, state_blocks=J, mode="neck")
    with pytest.warns(UserWarning, match="dropout"):
        from_state_dict(sd, **kw, dropout=0.1)
    sd["A"][0, 0, 0] = -12.0  # softplus(-12) = 6e-6 < MIN_NEG_REAL
    with pytest.warns(UserWarning, match="clamps"):
        from_state_dict(sd, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from_state_dict(random_state_dict("neck"), **kw)

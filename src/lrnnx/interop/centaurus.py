"""Load the official Centaurus layers (Brainchip-Inc/Centaurus, ``centaurus.ssm.SSMLayer``).

Matched against github.com/Brainchip-Inc/Centaurus at commit
b394bd737ad7c5b04fd93b5253843ccd8a8ed538 (``centaurus/ssm.py``: ``SSMLayer``, ``Kernelizer``;
``centaurus/opt_fft.py``: ``_K``; ``centaurus/utils.py``: ``get_activations``).  Their layer maps
(B, C_in, L) -> (B, C_out, L) channels-first; the lrnnx block maps (B, L, C_in) -> (B, L, C_out),
so ``their(x) == ours(x.transpose(1, 2)).transpose(1, 2)``.

``SSMLayer(num_states=M, in_channels=C_in, out_channels=C_out, state_blocks=J, mode=...)``
becomes a :class:`lrnnx.models.lti.Centaurus` with ``discretization="simplified_zoh"`` (theirs:
A_bar = exp(dt A), the input weight times dt) and these parameters (A's last axis holds
(raw real part, imaginary part), Re(A) = -softplus(raw), as ``A_real_raw`` / ``A_imag`` here):

=========  =============================================  ============================================
their mode lrnnx block                                    their tensors -> ours
=========  =============================================  ============================================
``s5``     pointwise, d_state=J, sub_state_dim=M,          A (J*M, 2), log_dt (J*M,), B (J*M, C_in),
           d_output=C_out, dt_per_sub_state                C (C_out, J*M): same layout
``neck``   neck, d_state=J, sub_state_dim=M,               A (J, M, 2), log_dt (J,), B (J, C_in),
           d_output=C_out                                  C (C_out, J), E (J, M)
``dws``    dws, d_state=C_in, sub_state_dim=M,             A (C_in, M, 2), log_dt (C_in, M), E (C_in, M);
           d_output=C_out, dt_per_sub_state,               mixer.1.weight (C_out, C_in, 1) -> C;
           mix_norm/mix_activation = norm/postact          mixer.0.0.* -> mix_act.norm.*
``full``   full, d_model=C_in, d_state=C_out,              A (C_out, C_in, M, 2) -> (C_out*C_in, M),
           sub_state_dim=M, dt_per_sub_state               log_dt (C_out, M), E (C_out, C_in, M)
=========  =============================================  ============================================

With ``use_activations=True`` their layer ends with norm + postact (``mixer.0.*``, dws:
``mixer.2.0.*``), which becomes ``out_norm`` / ``out_activation`` (``out_act.norm.*``).  Their dws
layer always has norm + postact between the SSM and the 1x1 mixing (BatchNorm + ReLU by default).
Norms: ``"batch"``, ``"layer-feature"`` (-> ``"layer"``), ``"rms"`` or None; postacts: relu,
relu6, silu, gelu, tanh, sigmoid or None.  Their other choices are refused (ValueError): the
``"group"``, ``"instance"`` and ``"layer"`` norms normalise over time (no causal, step-by-step
form), ``"lelu"`` (LeakyReLU(0.1)) and ``"glu"`` have no counterpart here.  Dropout is not carried
(a warning says so): it is the identity in eval mode, where the import is exact.  Their layers
have no bias, skip (D) term or output scaling; neither does the import.

Exactness: the imported block computes the same function in float64 up to rounding (the tests
compare with a float64 loop of their equations at 1e-12 relative), in eval mode and, for
BatchNorm, in train mode with full-length sequences too (both normalise over every (sequence,
step) position).  One difference: here -Re(A) is clamped at
:data:`lrnnx.models.lti.centaurus.MIN_NEG_REAL` (1e-4) to keep every rule stable; a checkpoint with
softplus(raw) below that gets a warning, and those poles decay slightly faster than theirs.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Dict, Mapping, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lrnnx.core.checks import check_positive_int, user_stacklevel
from lrnnx.models.lti.centaurus import MIN_NEG_REAL, Centaurus

__all__ = ["from_ssm_layer", "from_state_dict", "MODES", "NORMS", "POSTACTS"]

#: their mode -> lrnnx mode
MODES = {"s5": "pointwise", "neck": "neck", "dws": "dws", "full": "full"}
#: their norm -> lrnnx norm (all per position; BatchNorm with running statistics in eval mode)
NORMS = {None: None, "batch": "batch", "layer-feature": "layer", "rms": "rms"}
#: their postact -> lrnnx activation (same functions, torch defaults)
POSTACTS = {
    None: None,
    "relu": "relu",
    "relu6": "relu6",
    "silu": "silu",
    "gelu": "gelu",
    "tanh": "tanh",
    "sigmoid": "sigmoid",
}
#: a BatchNorm's entries, as in its state_dict
_BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def from_ssm_layer(layer: nn.Module) -> Centaurus:
    """An lrnnx Centaurus block computing the same function as one of their ``SSMLayer``\\ s.

    Reads the layer's constructor settings from its attributes (``mode``, ``in_channels``,
    ``out_channels``, ``state_blocks``, ``norm``, ``postact``, ``dropout``; ``num_states`` from
    ``A``'s shape; ``use_activations`` from whether its output activation is a module) and copies its
    ``state_dict()`` with :func:`from_state_dict`.  The block is in the layer's train/eval mode.

    Args:
        layer: a ``centaurus.ssm.SSMLayer`` (any module with those attributes and parameters).

    Returns:
        The block, in the layer's parameter dtype (float32, or float64 after ``layer.double()``),
        on the CPU; it maps (B, L, in_channels) -> (B, L, out_channels).

    Raises:
        TypeError: ``layer`` is not an nn.Module or lacks one of the attributes above.
        ValueError: see :func:`from_state_dict`.
    """
    if not isinstance(layer, nn.Module):
        raise TypeError(f"layer: expected a centaurus SSMLayer module, got {type(layer).__name__}")
    names = ("mode", "in_channels", "out_channels", "state_blocks", "norm", "postact", "A", "mixer")
    missing = [n for n in names if not hasattr(layer, n)]
    if missing:
        raise TypeError(
            f"layer: expected a centaurus SSMLayer with attributes {list(names)}, "
            f"got a {type(layer).__name__} without {missing}"
        )
    mixer = layer.mixer
    # s5 flattens (state_blocks, num_states) into A's first axis
    flat = layer.mode == "s5" and isinstance(layer.state_blocks, int) and layer.state_blocks > 0
    num_states = int(layer.A.shape[-2]) // (layer.state_blocks if flat else 1)
    out_act = mixer[2] if layer.mode == "dws" and isinstance(mixer, nn.Sequential) else mixer
    model = from_state_dict(
        layer.state_dict(),
        num_states=num_states,
        in_channels=layer.in_channels,
        out_channels=layer.out_channels,
        state_blocks=layer.state_blocks,
        mode=layer.mode,
        norm=layer.norm,
        postact=layer.postact,
        dropout=getattr(layer, "dropout", None),
        use_activations=not isinstance(out_act, nn.Identity),
    )
    return model.train(layer.training)


def from_state_dict(
    state_dict: Mapping[str, Tensor],
    num_states: int,
    in_channels: int,
    out_channels: int,
    state_blocks: int | None = None,
    mode: str = "s5",
    norm: str | None = "batch",
    postact: str | None = "relu",
    dropout: float | None = None,
    dropout_dim: int = 1,
    use_activations: bool = False,
) -> Centaurus:
    """An lrnnx Centaurus block from their layer's state_dict and ``SSMLayer`` arguments.

    The arguments and their defaults are ``SSMLayer``'s (so ``from_state_dict(sd, **kwargs)``
    takes the keywords the layer was built with); their values decide the keys and shapes the
    state_dict must hold (see the module docstring), each checked before anything is copied.

    Args:
        state_dict: their layer's ``state_dict()`` (float32 or float64 tensors).
        num_states: sub-states M per state.  in_channels, out_channels: C_in, C_out.
        state_blocks: states J for s5 / neck (None: 1).  mode: ``"s5"``, ``"neck"``, ``"dws"``
            or ``"full"``.  norm, postact: their names (see :data:`NORMS`, :data:`POSTACTS`).
        dropout, dropout_dim: their dropout; not carried (a warning says so), it is the identity
            in eval mode.
        use_activations: whether the layer ends with norm + postact.

    Returns:
        The block, in train mode like any new module (call ``.eval()`` for inference: BatchNorm
        then uses the copied running statistics), in the state dict's dtype (float64 if any
        tensor is float64, else float32), on the CPU, mapping (B, L, C_in) -> (B, L, C_out).

    Raises:
        TypeError: an entry that is not a real floating-point tensor.
        ValueError: an unknown mode, norm or postact, a size below 1, a missing or unexpected key,
            a tensor whose shape is not the one the arguments imply (the message names the
            key, the expected and the received shape), or a non-finite SSM tensor.
    """
    ours_mode = _choice("mode", mode, MODES)
    _choice("norm", norm, NORMS)
    act_ours = _choice("postact", postact, POSTACTS)
    M = check_positive_int("num_states", num_states)
    Cin = check_positive_int("in_channels", in_channels)
    Cout = check_positive_int("out_channels", out_channels)
    J = 1 if state_blocks is None else check_positive_int("state_blocks", state_blocks)
    if dropout is not None:
        warnings.warn(
            f"dropout={dropout!r}: the lrnnx Centaurus block has no dropout; the import is exact "
            "in eval mode (where dropout is the identity), add dropout outside it to train",
            stacklevel=user_stacklevel(),
        )
    # their per-position norms over one channel are the identity (utils.get_norm)
    norm_for = {
        c: (None if norm in ("layer-feature", "rms") and c == 1 else norm) for c in (Cin, Cout)
    }
    _check_tensors(state_dict)
    ours = _translate(state_dict, mode, (J, M, Cin, Cout), norm_for, use_activations)
    sizes = (Cin, Cout, M) if mode == "full" else (Cin, Cin if mode == "dws" else J, M)
    kwargs: Dict[str, Any] = dict(discretization="simplified_zoh", mode=ours_mode)
    kwargs["dt_per_sub_state"] = mode != "neck"  # neck: one log_dt per state block
    if mode != "full":
        kwargs["d_output"] = Cout
    if mode == "dws":  # their act_layer(in_channels) between the SSM and the 1x1 mixing
        kwargs.update(mix_norm=NORMS[norm_for[Cin]], mix_activation=act_ours)
    if use_activations:
        kwargs.update(out_norm=NORMS[norm_for[Cout]], out_activation=act_ours)
    model = Centaurus(*sizes, **kwargs)
    if any(v.is_floating_point() and v.dtype == torch.float64 for v in state_dict.values()):
        model = model.double()  # float64 anywhere: nothing is rounded
    _warn_clamped_poles(ours["A_real_raw"])
    target = model.state_dict()
    model.load_state_dict({k: v.to(target[k].dtype) for k, v in ours.items()})
    return model


#: their SSM's own tensors (the recurrence: finite values required)
_SSM_KEYS = ("A", "B", "C", "E", "log_dt")


def _check_tensors(sd: Mapping[str, Tensor]) -> None:
    """Every entry a real floating-point tensor (BatchNorm's ``num_batches_tracked`` an
    integer one), the SSM's own finite: an int would be read as a float silently, a complex
    tensor lose its imaginary part, a NaN pole give NaN outputs."""
    if not isinstance(sd, Mapping):  # (checked before its items are read)
        raise TypeError(f"state_dict: expected a mapping of tensors, got {type(sd).__name__}")
    for k, v in sd.items():
        if not isinstance(v, Tensor):
            raise TypeError(f"state_dict[{k!r}]: expected a tensor, got {type(v).__name__}")
        if k.endswith("num_batches_tracked"):
            continue
        if not v.is_floating_point():
            raise TypeError(
                f"state_dict[{k!r}]: expected a real floating-point tensor, got {v.dtype}"
            )
        if k in _SSM_KEYS and not bool(torch.isfinite(v).all()):
            raise ValueError(f"state_dict[{k!r}]: expected finite values, got NaN or inf")


def _choice(name: str, value: Any, table: Mapping[Any, Any]) -> Any:
    if not (value is None or isinstance(value, str)) or value not in table:
        raise ValueError(f"{name}: expected one of {list(table)}, got {value!r}")
    return table[value]


def _expected_shapes(mode: str, J: int, M: int, Cin: int, Cout: int) -> Dict[str, Tuple[int, ...]]:
    """Their SSM tensors' shapes (``SSMLayer.__init__``)."""
    if mode == "s5":
        return {"A": (J * M, 2), "log_dt": (J * M,), "B": (J * M, Cin), "C": (Cout, J * M)}
    if mode == "neck":
        return {"A": (J, M, 2), "log_dt": (J,), "B": (J, Cin), "C": (Cout, J), "E": (J, M)}
    if mode == "dws":
        return {
            "A": (Cin, M, 2),
            "log_dt": (Cin, M),
            "E": (Cin, M),
            "mixer.1.weight": (Cout, Cin, 1),
        }
    return {"A": (Cout, Cin, M, 2), "log_dt": (Cout, M), "E": (Cout, Cin, M)}


def _norm_shapes(prefix: str, norm: str | None, channels: int) -> Dict[str, Tuple[int, ...]]:
    """Keys and shapes of their norm module (``utils.get_norm``) at ``prefix``."""
    if norm == "batch":
        return {
            f"{prefix}{k}": (() if k == "num_batches_tracked" else (channels,)) for k in _BN_KEYS
        }
    if norm == "layer-feature":
        return {f"{prefix}weight": (channels,), f"{prefix}bias": (channels,)}
    if norm == "rms":
        return {f"{prefix}rms_norm.weight": (channels,)}
    return {}


def _translate(
    sd: Mapping[str, Tensor],
    mode: str,
    sizes: Tuple[int, int, int, int],
    norm_for: Dict[int, str | None],
    use_activations: bool,
) -> Dict[str, Tensor]:
    """Check their keys/shapes and return the lrnnx state_dict entries."""
    J, M, Cin, Cout = sizes
    expected = _expected_shapes(mode, *sizes)
    # the norm is the first module of their activation block (utils.get_activations)
    norms = {}
    if mode == "dws":
        norms["mix_act.norm."] = ("mixer.0.0.", norm_for[Cin], Cin)
    if use_activations:
        norms["out_act.norm."] = (
            "mixer.2.0." if mode == "dws" else "mixer.0.",
            norm_for[Cout],
            Cout,
        )
    for prefix, norm, channels in norms.values():
        expected.update(_norm_shapes(prefix, norm, channels))
    _check_keys(sd, expected)
    S = Cout * Cin if mode == "full" else (Cin if mode == "dws" else J)
    A = sd["A"].reshape(S, M, 2)
    ours = {"A_real_raw": A[..., 0], "A_imag": A[..., 1], "log_dt": sd["log_dt"]}
    if mode == "neck":
        ours.update(B=sd["B"], C=sd["C"], E=sd["E"])
    elif mode == "s5":
        ours.update(B=sd["B"], C=sd["C"])
    elif mode == "dws":
        ours.update(E=sd["E"], C=sd["mixer.1.weight"][..., 0])
    else:
        ours.update(E=sd["E"].reshape(S, M))
    for ours_prefix, (theirs_prefix, _norm, _c) in norms.items():
        for key in list(expected):
            if key.startswith(theirs_prefix):
                name = key[len(theirs_prefix) :].replace("rms_norm.", "")
                ours[ours_prefix + name] = sd[key]
    return {k: v.detach().clone() for k, v in ours.items()}


def _check_keys(sd: Mapping[str, Tensor], expected: Dict[str, Tuple[int, ...]]) -> None:
    if not isinstance(sd, Mapping):
        raise TypeError(f"state_dict: expected a mapping of tensors, got {type(sd).__name__}")
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        raise ValueError(
            f"state_dict: expected the keys {sorted(expected)} for these SSMLayer arguments, "
            f"missing {missing}, unexpected {unexpected} (check mode, norm, use_activations)"
        )
    for key, shape in expected.items():
        got = sd[key]
        if not isinstance(got, Tensor) or tuple(got.shape) != shape:
            got_s = tuple(got.shape) if isinstance(got, Tensor) else type(got).__name__
            raise ValueError(f"state_dict[{key!r}]: expected shape {shape}, got {got_s}")


def _warn_clamped_poles(A_real_raw: Tensor) -> None:
    decay = F.softplus(A_real_raw.double())
    n = int((decay < MIN_NEG_REAL).sum())
    if n:
        warnings.warn(
            f"A: {n} pole(s) have -Re(A) = softplus(A[..., 0]) below {MIN_NEG_REAL} (smallest "
            f"{decay.min().item():.3g}); lrnnx clamps -Re(A) at {MIN_NEG_REAL}, so those poles "
            f"decay faster than in the source layer (relative change per step up to "
            f"{math.expm1(MIN_NEG_REAL):.1g} * dt)",
            stacklevel=user_stacklevel(),
        )

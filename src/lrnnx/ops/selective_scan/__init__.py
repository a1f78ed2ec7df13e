"""``selective_scan_fn``: the S6 (Mamba) selective scan, with mamba_ssm's signature.

Backends (same signature, same results):

- ``reference``: a plain Python loop over time, the specification.
- ``torch``: chunked pure torch, any device; memory O(b d n CHUNK) in forward and backward.
- ``cpu``: fused numba kernels (the CPU default when numba is installed): the state lives in a
  length-n buffer per channel, forward keeps one state per chunk, backward recomputes chunks.
- ``triton``: fused Triton kernels for CUDA tensors (the CUDA default).

``reverse=True`` (time from the last step to the first) runs natively in every backend (the
``cpu`` kernels walk their chunks backwards); a backend registered without it would get
time-flipped copies of the inputs from this dispatcher, which flips y back.

Packed sequences (``cu_seqlens``) are native in every backend: each restarts the state where a
sequence's scan begins (replacing the carried state, never multiplying it by zero, so a nan or
inf in one sequence stays there) and stores each sequence's final state where it ends (for a
backend without native ``reverse`` the flipped offsets ``T - cu_seqlens.flip(0)`` reverse the
order of the sequences, so the initial and final states are flipped along S around the call).

Pick one with ``backend=`` or ``LRNNX_BACKEND``; otherwise the fastest available for the device.
"""

from __future__ import annotations

import inspect

import torch as _torch  # the sibling module `torch.py` takes the name `torch` here
from torch import Tensor

from lrnnx.core.checks import check_bool, check_cu_seqlens, check_tensor
from lrnnx.ops import _dispatch
from lrnnx.ops.linear_scan import _final_state_flag
from lrnnx.ops.selective_scan.reference import DISCRETIZATIONS, discretize, effective_delta

__all__ = [
    "selective_scan_fn",
    "selective_scan_ref",
    "discretize",
    "effective_delta",
    "DISCRETIZATIONS",
]

_dispatch.register(
    "selective_scan", "reference", "lrnnx.ops.selective_scan.reference:selective_scan"
)
_dispatch.register("selective_scan", "torch", "lrnnx.ops.selective_scan.torch:selective_scan")
_dispatch.register("selective_scan", "cpu", "lrnnx.ops.selective_scan.cpu:selective_scan")
_dispatch.register("selective_scan", "triton", "lrnnx.ops.selective_scan.triton:selective_scan")

_LOW_PRECISION = (_torch.float16, _torch.bfloat16)

#: backends whose function takes ``reverse``; the others get time-flipped inputs
_NATIVE_REVERSE = ("reference", "torch", "triton", "cpu")


def _check_shape(name: str, x: Tensor, expected: tuple[int, ...], label: str) -> None:
    if tuple(x.shape) != expected:
        raise ValueError(f"{name}: expected {label}={expected}, got {tuple(x.shape)}")


def _complex_from_interleaved(X: Tensor, L: int) -> Tensor:
    """mamba_ssm's layout of an input-dependent B or C with a complex A: a real (b, n, 2L) or
    (b, g, n, 2L) tensor, real and imaginary parts interleaved along time, as a complex
    (..., L) one (a view); anything else unchanged."""
    if X.is_complex() or X.dim() < 3 or X.shape[-1] != 2 * L or L == 0:
        return X
    return _torch.view_as_complex(X.unflatten(-1, (L, 2)))


def _check_bc(name: str, X: Tensor, b: int, d: int, n: int, L: int) -> Tensor:
    """Accept (d, n), (b, n, L) or (b, g, n, L) with g dividing d; return (d, n) or (b, g, n, L)."""
    shape = tuple(X.shape)
    if shape == (d, n):
        return X
    if shape == (b, n, L):
        return X.unsqueeze(1)  # one group shared by every channel
    if X.dim() == 4 and shape[0] == b and shape[2:] == (n, L) and shape[1] > 0:
        if d % shape[1] != 0:
            raise ValueError(
                f"{name}: expected (b, g, n, L) with g dividing d={d}, got g={shape[1]} "
                f"in shape {shape}"
            )
        return X
    raise ValueError(
        f"{name}: expected (d, n)={(d, n)}, (b, n, L)={(b, n, L)} or (b, g, n, L)="
        f"({b}, g, {n}, {L}), got {shape}"
    )


def selective_scan_fn(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool | None = None,
    discretization: str = "mamba",
    deltaA: Tensor | None = None,
    initial_state: Tensor | None = None,
    backend: str | None = None,
    reverse: bool = False,
    *,
    output_final_state: bool | None = None,
    cu_seqlens: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Selective scan (S6): a diagonal SSM whose step size and B, C vary with the input.

    With delta' = softplus(delta + delta_bias) if ``delta_softplus`` else delta + delta_bias,
    for every batch element, channel i, state index k and time t::

        h_t[k] = A_bar * h_{t-1}[k] + gamma_bar * B_t[k] * u_t
        y_t    = sum_k C_t[k] h_t[k]   (2 * Re(.) when A is complex: conjugate pairs implied)
        y_t    = (y_t + D[i] u_t) * silu(z_t)

    With ``reverse=True`` time runs from the last step to the first::

        h_t[k] = A_bar_t * h_{t+1}[k] + gamma_bar_t * B_t[k] * u_t,   t = L-1, ..., 0

    ``initial_state`` is then h_L and the returned last state is h_0 (after processing t = 0):
    the result equals flipping every time-varying input along time, running the forward scan
    and flipping y back.  Native in every backend (``reference``, ``torch``, ``triton`` and
    ``cpu``).

    With ``cu_seqlens`` (packed sequences, fla's convention) u is (1, d, T) holding S sequences
    back to back; the state restarts at each sequence's first step (its last with ``reverse``):
    there A_bar_t multiplies that sequence's initial state instead of the carried state, which
    is dropped (selected away, not multiplied by zero), so nothing crosses a boundary, not even
    a nan or inf of another sequence (forward or backward).  Every backend does this natively
    (no loop over sequences).

    Args:
        u: input (b, d, L).
        delta: step sizes (b, d, L).
        A: continuous-time diagonal state matrix (d, n), real or complex.
        B, C: (d, n) time-invariant, (b, n, L) input-dependent, or (b, g, n, L) grouped
            (g divides d; channel i uses group i // (d // g)).  Complex only when A is; with a
            complex A an input-dependent B or C may also come in mamba_ssm's layout, real
            (b, n, 2L) or (b, g, n, 2L) with real and imaginary parts interleaved along time.
        D: skip connection (d,).
        z: gate (b, d, L); the output is multiplied by silu(z).
        delta_bias: (d,) added to delta before the optional softplus.
        delta_softplus: apply softplus to delta + delta_bias.
        return_last_state: alias of ``output_final_state`` (mamba_ssm's name; giving both with
            different values is an error).
        discretization: ``"mamba"`` (A_bar = exp(delta' A), gamma_bar = delta'), ``"zoh"``,
            ``"bilinear"`` or ``"dirac"`` (see :mod:`lrnnx.core.discretization`).
        deltaA: (b, d, L) event-mode step used for A_bar instead of delta' (as given: no bias,
            no softplus); gamma_bar still uses delta'.
        initial_state: h_{-1} (b, d, n) (h_L with ``reverse``); (S, d, n), one per sequence,
            with ``cu_seqlens``; zero when None.
        backend: force a backend ("reference", "torch", ...).
        reverse: scan from the last step to the first (a keyword after mamba_ssm's arguments,
            so its positional signature is unchanged); with ``cu_seqlens`` each sequence is
            scanned from its own last step to its first.
        output_final_state: also return the state after the last processed step (t = L - 1, or
            t = 0 with ``reverse``), (b, d, n); (S, d, n) with ``cu_seqlens`` (a zero-length
            sequence's is its initial state).  Keyword-only, as is ``cu_seqlens``.
        cu_seqlens: int32/int64 offsets (S + 1,) of S packed sequences: ``cu_seqlens[0] = 0``,
            ``cu_seqlens[-1] = T``, non-decreasing (repeats are zero-length sequences); u,
            delta, z, deltaA (1, d, T), B/C (d, n), (1, n, T) or (1, g, n, T).  The result
            equals scanning each sequence alone: y, final states and every gradient.

    Returns:
        y (b, d, L) in u's dtype [, last state (b, d, n), or (S, d, n) with ``cu_seqlens``].
        bfloat16/float16 inputs are accumulated in float32; the state is float32 (float64 for
        float64 inputs), complex when A is.
    """
    if not isinstance(u, Tensor):
        raise TypeError(f"u: expected a torch.Tensor, got {type(u).__name__}")
    device = u.device
    check_tensor("u", u, device, device_of="u")
    if u.dim() != 3:
        raise ValueError(f"u: expected (b, d, L), got {tuple(u.shape)}")
    b, d, L = u.shape
    want_final = _final_state_flag(output_final_state, return_last_state, "return_last_state")
    cu = None
    if cu_seqlens is not None:
        cu = check_cu_seqlens(cu_seqlens, b, L, f"u {tuple(u.shape)} (1, d, T)")
    nstates = b if cu is None else cu.shape[0] - 1
    check_tensor("delta", delta, device, device_of="u")
    _check_shape("delta", delta, (b, d, L), "(b, d, L)")
    check_tensor("A", A, device, complex_ok=True, device_of="u")
    if A.dim() != 2 or A.shape[0] != d or A.shape[1] == 0:
        raise ValueError(f"A: expected (d, n) with d={d} and n >= 1, got {tuple(A.shape)}")
    n = A.shape[1]
    is_complex = A.is_complex()
    delta_softplus = check_bool("delta_softplus", delta_softplus)
    for name, X in (("B", B), ("C", C)):
        check_tensor(name, X, device, complex_ok=True, device_of="u")
        if X.is_complex() and not is_complex:
            raise TypeError(f"{name}: complex {name} needs a complex A, got A of dtype {A.dtype}")
    if is_complex:
        B, C = _complex_from_interleaved(B, L), _complex_from_interleaved(C, L)
    B = _check_bc("B", B, b, d, n, L)
    C = _check_bc("C", C, b, d, n, L)
    for name, X, shape, label in (
        ("D", D, (d,), "(d,)"),
        ("z", z, (b, d, L), "(b, d, L)"),
        ("delta_bias", delta_bias, (d,), "(d,)"),
        ("deltaA", deltaA, (b, d, L), "(b, d, L)"),
    ):
        if X is not None:
            check_tensor(name, X, device, device_of="u")
            _check_shape(name, X, shape, label)
    if initial_state is not None:
        check_tensor("initial_state", initial_state, device, complex_ok=is_complex, device_of="u")
        if cu is None:
            _check_shape("initial_state", initial_state, (b, d, n), "(b, d, n)")
        else:
            _check_shape("initial_state", initial_state, (nstates, d, n), "(S, d, n)")
    if not isinstance(discretization, str) or discretization not in DISCRETIZATIONS:
        raise ValueError(
            f"discretization: expected one of {list(DISCRETIZATIONS)}, got {discretization!r}"
        )

    # one compute dtype: the widest real dtype given, at least float32
    reals = [
        X for X in (u, delta, A, B, C, D, z, delta_bias, deltaA, initial_state) if X is not None
    ]
    rdtype = u.dtype
    for X in reals:
        rdtype = _torch.promote_types(rdtype, X.real.dtype if X.is_complex() else X.dtype)
    if rdtype in _LOW_PRECISION:
        rdtype = _torch.float32
    cdtype = _torch.complex128 if rdtype == _torch.float64 else _torch.complex64

    def cast(X: Tensor | None) -> Tensor | None:
        if X is None:
            return None
        return X.to(cdtype if X.is_complex() else rdtype)

    A = A.to(cdtype if is_complex else rdtype)
    if initial_state is not None:
        initial_state = initial_state.to(cdtype if is_complex else rdtype)
    if u.numel() == 0:  # no batch, channel or step: nothing to scan
        return _empty_scan(u, delta, A, initial_state, want_final, nstates)
    inputs = (u, delta, A, B, C, D, z, delta_bias, deltaA, initial_state)
    fn = _dispatch.resolve("selective_scan", device, backend, inputs)
    out_dtype = u.dtype
    args = {
        "u": cast(u),
        "delta": cast(delta),
        "B": cast(B),
        "C": cast(C),
        "z": cast(z),
        "deltaA": cast(deltaA),
    }
    native = {}
    flip = bool(reverse)
    if flip and _dispatch.select("selective_scan", device, backend)[0] in _NATIVE_REVERSE:
        native, flip = {"reverse": True}, False
    if flip:  # reverse = flip the time axis, scan forward, flip y back (states need no flip)
        args = {k: X if X is None or X.dim() < 3 else X.flip(-1) for k, X in args.items()}
        if cu is not None:  # packed: the sequences come in reverse order, each one flipped
            cu = L - cu.flip(0)
            if initial_state is not None:
                initial_state = initial_state.flip(0)
    if cu is not None:
        native["cu_seqlens"] = cu
    with _dispatch.no_autocast(device):
        y, last_state = fn(
            args["u"],
            args["delta"],
            A,
            args["B"],
            args["C"],
            cast(D),
            args["z"],
            cast(delta_bias),
            delta_softplus,
            discretization,
            args["deltaA"],
            initial_state,
            **native,
        )
    if flip:
        y = y.flip(-1)
        if cu is not None:
            last_state = last_state.flip(0)
    y = y.to(out_dtype)
    return (y, last_state) if want_final else y


def selective_scan_ref(*args, **kwargs) -> Tensor | tuple[Tensor, Tensor]:
    """:func:`selective_scan_fn` on the ``reference`` backend (the plain loop over time, the
    specification), under mamba_ssm's name for its reference: the same arguments (``backend``
    excepted) and results."""
    if "backend" in kwargs:
        raise TypeError("selective_scan_ref: backend is always 'reference'")
    return selective_scan_fn(*args, backend="reference", **kwargs)


def _reference_signature() -> inspect.Signature:
    """selective_scan_fn's signature without ``backend`` (``reverse``, after it, by keyword)."""
    signature = inspect.signature(selective_scan_fn)
    params = [p for n, p in signature.parameters.items() if n != "backend"]
    keyword = inspect.Parameter.KEYWORD_ONLY
    return signature.replace(
        parameters=[p.replace(kind=keyword) if p.name == "reverse" else p for p in params]
    )


selective_scan_ref.__signature__ = _reference_signature()  # type: ignore[attr-defined]


def _empty_scan(u: Tensor, delta: Tensor, A: Tensor, initial_state, want_final: bool, nstates: int):
    """selective_scan_fn's result for an empty u (b, d or L is 0): an empty y, attached to the
    inputs' graph, and the last state ``initial_state`` (no step changes it) or zeros
    (nstates, d, n): b states, or S with packed sequences."""
    y = (u * delta).to(u.dtype)
    d = u.shape[1]
    if initial_state is None:
        last = _torch.zeros(nstates, d, A.shape[1], dtype=A.dtype, device=u.device)
    else:
        last = initial_state.clone()
    return (y, last) if want_final else y

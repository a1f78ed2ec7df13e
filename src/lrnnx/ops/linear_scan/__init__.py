"""``linear_scan``: h_t = a_t * h_{t-1} + b_t along the time axis (dim 1).

Backends (same signature, same results):

- ``reference``: a plain Python loop, the specification.
- ``torch``: chunked parallel scan in pure torch, any device, with a backward that is itself a
  reverse scan (memory O(output)).
- ``cpu``: one fused pass compiled by numba at first use (the CPU default when numba is
  installed); same autograd wiring as ``torch``.
- ``triton``: the same fused pass for CUDA tensors, JIT-compiled by Triton (the CUDA default).

Pick one with ``backend=`` or ``LRNNX_BACKEND``; otherwise the fastest available for the device.

Packed sequences (``cu_seqlens``, fla's convention; see :mod:`lrnnx.ops.linear_scan.packing`):
every backend takes per-step restart flags (``resets``, (L,) bool) and natively replaces the
carried state there (h_t = b_t), forward and in its adjoint scan; this function sets the flags
where each sequence's scan begins and adds a_t h0_s to b_t there.  The restart selects rather
than multiplies the carried state by zero, because 0 * nan = 0 * inf = nan: a non-finite value
inside one sequence (its inputs, or its state overflowing) stays in that sequence.
"""

from __future__ import annotations

from typing import Optional, Union

import torch as _torch  # the sibling module `torch.py` takes the name `torch` here
from torch import Tensor

from lrnnx.core.checks import check_bool, check_cu_seqlens, check_tensor
from lrnnx.ops import _dispatch
from lrnnx.ops.linear_scan.packing import scan_bounds

_dispatch.register("linear_scan", "reference", "lrnnx.ops.linear_scan.reference:linear_scan")
_dispatch.register("linear_scan", "torch", "lrnnx.ops.linear_scan.torch:linear_scan")
_dispatch.register("linear_scan", "cpu", "lrnnx.ops.linear_scan.cpu:linear_scan")
_dispatch.register("linear_scan", "triton", "lrnnx.ops.linear_scan.triton:linear_scan")

_LOW_PRECISION = (_torch.float16, _torch.bfloat16)


def _final_state_flag(output_final_state, alias, alias_name: str) -> bool:
    """``output_final_state`` (fla's name) or its alias; both given and different: an error.
    Each is None or a bool (a tensor there, from arguments in another function's order, is a
    TypeError naming it, not torch's "ambiguous truth value")."""
    if output_final_state is not None:
        check_bool("output_final_state", output_final_state)
    if alias is not None:
        check_bool(alias_name, alias)
    if output_final_state is not None and alias is not None:
        if bool(output_final_state) != bool(alias):
            raise ValueError(
                f"output_final_state={output_final_state!r} and {alias_name}={alias!r} "
                f"disagree: {alias_name} is an alias, give one of them"
            )
    if output_final_state is not None:
        return bool(output_final_state)
    return bool(alias)


def linear_scan(
    a: Tensor,
    b: Tensor,
    initial_state: Optional[Tensor] = None,
    reverse: bool = False,
    return_final_state: Optional[bool] = None,
    backend: Optional[str] = None,
    *,
    output_final_state: Optional[bool] = None,
    cu_seqlens: Optional[Tensor] = None,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """First-order linear recurrence over time.

    Args:
        a: decay, broadcastable to ``b`` (e.g. (B, L, *C), (1, 1, *C) or (*C,) trailing).
        b: input, (B, L, *C), real or complex.
        initial_state: h_{-1} (or h_L when ``reverse``), shape (B, *C); (S, *C), one per
            sequence, with ``cu_seqlens``.  Zero when None.
        reverse: run from the last timestep to the first: h_t = a_t h_{t+1} + b_t (with
            ``cu_seqlens``: each sequence from its own last step to its first).
        return_final_state: alias of ``output_final_state`` (giving both with different
            values is an error).
        backend: force a backend ("reference", "torch", ...).
        output_final_state: also return the state after the last processed step, (B, *C)
            (``initial_state``, or zeros, when there are no steps); (S, *C) with ``cu_seqlens``.
        cu_seqlens: packed sequences (fla's convention): int32/int64 offsets (S + 1,) with
            ``cu_seqlens[0] = 0``, ``cu_seqlens[-1] = L`` and no decrease; B must be 1, and
            sequence s is steps ``cu_seqlens[s]:cu_seqlens[s + 1]`` (zero-length ones allowed:
            their final state is their initial state).  The result equals scanning each
            sequence alone (outputs, final states and gradients).

    Returns:
        h of shape (B, L, *C) in the promoted dtype of (a, b) [, final state (B, *C) or
        (S, *C)].  bfloat16/float16 inputs are accumulated in float32 and h is returned in their
        dtype, the final state in float32 (a state stays float32, whatever L); with a complex
        ``initial_state`` the result is complex (complex64).  An empty batch (B = 0) or
        sequence (L = 0) gives an empty h.

    Raises:
        TypeError: a, b or initial_state is not a floating-point or complex tensor.
        ValueError: shapes that do not fit (see above), a or initial_state on another device
            than b, malformed ``cu_seqlens``, or an unknown backend.

    With ``cu_seqlens`` the recurrence restarts at each sequence's first step (its last with
    ``reverse``): h_t = a_t h0_s + b_t there, whatever the state before, so nothing (not even a
    nan or inf of another sequence) crosses a boundary, forward or in the adjoint scan of the
    backward; the final states are read at each sequence's end.
    """
    check_tensor("b", b, complex_ok=True)
    check_tensor("a", a, b.device, complex_ok=True, device_of="b")
    if initial_state is not None:
        check_tensor("initial_state", initial_state, b.device, complex_ok=True, device_of="b")
    want_final = _final_state_flag(output_final_state, return_final_state, "return_final_state")
    if b.dim() < 2:
        raise ValueError(f"b: expected shape (B, L, *C) with at least 2 dims, got {tuple(b.shape)}")
    try:
        shape = _torch.broadcast_shapes(a.shape, b.shape)
    except RuntimeError:
        raise ValueError(
            f"a: expected a shape broadcastable to b's {tuple(b.shape)}, got {tuple(a.shape)}"
        ) from None
    if shape != b.shape:
        raise ValueError(f"a: broadcasting {tuple(a.shape)} would enlarge b's {tuple(b.shape)}")
    cu = None
    if cu_seqlens is not None:
        cu = check_cu_seqlens(cu_seqlens, b.shape[0], b.shape[1], f"b {tuple(b.shape)}")
    dtype = _torch.promote_types(a.dtype, b.dtype)
    out_dtype = dtype
    if dtype in _LOW_PRECISION:
        dtype = _torch.float32
    lead = b.shape[0] if cu is None else cu.shape[0] - 1
    state_shape = (lead,) + tuple(b.shape[2:])
    if initial_state is not None:
        if tuple(initial_state.shape) != state_shape:
            label = "(S, *C), one per sequence" if cu is not None else "(B, *C)"
            raise ValueError(
                f"initial_state: expected shape {state_shape} {label}, got "
                f"{tuple(initial_state.shape)}"
            )
        if initial_state.is_complex() and not dtype.is_complex:
            dtype = _torch.promote_types(dtype, initial_state.dtype)
        initial_state = initial_state.to(dtype)
    # h goes back to a 16-bit input dtype, unless a complex initial state made it complex
    narrow = out_dtype if out_dtype in _LOW_PRECISION and not dtype.is_complex else None
    a = a.to(dtype).expand(b.shape)
    b = b.to(dtype)
    if b.numel() == 0:  # no batch or no steps: nothing to scan, the state stays
        h = a * b  # the empty output, still attached to the inputs' graph
        if initial_state is None:
            initial_state = b.new_zeros(state_shape)
        h = h if narrow is None else h.to(narrow)
        return (h, initial_state.clone()) if want_final else h
    fn = _dispatch.resolve("linear_scan", b.device, backend, (a, b, initial_state))
    with _dispatch.no_autocast(b.device):
        if cu is not None:
            h, final = _packed(fn, a, b, initial_state, reverse, cu, want_final)
        else:
            h = fn(a, b, initial_state, reverse)
            final = (h[:, 0] if reverse else h[:, -1]) if want_final else None
    h = h if narrow is None else h.to(narrow)
    return (h, final) if want_final else h


def _packed(
    fn, a, b, h0, reverse: bool, cu: Tensor, want_final: bool
) -> tuple[Tensor, Optional[Tensor]]:
    """Packed sequences through any backend ``fn``: restart flags where each sequence's scan
    begins (the backend replaces the carried state there: h_t = b_t), b += a h0_s at those
    steps, and the final states read where each sequence ends.  Gradients: the backend's
    adjoint scan restarts too (nothing flows back across a boundary) and gives a zero gradient
    to a at a restart; autograd through b += a h0_s adds g conj(h0_s) to it and conj(a) g to
    h0_s.  No loop over sequences: a few index operations.  Returns h and the final states
    (None unless ``want_final``), in the compute dtype."""
    nonempty, begin, end = scan_bounds(cu, reverse)
    device = b.device
    ids = nonempty.nonzero().squeeze(1)
    starts = begin[ids].to(device)
    resets = _torch.zeros(b.shape[1], dtype=_torch.bool, device=device)
    resets[starts] = True
    if h0 is not None:
        b = b.index_add(
            1, starts, a.index_select(1, starts) * h0.index_select(0, ids.to(device))[None]
        )
    h = fn(a, b, None, reverse, resets)
    if not want_final:
        return h, None
    final = h[0].index_select(0, end.to(device))
    if not bool(nonempty.all()):  # zero-length sequences keep their initial state
        keep = h0.to(final.dtype) if h0 is not None else final.new_zeros(())
        mask = nonempty.to(device).view((-1,) + (1,) * (final.dim() - 1))
        final = _torch.where(mask, final, keep)
    return h, final

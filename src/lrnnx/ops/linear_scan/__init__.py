"""``linear_scan``: h_t = a_t * h_{t-1} + b_t along the time axis (dim 1).

Backends (same signature, same results):

- ``reference``: a plain Python loop, the specification.
- ``torch``: chunked parallel scan in pure torch, any device, with a backward that is itself a
  reverse scan (memory O(output)).
- ``cpu``: one fused pass compiled by numba at first use (the CPU default when numba is
  installed); same autograd wiring as ``torch``.
- ``triton``: the same fused pass for CUDA tensors, JIT-compiled by Triton (the CUDA default).

Pick one with ``backend=`` or ``LRNNX_BACKEND``; otherwise the fastest available for the device.
"""

from __future__ import annotations

from typing import Optional, Union

import torch as _torch  # the sibling module `torch.py` takes the name `torch` here
from torch import Tensor

from lrnnx.ops import _dispatch

_dispatch.register("linear_scan", "reference", "lrnnx.ops.linear_scan.reference:linear_scan")
_dispatch.register("linear_scan", "torch", "lrnnx.ops.linear_scan.torch:linear_scan")
_dispatch.register("linear_scan", "cpu", "lrnnx.ops.linear_scan.cpu:linear_scan")
_dispatch.register("linear_scan", "triton", "lrnnx.ops.linear_scan.triton:linear_scan")

_LOW_PRECISION = (_torch.float16, _torch.bfloat16)


def linear_scan(
    a: Tensor,
    b: Tensor,
    initial_state: Optional[Tensor] = None,
    reverse: bool = False,
    return_final_state: bool = False,
    backend: Optional[str] = None,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """First-order linear recurrence over time.

    Args:
        a: decay, broadcastable to ``b`` (e.g. (B, L, *C), (1, 1, *C) or (*C,) trailing).
        b: input, (B, L, *C), real or complex.
        initial_state: h_{-1} (or h_L when ``reverse``), shape (B, *C). Zero when None.
        reverse: run from the last timestep to the first: h_t = a_t h_{t+1} + b_t.
        return_final_state: also return the state after the last processed step, (B, *C)
            (``initial_state``, or zeros, when there are no steps).
        backend: force a backend ("reference", "torch", ...).

    Returns:
        h of shape (B, L, *C) in the promoted dtype of (a, b) [, final state (B, *C)].
        bfloat16/float16 inputs are accumulated in float32 and returned in their dtype.
        An empty batch (B = 0) or sequence (L = 0) gives an empty h.
    """
    if not isinstance(a, Tensor) or not isinstance(b, Tensor):
        raise TypeError("linear_scan: a and b must be torch.Tensor")
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
    dtype = _torch.promote_types(a.dtype, b.dtype)
    out_dtype = dtype
    if dtype in _LOW_PRECISION:
        dtype = _torch.float32
    state_shape = (b.shape[0],) + tuple(b.shape[2:])
    if initial_state is not None:
        if tuple(initial_state.shape) != state_shape:
            raise ValueError(
                f"initial_state: expected shape {state_shape}, got {tuple(initial_state.shape)}"
            )
        if initial_state.is_complex() and not dtype.is_complex:
            dtype = _torch.promote_types(dtype, initial_state.dtype)
        initial_state = initial_state.to(dtype)
    a = a.to(dtype).expand(b.shape)
    b = b.to(dtype)
    if b.numel() == 0:  # no batch or no steps: nothing to scan, the state stays
        h = a * b  # the empty output, still attached to the inputs' graph
        if initial_state is None:
            initial_state = b.new_zeros(state_shape)
        if out_dtype in _LOW_PRECISION:
            h = h.to(out_dtype)
        return (h, initial_state.clone()) if return_final_state else h
    fn = _dispatch.resolve("linear_scan", b.device, backend)
    h = fn(a, b, initial_state, reverse)
    if out_dtype in _LOW_PRECISION:
        h = h.to(out_dtype)
    if return_final_state:
        return h, (h[:, 0] if reverse else h[:, -1])
    return h

"""``causal_conv1d``: the depthwise causal convolution of Mamba and Griffin (RG-LRU), with the
signature of Dao-AILab's ``causal_conv1d_fn`` (its arguments, in its order: ``seq_idx`` and
``final_states_out`` included).

Backends (same signature, same results):

- ``reference``: a plain Python loop over time, the specification.
- ``torch``: ``F.conv1d`` on the padded window, any device; autograd is torch's.
- ``cpu``: fused numba forward and backward kernels (the CPU default when numba is installed):
  one pass over x in each direction, rows (batch, channel) in parallel, the pre-activation
  recomputed in backward.  Replaces ``aten::convolution_backward``, which on some CPUs takes
  seconds for this depthwise shape.

Packed sequences (``cu_seqlens``, fla's convention) are native in every backend: the window of
each step stops at its sequence's first step and takes the rest from that sequence's initial
states (no loop over sequences in Python; the torch backend convolves the padded window of
:mod:`lrnnx.ops.causal_conv1d.packing` once).

Pick one with ``backend=`` or ``LRNNX_BACKEND``; otherwise the fastest available for the device
(the CUDA default is ``torch``: cuDNN's depthwise kernels).
"""

from __future__ import annotations

from typing import Optional, Union

import torch as _torch  # the sibling module `torch.py` takes the name `torch` here
from torch import Tensor

from lrnnx.core.checks import check_bool, check_cu_seqlens, check_tensor
from lrnnx.ops import _dispatch
from lrnnx.ops.causal_conv1d.packing import padded_window, segment_tails

__all__ = ["causal_conv1d", "ACTIVATIONS"]

_dispatch.register("causal_conv1d", "reference", "lrnnx.ops.causal_conv1d.reference:causal_conv1d")
_dispatch.register("causal_conv1d", "torch", "lrnnx.ops.causal_conv1d.torch:causal_conv1d")
_dispatch.register("causal_conv1d", "cpu", "lrnnx.ops.causal_conv1d.cpu:causal_conv1d")

_LOW_PRECISION = (_torch.float16, _torch.bfloat16)

#: accepted values of ``activation`` ("swish" is another name of silu)
ACTIVATIONS = (None, "silu", "swish")


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    seq_idx: Optional[Tensor] = None,
    initial_states: Optional[Tensor] = None,
    return_final_states: bool = False,
    final_states_out: Optional[Tensor] = None,
    activation: Optional[str] = None,
    backend: Optional[str] = None,
    *,
    cu_seqlens: Optional[Tensor] = None,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Depthwise causal convolution along time, channel by channel::

        y_t = bias + sum_{j < K} weight[:, j] * xpad_{t + j},     t = 0 .. L - 1

    where ``xpad`` is x with the K - 1 entries of ``initial_states`` (zeros when None) before
    it: weight[:, K - 1] multiplies the current input, weight[:, 0] the oldest.  Then
    ``silu(y)`` when ``activation`` is ``"silu"`` or ``"swish"``.

    With ``cu_seqlens`` x (1, D, T) holds S sequences back to back and each is convolved as if
    alone: its window starts with its own K - 1 initial states (``initial_states`` (S, D, K - 1))
    and never reaches into the previous sequence; y, the final states (S, D, K - 1) and every
    gradient equal those of S separate calls.

    Args:
        x: input (B, D, L).
        weight: (D, K), K >= 1 (an ``nn.Conv1d(D, D, K, groups=D)`` weight is (D, 1, K):
            pass ``weight[:, 0]``).
        bias: (D,) or None.
        seq_idx: causal-conv1d's form of packed sequences: integer ids (B, L).  Ids (1, L)
            that are >= 0 and non-decreasing are turned into ``cu_seqlens`` (give one or the
            other; initial and final states then work per sequence).  Any other ids (a batch of
            rows, -1 for padding) take causal-conv1d's rule as it is: y_t sums only the taps
            whose position has t's id, and is 0 where the id is negative; as there, no
            ``initial_states`` or final states then.
        initial_states: (B, D, K - 1) the inputs before x (a previous call's final states);
            zeros when None.  (S, D, K - 1), one per sequence, with ``cu_seqlens``.
        return_final_states: also return the last K - 1 entries of ``xpad`` (B, D, K - 1):
            what the next call takes as ``initial_states`` to continue the sequence.  With
            L < K - 1 they reach back into ``initial_states``.  (S, D, K - 1) with
            ``cu_seqlens``, each sequence's own (a zero-length sequence's: its initial states).
        final_states_out: a tensor of the final states' shape to write them into (and return),
            as causal-conv1d's; needs ``return_final_states``.
        activation: None, ``"silu"`` or ``"swish"``.
        backend: force a backend ("reference", "torch", "cpu").
        cu_seqlens: int64 (or int32) offsets (S + 1,) of S packed sequences, keyword-only:
            ``cu_seqlens[0] = 0``, ``cu_seqlens[-1] = T``, non-decreasing (repeats are
            zero-length sequences); x must be (1, D, T).  Validated on the host (one sync).

    Returns:
        y (B, D, L) in x's dtype [, final states (B, D, K - 1) in x's dtype].  float32 and
        float64 are computed in the widest dtype of the inputs; bfloat16/float16 are
        accumulated in float32.  Differentiable in x, weight, bias and initial_states (the
        final states too: they are entries of x or of initial_states).  An empty batch or
        sequence gives an empty y (and the final states: initial_states, or zeros).

    Raises:
        TypeError: an argument is not a real floating-point tensor, ``return_final_states`` is
            not a bool (a tensor there: arguments passed in another function's order), or
            ``seq_idx`` is not an integer tensor.
        ValueError: a shape does not fit x's (B, D, L), a tensor is on another device, the
            activation is unknown, ``cu_seqlens`` is malformed or given with B != 1,
            ``seq_idx`` is not (B, L), both are given, ``seq_idx`` under causal-conv1d's rule
            comes with initial or final states, or ``final_states_out`` is given without
            ``return_final_states`` or in another shape.
    """
    return_final_states = check_bool("return_final_states", return_final_states)
    check_tensor("x", x)
    if x.dim() != 3:
        raise ValueError(f"x: expected shape (B, D, L) = (batch, channels, length), got "
                         f"{tuple(x.shape)}")  # fmt: skip
    B, D, L = x.shape
    device = x.device
    check_tensor("weight", weight, device)
    if weight.dim() != 2 or weight.shape[0] != D or weight.shape[1] < 1:
        raise ValueError(
            f"weight: expected shape (D, K) = ({D}, K) with K >= 1 (x has D={D} channels), "
            f"got {tuple(weight.shape)}"
        )
    K = weight.shape[1]
    cu = None
    ids = None  # seq_idx that is not a packing of x (1, D, L): causal-conv1d's masked taps
    if seq_idx is not None:
        if cu_seqlens is not None:
            raise ValueError("seq_idx, cu_seqlens: two forms of packed sequences; give one")
        ids = _check_seq_idx(seq_idx, B, L, device)
        if B == 1 and not _masked_ids(ids):
            cu_seqlens, ids = _offsets_of(ids, L), None
        elif initial_states is not None or return_final_states:
            raise ValueError(
                "seq_idx: ids of a batch of rows or with padding (-1) take causal-conv1d's rule, "
                "which has no initial_states or final states (as causal_conv1d_fn); pack the "
                "sequences into x (1, D, T) with cu_seqlens for those"
            )
    if cu_seqlens is not None:
        cu = check_cu_seqlens(cu_seqlens, B, L, f"x {tuple(x.shape)} (1, D, T)")
    if bias is not None:
        check_tensor("bias", bias, device)
        if tuple(bias.shape) != (D,):
            raise ValueError(f"bias: expected shape (D,) = ({D},), got {tuple(bias.shape)}")
    if initial_states is not None:
        check_tensor("initial_states", initial_states, device)
        rows, label = (B, "B") if cu is None else (cu.shape[0] - 1, "S")
        if tuple(initial_states.shape) != (rows, D, K - 1):
            raise ValueError(
                f"initial_states: expected shape ({label}, D, K - 1) = ({rows}, {D}, {K - 1}), "
                f"got {tuple(initial_states.shape)}"
            )
    if not (activation is None or (isinstance(activation, str) and activation in ACTIVATIONS)):
        raise ValueError(f"activation: expected one of {list(ACTIVATIONS)}, got {activation!r}")
    silu = activation is not None

    out_dtype = x.dtype
    dtype = out_dtype
    for t in (weight, bias, initial_states):
        if t is not None:
            dtype = _torch.promote_types(dtype, t.dtype)
    if dtype in _LOW_PRECISION:
        dtype = _torch.float32
    xc, wc = x.to(dtype), weight.to(dtype)
    bc = None if bias is None else bias.to(dtype)
    hc = None if initial_states is None else initial_states.to(dtype)

    if ids is not None and x.numel():
        _dispatch.resolve("causal_conv1d", device, backend, (xc, wc, bc))  # (a bad name: named)
        y = _masked_taps(xc, wc, bc, ids, silu)
    elif x.numel() == 0:  # no batch, channel or step: an empty y, still attached to the inputs
        y = xc * wc.sum(-1)[:, None]
        if bc is not None:
            y = y + bc[:, None]
        if hc is not None:  # (1, D, 1): broadcasts to y whether hc has B rows or S
            y = y + hc.sum((0, 2), keepdim=True)
    else:
        inputs = (xc, wc, bc, hc)
        fn = _dispatch.resolve("causal_conv1d", device, backend, inputs)
        with _dispatch.no_autocast(device):
            y = fn(xc, wc, bc, hc, silu) if cu is None else fn(xc, wc, bc, hc, silu, cu)
    y = y.to(out_dtype)
    if not return_final_states:
        if final_states_out is not None:
            raise ValueError("final_states_out: given without return_final_states=True")
        return y
    if cu is not None:
        final = _packed_final_states(x, initial_states, cu, K)
    else:
        final = _final_states(x, initial_states, K)
    if final_states_out is not None:
        check_tensor("final_states_out", final_states_out, device)
        if final_states_out.shape != final.shape:
            raise ValueError(
                f"final_states_out: expected shape {tuple(final.shape)}, got "
                f"{tuple(final_states_out.shape)}"
            )
        final = final_states_out.copy_(final)
    return y, final


def _check_seq_idx(seq_idx: object, batch: int, length: int, device) -> Tensor:
    """causal-conv1d's ``seq_idx``, checked: an integer tensor (B, L) on x's device, as int64.

    Raises:
        TypeError: not an integer tensor.
        ValueError: another shape or device.
    """
    if not isinstance(seq_idx, Tensor) or seq_idx.is_floating_point() or seq_idx.is_complex():
        got = seq_idx.dtype if isinstance(seq_idx, Tensor) else type(seq_idx).__name__
        raise TypeError(f"seq_idx: expected an integer tensor (B, L), got {got}")
    if tuple(seq_idx.shape) != (batch, length):
        raise ValueError(
            f"seq_idx: expected shape (B, L) = ({batch}, {length}) (x's batch and length), "
            f"got {tuple(seq_idx.shape)}"
        )
    if seq_idx.device != device:
        raise ValueError(f"seq_idx: expected a tensor on {device} (x's), got {seq_idx.device}")
    return seq_idx.to(_torch.int64)


def _masked_ids(ids: Tensor) -> bool:
    """Whether ids (1, L) need causal-conv1d's masked rule: a negative (padding) id, or ids
    that decrease (a sequence in two pieces), which packed offsets cannot express."""
    row = ids[0]
    return bool((row < 0).any()) or bool((row[1:] < row[:-1]).any())


def _offsets_of(ids: Tensor, length: int) -> Tensor:
    """Ids (1, L), >= 0 and non-decreasing -> ``cu_seqlens`` (S + 1,): a sequence where the
    id changes."""
    row = ids[0]
    starts = (row[1:] != row[:-1]).nonzero().squeeze(1) + 1
    ends = _torch.tensor([0, length], dtype=_torch.int64, device=row.device)
    return _torch.cat([ends[:1], starts, ends[1:]]) if length else ends[:1].repeat(2)


def _masked_taps(x: Tensor, weight: Tensor, bias: Optional[Tensor], ids: Tensor, silu: bool):
    """causal-conv1d's rule for ``seq_idx`` (B, L): y_t = bias + sum_j weight[:, j] x_s [ids_s
    == ids_t] over the taps s = t - K + 1 + j >= 0, silu, then 0 where ids_t < 0 (padding).
    Torch operations (autograd is torch's), one pass per tap: x (B, D, L) -> y (B, D, L)."""
    K = weight.shape[1]
    L = x.shape[2]
    xpad = _torch.nn.functional.pad(x, (K - 1, 0))
    idpad = _torch.nn.functional.pad(ids, (K - 1, 0), value=-1)  # (before x: no tap)
    y = x.new_zeros(x.shape) if bias is None else bias[:, None].expand(x.shape).clone()
    for j in range(K):
        same = (idpad[:, j : j + L] == ids)[:, None, :]  # (B, 1, L)
        y = y + _torch.where(same, weight[:, j, None] * xpad[..., j : j + L], 0.0)
    if silu:
        y = _torch.nn.functional.silu(y)
    return _torch.where((ids >= 0)[:, None, :], y, 0.0)


def _final_states(x: Tensor, initial_states: Optional[Tensor], K: int) -> Tensor:
    """The last K - 1 entries of [initial_states, x] along time, (B, D, K - 1), in x's dtype."""
    B, D, L = x.shape
    P = K - 1
    if L >= P:
        return x[..., L - P :].clone()
    if initial_states is None:
        head = x.new_zeros(B, D, P - L)
    else:
        head = initial_states[..., L:].to(x.dtype)
    return _torch.cat([head, x], dim=-1)


def _packed_final_states(x: Tensor, initial_states: Optional[Tensor], cu: Tensor, K: int) -> Tensor:
    """Each packed sequence's last K - 1 entries of [its initial states, its inputs], (S, D,
    K - 1) in x's dtype: read from the padded window (index arithmetic, differentiable)."""
    cu = cu.to(x.device)
    return segment_tails(padded_window(x, initial_states, cu, K - 1), cu, K - 1, K - 1)

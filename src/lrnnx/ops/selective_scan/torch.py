"""Chunked selective scan in pure torch; runs on any device with O(b d n CHUNK) memory.

The full state tensor (b, d, L, n) is never formed.  Forward walks the sequence in chunks of
``CHUNK`` steps: it discretizes the chunk, runs the in-chunk recurrence from the carried state
with the parallel :func:`lrnnx.ops.linear_scan.torch.linear_scan`, contracts with C at once and
keeps only the state at each chunk start (b, d, n).

Backward walks the chunks in reverse.  Each chunk is recomputed with autograd enabled from its
saved start state (a detached leaf), and ``torch.autograd.grad`` pulls back the incoming
dy of that chunk together with the gradient arriving at the chunk's end state; the gradient
at the start state is what flows into the previous chunk.  Peak memory is therefore one
chunk's graph, and the Python loop runs over chunks, never over time steps.

``reverse`` (time from the last step to the first) is native: the chunks are processed from the
last to the first, each with a reverse in-chunk scan, and backward walks them in the opposite
order (from the first chunk to the last).

Packed sequences (``cu_seqlens``, batch 1) are native too: in a chunk holding the step where a
sequence's scan begins, A_bar h0_s is added to that step's input (``index_add`` on the chunk's
few restart steps) and the in-chunk scan gets a restart flag there, so it replaces the carried
state (h_t = A_bar_t h0_s + x_t) and its adjoint carries nothing back across it.  A select, not
A_bar := 0: 0 * nan = 0 * inf = nan, so a non-finite state in one sequence would reach every
later one.  The states at the steps where sequences end are the final states.  The sequences'
initial states are one leaf shared by every chunk in backward, like A.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lrnnx.core.autograd import first_order
from lrnnx.ops.linear_scan.packing import scan_bounds
from lrnnx.ops.linear_scan.torch import linear_scan
from lrnnx.ops.selective_scan.reference import discretize, effective_delta

#: time steps per chunk; 64 matches linear_scan's own chunk, so each in-chunk scan is one pass
CHUNK = 64

# argument positions of the tensors in SelectiveScanFunction.apply (and _chunk, after h0)
_U, _DELTA, _A, _B, _C, _D, _Z, _BIAS, _DELTAA, _H0 = range(10)
# inputs that reach the state: only when one of them needs a gradient must it flow between chunks
_REACH_STATE = (_U, _DELTA, _A, _B, _BIAS, _DELTAA, _H0)


def _varies(i: int, x: Tensor | None) -> bool:
    """Whether argument ``i`` has a time axis: u, delta, z, deltaA, and B/C when (b, g, n, L)."""
    if x is None:
        return False
    return i in (_U, _DELTA, _Z, _DELTAA) or (i in (_B, _C) and x.dim() == 4)


def _apply_B(x: Tensor, B: Tensor) -> Tensor:
    """x (b, T, d, n or 1) times B, where B is (d, n) or a chunk (b, g, n, T); gives (b, T, d, n)."""
    if B.dim() == 2:
        return x * B
    b, T, d = x.shape[:3]
    g = B.shape[1]
    Bg = B.permute(0, 3, 1, 2)[:, :, :, None, :]  # (b, T, g, 1, n)
    return (x.reshape(b, T, g, d // g, x.shape[-1]) * Bg).reshape(b, T, d, -1)


def _contract_C(h: Tensor, C: Tensor) -> Tensor:
    """sum_k C[k] h[k] for states h (b, T, d, n) and C (d, n) or a chunk (b, g, n, T)."""
    C = C.to(h.dtype)  # einsum wants one dtype; real C with complex states is the common case
    if C.dim() == 2:
        return torch.einsum("btdn,dn->btd", h, C)
    b, T, d, n = h.shape
    g = C.shape[1]
    y = torch.einsum("btgen,bgnt->btge", h.reshape(b, T, g, d // g, n), C)
    return y.reshape(b, T, d)


def _chunk(
    h0: Tensor,
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    deltaA: Tensor | None,
    delta_softplus: bool,
    discretization: str,
    reverse: bool = False,
    begins: Tensor | None = None,
    h_begin: Tensor | None = None,
    ends: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """One chunk of T steps from state h0 (b, d, n); time-varying inputs are their chunk slices.

    Packed sequences (b = 1): ``begins`` (k,) are the chunk's steps where a sequence's scan
    begins, whose state restarts from ``h_begin`` (k, d, n) (zeros when None); ``ends`` (m,)
    the steps where one ends.

    Returns y (b, d, T), the state after the chunk's last processed step (b, d, n): its last
    step, or its first with ``reverse`` (then h0 is the state after the chunk's end), and the
    states at ``ends`` (m, d, n) (None without ``ends``).
    """
    dt = effective_delta(delta, delta_bias, delta_softplus)
    # time-major (b, T, d, 1) so the scan runs along dim 1 and A (d, n) broadcasts from the right
    A_bar, gamma_bar = discretize(
        A,
        dt.transpose(1, 2)[..., None],
        None if deltaA is None else deltaA.transpose(1, 2)[..., None],
        discretization,
    )
    bu = _apply_B(gamma_bar * u.transpose(1, 2)[..., None], B)  # (b, T, d, n)
    A_bar = A_bar.expand(bu.shape)
    dtype = torch.promote_types(A_bar.dtype, bu.dtype)
    A_bar, bu = A_bar.to(dtype), bu.to(dtype)
    resets = None
    if begins is not None:  # restart: h_t = A_bar_t h0_s + x_t, nothing carried in
        if h_begin is not None:
            bu = bu.index_add(1, begins, A_bar.index_select(1, begins) * h_begin.to(dtype)[None])
        resets = torch.zeros(bu.shape[1], dtype=torch.bool, device=bu.device)
        resets[begins] = True
    h = linear_scan(A_bar, bu, h0.to(dtype), reverse, resets)  # (b, T, d, n)
    y = _contract_C(h, C)
    if A.is_complex():  # conjugate-pair convention, as in the reference
        y = 2 * y.real
    y = y.transpose(1, 2)
    if D is not None:
        y = y + D[:, None] * u
    if z is not None:
        y = y * F.silu(z)
    finals = None if ends is None else h[0].index_select(0, ends)
    return y, (h[:, 0] if reverse else h[:, -1]), finals


class _Packed:
    """Packed sequences (batch 1): the steps where sequences' scans begin and end, per chunk."""

    def __init__(self, cu: Tensor, reverse: bool, device: torch.device):
        nonempty, begin, end = scan_bounds(cu, reverse)
        ids = nonempty.nonzero().squeeze(1)
        self.nseq = cu.shape[0] - 1
        self.empty = ~nonempty  # (S,) on the host
        # both increasing over the non-empty sequences, so a chunk's are a contiguous run
        self.begin, self.end, self.ids = begin[ids], end[ids], ids
        self.device = device

    def chunk(self, s: int, e: int) -> tuple[Tensor | None, ...]:
        """Steps s <= t < e where a scan begins and where one ends: (positions - s, sequence)
        for each, on the device; None where there are none."""
        out: list[Tensor | None] = []
        for pos in (self.begin, self.end):
            i, j = torch.searchsorted(pos, torch.tensor([s, e])).tolist()
            if i == j:
                out += [None, None]
            else:
                out += [(pos[i:j] - s).to(self.device), self.ids[i:j].to(self.device)]
        return tuple(out)


def _chunk_ranges(L: int, chunk: int, reverse: bool) -> list[tuple[int, int]]:
    """(start, end) of each chunk, in the order the scan processes them."""
    ranges = [(s, min(s + chunk, L)) for s in range(0, L, chunk)]
    return ranges[::-1] if reverse else ranges


def _forward(
    inputs: tuple[Tensor | None, ...],
    initial_state: Tensor | None,
    delta_softplus: bool,
    discretization: str,
    chunk: int,
    reverse: bool = False,
    packed: _Packed | None = None,
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Run the chunks in processing order without autograd; returns y, the last state (the
    final states (S, d, n) when ``packed``) and the state each chunk starts from (in
    processing order, see :func:`_chunk_ranges`)."""
    u, A, B = inputs[_U], inputs[_A], inputs[_B]
    b, d, L = u.shape
    state_dtype = torch.promote_types(A.dtype, u.dtype)
    if B.is_complex():
        state_dtype = torch.promote_types(state_dtype, B.dtype)
    if initial_state is None or packed is not None:
        h = u.new_zeros((b, d, A.shape[1]), dtype=state_dtype)
    else:
        h = initial_state.to(state_dtype)
    finals = None
    if packed is not None:  # a zero-length sequence keeps its initial state
        if initial_state is None:
            finals = u.new_zeros((packed.nseq, d, A.shape[1]), dtype=state_dtype)
        else:
            finals = initial_state.to(state_dtype).clone()
    y = u.new_empty(b, d, L)
    starts = []
    with torch.no_grad():
        for s, e in _chunk_ranges(L, chunk, reverse):
            starts.append(h)
            args = [x[..., s:e] if _varies(i, x) else x for i, x in enumerate(inputs)]
            kw, end_seq = _packed_kwargs(packed, s, e, initial_state)
            y[..., s:e], h, f = _chunk(h, *args, delta_softplus, discretization, reverse, **kw)
            if f is not None:
                finals[end_seq] = f
    return y, (h if packed is None else finals), starts


def _packed_kwargs(
    packed: _Packed | None, s: int, e: int, h0: Tensor | None
) -> tuple[dict, Tensor | None]:
    """:func:`_chunk`'s restart arguments for chunk [s, e), and the sequences ending in it."""
    if packed is None:
        return {}, None
    begins, begin_seq, ends, end_seq = packed.chunk(s, e)
    h_begin = None if begins is None or h0 is None else h0.index_select(0, begin_seq)
    return dict(begins=begins, h_begin=h_begin, ends=ends), end_seq


class SelectiveScanFunction(torch.autograd.Function):
    """Chunked forward that keeps only chunk-start states; backward recomputes chunk by chunk."""

    @staticmethod
    def forward(
        ctx,
        u: Tensor,
        delta: Tensor,
        A: Tensor,
        B: Tensor,
        C: Tensor,
        D: Tensor | None,
        z: Tensor | None,
        delta_bias: Tensor | None,
        deltaA: Tensor | None,
        initial_state: Tensor | None,
        delta_softplus: bool,
        discretization: str,
        chunk: int,
        reverse: bool,
        packed: _Packed | None = None,
    ) -> tuple[Tensor, Tensor]:
        inputs = (u, delta, A, B, C, D, z, delta_bias, deltaA)
        y, h, starts = _forward(
            inputs, initial_state, delta_softplus, discretization, chunk, reverse, packed
        )
        ctx.chunk, ctx.reverse, ctx.packed = chunk, reverse, packed
        ctx.delta_softplus = delta_softplus
        ctx.discretization = discretization
        ctx.save_for_backward(*inputs, initial_state, torch.stack(starts))
        return y, h

    @staticmethod
    @first_order("selective_scan (torch backend)")  # the recomputed chunks are detached
    def backward(ctx, dy: Tensor, dh_last: Tensor):
        *inputs, h0_in, starts = ctx.saved_tensors
        needs = ctx.needs_input_grad[: _H0 + 1]
        L, chunk = inputs[_U].shape[-1], ctx.chunk
        grads: list[Tensor | None] = [
            torch.zeros_like(x) if need and x is not None else None
            for x, need in zip((*inputs, h0_in), needs, strict=True)
        ]
        carry = any(needs[i] for i in _REACH_STATE)
        # inputs without a time axis: one leaf shared by every chunk, gradients summed over chunks
        shared = [
            None if x is None or _varies(i, x) else x.detach().requires_grad_(needs[i])
            for i, x in enumerate(inputs)
        ]
        packed: _Packed | None = ctx.packed
        dh = dh_last if packed is None else torch.zeros_like(starts[0])
        # packed: the sequences' initial states are one leaf shared by the chunks (as A is)
        h0_seq = None
        if packed is not None and h0_in is not None:
            h0_seq = h0_in.detach().requires_grad_(needs[_H0])
        ranges = _chunk_ranges(L, chunk, ctx.reverse)
        for c in range(len(ranges) - 1, -1, -1):  # chunk c is the c-th one processed
            s, e = ranges[c]
            # time-varying inputs: a fresh leaf holding only this chunk's slice
            args = [
                x[..., s:e].detach().requires_grad_(needs[i]) if _varies(i, x) else shared[i]
                for i, x in enumerate(inputs)
            ]
            first_needs = needs[_H0] if packed is None else False  # packed: starts from zeros
            h0 = starts[c].detach().requires_grad_(first_needs if c == 0 else carry)
            with torch.enable_grad():
                kw, end_seq = _packed_kwargs(packed, s, e, h0_seq)
                y_c, h_end, f_c = _chunk(
                    h0, *args, ctx.delta_softplus, ctx.discretization, ctx.reverse, **kw
                )
            pairs = [(y_c, dy[..., s:e])] + ([(h_end, dh)] if carry else [])
            if f_c is not None:
                pairs.append((f_c, dh_last.index_select(0, end_seq)))
            pairs = [(o, g) for o, g in pairs if o.requires_grad]
            wrt = [i for i, x in enumerate(args) if x is not None and x.requires_grad]
            leaves = [args[i] for i in wrt] + ([h0] if h0.requires_grad else [])
            seq_leaf = kw.get("h_begin") is not None and h0_seq.requires_grad
            if seq_leaf:
                leaves.append(h0_seq)
            if not pairs or not leaves:  # e.g. delta unused by dirac with deltaA: nothing to pull
                continue
            outs, out_grads = zip(*pairs, strict=True)
            got = list(torch.autograd.grad(outs, leaves, out_grads, allow_unused=True))
            if seq_leaf:
                g_seq = got.pop()
                if g_seq is not None:
                    grads[_H0] += g_seq
            for i, g in zip(wrt, got[: len(wrt)], strict=True):
                if g is None:
                    continue
                if _varies(i, inputs[i]):
                    grads[i][..., s:e] = g
                else:
                    grads[i] += g
            if h0.requires_grad:
                dh = got[-1] if got[-1] is not None else torch.zeros_like(h0)
        if grads[_H0] is not None:
            if packed is None:
                grads[_H0] = dh if h0_in.is_complex() or not dh.is_complex() else dh.real
            elif bool(packed.empty.any()):  # a zero-length sequence's final state is its h0
                mask = packed.empty.to(dh_last.device)[:, None, None]
                extra = torch.where(mask, dh_last, torch.zeros_like(dh_last))
                grads[_H0] += extra if h0_in.is_complex() else extra.real
        return (*grads, None, None, None, None, None)


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    delta_softplus: bool,
    discretization: str,
    deltaA: Tensor | None,
    initial_state: Tensor | None,
    reverse: bool = False,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Chunked selective scan; same arguments and results as the reference backend.

    Args (validated and cast by :func:`lrnnx.ops.selective_scan_fn`):
        u, delta: (b, d, L).  A: (d, n) real or complex.
        B, C: (d, n) time-invariant, or (b, g, n, L) with g dividing d.
        D, delta_bias: (d,) or None.  z, deltaA: (b, d, L) or None.
        initial_state: (b, d, n) or None for zeros (h_L with ``reverse``).
        reverse: run from the last step to the first (h_t = A_bar_t h_{t+1} + ...).
        cu_seqlens: int64 offsets (S + 1,) of packed sequences (b = 1); initial_state is then
            (S, d, n) and the final states (S, d, n) are returned.

    Returns:
        y (b, d, L) and the state after the last processed step (b, d, n).
    """
    chunk = max(1, int(CHUNK))  # read at call time so tests can shrink it
    packed = None if cu_seqlens is None else _Packed(cu_seqlens.cpu(), bool(reverse), u.device)
    inputs = (u, delta, A, B, C, D, z, delta_bias, deltaA)
    tensors = (*inputs, initial_state)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return SelectiveScanFunction.apply(
            *tensors, delta_softplus, discretization, chunk, bool(reverse), packed
        )
    # inference: no autograd Function, no chunk-start states kept
    y, h, _ = _forward(
        inputs, initial_state, delta_softplus, discretization, chunk, reverse, packed
    )
    return y, h

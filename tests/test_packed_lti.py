"""Packed sequences (``cu_seqlens``) in the LTI models (S4, S4D, S5, LRU) and the event models
(event S5, S7): a packed forward must equal running each sequence alone.

The expectation is each sequence run alone through the same model (its ordinary, unpacked
path: for the LTI models in "fft" mode that is the FFT convolution, so the packed scan with
resets is checked against an independent computation), for the outputs, the final states (one
per sequence, from ``state=`` for S4/S4D and from an inference cache for the others) and the
gradients of the input, of every parameter and of S4/S4D's initial states.  The offsets hold
zero-length sequences at the start and next to others and a sequence of length 1; S = 1 is
checked too.  float64 at the 1e-12-type tolerance of ``_tol.py``; float32 against the float64
model run alone.  Centaurus has its own forward (not ``LTI_LRNN._diagonal_ssm``), so it is not
covered here.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor

from _tol import assert_close_rel
from lrnnx.models.lti import LRU, S4, S4D, S5, Centaurus
from lrnnx.models.ltv import S5 as EventS5
from lrnnx.models.ltv import S7

H, N = 4, 4
#: zero-length sequences first and next to each other, a length-1 sequence, S = 6, T = 16
CU = [0, 0, 5, 5, 6, 13, 16]
T = CU[-1]

#: (name, variant): LTI diagonal models over their modes, the S4 blocks over their layouts
#: (and S4D's fallbacks), the event models over their scan backends
CASES = (
    [(m, mode) for m in ("lru", "s5", "s5-conj-bilinear") for mode in ("fft", "scan", "auto")]
    + [(m, layout) for m in ("s4", "s4d") for layout in ("transposed", "flat")]
    + [("s4d-real", "transposed"), ("s4d-lmax", "flat"), ("s4-gate", "transposed")]
    + [(m, path) for m in ("event-s5", "event-s5-sync", "s7") for path in ("fast", "torch")]
    + [
        (f"centaurus-{c}", mode)
        for c in ("neck", "pointwise", "dws", "full")
        for mode in ("fft", "scan")
    ]
    + [("centaurus-dws-norms", "scan"), ("centaurus-neck-simplified", "auto")]
)


def build(name: str, variant: str, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    torch.manual_seed(0)
    if name in ("lru", "s5", "s5-conj-bilinear"):
        if name == "lru":
            m = LRU(H, N, r_min=0.5, r_max=0.99, mode=variant)
        elif name == "s5":
            m = S5(H, N, "zoh", mode=variant)
        else:
            m = S5(H, N, "bilinear", conj_sym=True, mode=variant)
    elif name.startswith("s4"):
        cls = S4D if name.startswith("s4d") else S4
        kw = {"transposed": variant == "transposed", "verbose": False, "l_max": T}
        if name == "s4d-real":
            kw.update(is_real=True, init="diag-real")
        if name == "s4d-lmax":  # a kernel shorter than the longest sequence: padded fallback
            kw["l_max"] = 4
        if name == "s4-gate":
            kw.update(gate=2, bottleneck=2, channels=2)
        m = cls(H, d_state=N, **kw)
    elif name.startswith("event-s5"):
        disc = "zoh" if name.endswith("sync") else "async"
        m = EventS5(H, N, disc, use_fast_path=variant == "fast")
    elif name.startswith("centaurus"):
        conn = name.split("-")[1]
        kw = {}
        if name.endswith("norms"):  # per-position maps after the LTI part (eval mode: exact)
            kw = {"mix_norm": "layer", "mix_activation": "relu", "out_norm": "rms"}
        disc = "simplified_zoh" if name.endswith("simplified") else "zoh"
        m = Centaurus(H, N, 2, disc, mode=conn, dt_per_sub_state=conn == "dws", **kw)
        m.mode = variant
    else:
        m = S7(H, N, J=2, use_fast_path=variant == "fast")
    return m.to(dtype)


def bounds(cu: list[int]) -> list[tuple[int, int]]:
    """(first step, end) of each sequence."""
    return list(zip(cu[:-1], cu[1:], strict=True))


def is_block(m) -> bool:
    return isinstance(m, (S4, S4D))


def timesteps(name: str, dtype: torch.dtype) -> Tensor | None:
    if name in ("event-s5", "s7"):
        gen = torch.Generator().manual_seed(3)
        return torch.rand(1, T, generator=gen, dtype=torch.float64).to(dtype) + 0.1
    return None


def initial_states(m, n_seq: int) -> Tensor:
    """Random initial states, one per sequence (S, ...), in the model's state dtype."""
    gen = torch.Generator().manual_seed(4)
    if is_block(m):
        like = m.default_state(n_seq)
    else:
        like = m.allocate_inference_cache(n_seq)["lrnn_state"]
    if like.is_complex():
        re = torch.randn(like.shape, generator=gen, dtype=torch.float64)
        im = torch.randn(like.shape, generator=gen, dtype=torch.float64)
        return torch.complex(re, im).to(like.dtype)
    return torch.randn(like.shape, generator=gen, dtype=torch.float64).to(like.dtype)


def call(m, x: Tensor, ts: Tensor | None, h0: Tensor, cu: list[int] | None = None):
    """(y (1, L, H_out), final state (rows, ...)) of one forward from the states ``h0``."""
    cu_t = None if cu is None else torch.tensor(cu)
    if is_block(m):
        xi = x.transpose(1, 2) if m.transposed else x
        y, final = m(xi, state=h0, cu_seqlens=cu_t)
        return (y.transpose(1, 2) if m.transposed else y), final
    cache = m.allocate_inference_cache(h0.shape[0])
    cache["lrnn_state"].copy_(h0)
    if ts is None:
        y = m(x, inference_cache=cache, cu_seqlens=cu_t)
    else:
        y = m(x, ts, inference_cache=cache, cu_seqlens=cu_t)
    return y, cache["lrnn_state"]


def alone(m, x: Tensor, ts: Tensor | None, h0: Tensor, cu: list[int]):
    """Each sequence run by itself, outputs concatenated, final states stacked."""
    ys, finals = [], []
    for s, (a, b) in enumerate(bounds(cu)):
        y, final = call(m, x[:, a:b], None if ts is None else ts[:, a:b], h0[s : s + 1])
        ys.append(y)
        finals.append(final)
    return torch.cat(ys, 1), torch.cat(finals, 0)


def inputs(m, cu: list[int], dtype: torch.dtype) -> Tensor:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, cu[-1], H, generator=gen, dtype=torch.float64).to(dtype)
    return x.requires_grad_()


def loss_of(y: Tensor, final: Tensor, cu: list[int]) -> Tensor:
    """A fixed random projection of the outputs and (when differentiable) the final states."""
    gen = torch.Generator().manual_seed(6)
    loss = (y * torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.dtype)).sum()
    if final.requires_grad:
        w = torch.randn(final.shape, generator=gen, dtype=torch.float64).to(final.real.dtype)
        loss = loss + (final.real * w).sum()
        if final.is_complex():
            loss = loss + (final.imag * w.flip(0)).sum()
    return loss


def grads(loss: Tensor, leaves: list[Tensor]) -> list[Tensor]:
    got = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [torch.zeros_like(v) if g is None else g for v, g in zip(leaves, got, strict=True)]


@pytest.mark.filterwarnings("ignore:.*longer than l_max")  # the lmax variants, on purpose
@pytest.mark.parametrize("cu", [CU, [0, T]], ids=["S=6", "S=1"])
@pytest.mark.parametrize("name,variant", CASES, ids=[f"{n}-{v}" for n, v in CASES])
def test_packed_equals_alone_float64(name, variant, cu):
    m = build(name, variant)
    ts = timesteps(name, torch.float64)
    n_seq = len(cu) - 1
    h0 = initial_states(m, n_seq).requires_grad_(is_block(m))
    x = inputs(m, cu, torch.float64)
    leaves = [x] + list(m.parameters()) + ([h0] if is_block(m) else [])

    y, final = call(m, x, ts, h0, cu)
    g = grads(loss_of(y, final, cu), leaves)
    y_ref, final_ref = alone(m, x, ts, h0, cu)
    g_ref = grads(loss_of(y_ref, final_ref, cu), leaves)

    assert final.shape[0] == n_seq
    assert_close_rel(y, y_ref, length=T, msg="output")
    assert_close_rel(final, final_ref, length=T, msg="final states")
    names = ["x"] + [n for n, _ in m.named_parameters()] + (["h0"] if is_block(m) else [])
    for k, a, e in zip(names, g, g_ref, strict=True):
        assert_close_rel(a, e, length=T, msg=f"grad {k}")


@pytest.mark.parametrize(
    "name,variant",
    [
        ("lru", "auto"),
        ("s5", "fft"),
        ("s4", "flat"),
        ("s4d", "transposed"),
        ("s7", "fast"),
        ("centaurus-neck", "fft"),
    ],
)
def test_packed_float32_against_float64_alone(name, variant):
    m = build(name, variant, torch.float32)
    m64 = copy.deepcopy(m).double()
    h0 = initial_states(m64, len(CU) - 1)
    x = inputs(m, CU, torch.float64).detach()
    y, final = call(m, x.float(), timesteps(name, torch.float32), h0.to(_single(h0.dtype)), CU)
    with torch.no_grad():
        y_ref, final_ref = alone(m64, x, timesteps(name, torch.float64), h0, CU)
    assert y.dtype == torch.float32
    assert_close_rel(y, y_ref, dtype=torch.float32, length=T, msg="output")
    assert_close_rel(final, final_ref, dtype=torch.float32, length=T, msg="final states")


def _single(dtype: torch.dtype) -> torch.dtype:
    return {torch.complex128: torch.complex64, torch.float64: torch.float32}[dtype]


@pytest.mark.parametrize(
    "name,variant",
    [
        ("lru", "fft"),
        ("s5", "scan"),
        ("s4", "transposed"),
        ("s4d", "flat"),
        ("event-s5", "fast"),
        ("centaurus-full", "fft"),
    ],
)
def test_causal_and_separate(name, variant):
    """y at step t of sequence s depends only on the steps of s up to t."""
    m = build(name, variant)
    ts = timesteps(name, torch.float64)
    h0 = initial_states(m, len(CU) - 1)
    x = inputs(m, CU, torch.float64).detach()
    with torch.no_grad():
        y, _ = call(m, x, ts, h0, CU)
        for a, b in bounds(CU):
            for t in range(a, b):
                x2 = x.clone()
                keep = torch.zeros(T, dtype=torch.bool)
                keep[a : t + 1] = True
                x2[:, ~keep] = torch.randn_like(x2[:, ~keep]) * 10
                y2, _ = call(m, x2, ts, h0, CU)
                assert_close_rel(y2[:, a : t + 1], y[:, a : t + 1], length=T, msg=f"t={t}")


@pytest.mark.parametrize(
    "name,variant",
    [("lru", "scan"), ("s4", "flat"), ("event-s5", "fast"), ("centaurus-dws", "fft")],
)
def test_packed_errors(name, variant):
    m = build(name, variant)
    cu = torch.tensor(CU)
    x = torch.randn(1, T, H, dtype=torch.float64)
    xi = x.transpose(1, 2) if is_block(m) and m.transposed else x
    with pytest.raises(ValueError, match="lengths, cu_seqlens"):
        m(xi, lengths=torch.tensor([T]), cu_seqlens=cu)
    with pytest.raises(ValueError, match="cu_seqlens.*batch size 1"):
        m(torch.cat([xi, xi]), cu_seqlens=cu)
    with pytest.raises(ValueError, match=r"cu_seqlens\[-1\] = T"):
        m(xi, cu_seqlens=torch.tensor([0, 3, T - 1]))
    cache = m.allocate_inference_cache(1)  # one row: the packed row, not S sequences
    with pytest.raises(ValueError, match="batch size S = 6"):
        m(xi, inference_cache=cache, cu_seqlens=cu)
    if is_block(m):
        with pytest.raises(ValueError, match="state"):
            m(xi, state=m.default_state(1), cu_seqlens=cu)


@pytest.mark.parametrize(
    "name,variant",
    [("s5", "scan"), ("s4d", "flat"), ("s7", "fast"), ("centaurus-pointwise", "fft")],
)
def test_packed_cache_then_step(name, variant):
    """A packed prefill leaves each sequence's state in its cache row; ``step`` continues them
    as it continues each sequence prefilled alone."""
    m = build(name, variant)
    cu = torch.tensor(CU)
    x = torch.randn(1, T, H, dtype=torch.float64)
    xi = x.transpose(1, 2) if is_block(m) and m.transposed else x
    cache = m.allocate_inference_cache(len(CU) - 1)
    with torch.no_grad():
        m(xi, inference_cache=cache, cu_seqlens=cu)
        assert cache["seqlen_offset"] == max(b - a for a, b in bounds(CU))
        nxt = torch.randn(len(CU) - 1, H, dtype=torch.float64)
        y_step, _ = m.step(nxt, cache)
        for s, (a, b) in enumerate(bounds(CU)):
            c = m.allocate_inference_cache(1)
            seq = x[:, a:b].transpose(1, 2) if is_block(m) and m.transposed else x[:, a:b]
            m(seq, inference_cache=c)
            y1, _ = m.step(nxt[s : s + 1], c)
            assert_close_rel(y_step[s : s + 1], y1, length=T, msg=f"sequence {s}")


def test_s4d_kernel_dropout_packed_equals_padded_batch():
    """With kernel dropout in training S4D cannot run the scan; the packed forward then runs the
    padded batch of its sequences, so it equals the model on that batch with ``lengths`` (same
    random draw of the kernel mask) at the valid steps."""
    torch.manual_seed(0)
    m = S4D(H, d_state=N, transposed=False, verbose=False, drop_kernel=0.5).double().train()
    x = torch.randn(1, T, H, dtype=torch.float64)
    lens = [b - a for a, b in bounds(CU)]
    padded = torch.zeros(len(lens), max(lens), H, dtype=torch.float64)
    for s, (a, b) in enumerate(bounds(CU)):
        padded[s, : b - a] = x[0, a:b]
    torch.manual_seed(1)
    y, _ = m(x, cu_seqlens=torch.tensor(CU))
    torch.manual_seed(1)
    y_pad, _ = m(padded, lengths=torch.tensor(lens))
    expected = torch.cat([y_pad[s : s + 1, :n] for s, n in enumerate(lens)], 1)
    assert_close_rel(y, expected, length=T)

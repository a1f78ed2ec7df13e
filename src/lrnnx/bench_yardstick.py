"""How close the fused CPU selective scan is to the hardware: a yardstick kernel and two ceilings.

The yardstick is the plain Mamba recurrence (Gu & Dao 2023, Alg. 2 with real A; B and C
input-dependent and shared by all channels; delta already positive; no D, gate or bias)::

    h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t,    y_t = C_t . h_t,    h_{-1} = 0

written as the simplest fast kernel: for each channel one pass along time with the state in a
small (n,) array (the loop over the state vectorises), and a backward that recomputes the
channel's states into an (L + 1, n) buffer and walks them back, recomputing exp(delta A).  No
chunking, no checkpoints, no other discretization or layout: what lrnnx's general kernel
(:mod:`lrnnx.ops.selective_scan.cpu`) must not be much slower than on the same call.  Both use
the same vectorised float32 exp polynomial and the same thread pool, so the ratio measures the
structure of the kernel, not the maths library.

Two ceilings put the times in hardware units, each timed in turns with the scans (a shared
machine's load changes within a run):

* exp throughput: ``torch.exp`` of a cache-resident float32 array (exps per second, one
  thread's rate times the thread count); the scan evaluates b d L n exps per forward (twice
  that forward+backward: the backward recomputes them);
* copy bandwidth: ``x.clone()`` of a 32 MB tensor (as :func:`lrnnx.bench.copy_bandwidth`); the scan
  must read u, delta, B, C and write y forward, and read those plus dy and write du, ddelta,
  dB, dC backward.

``lrnnx bench`` prints these rows (:func:`yardstick_rows`) and adds them to its markdown
(:func:`add_yardstick_section`); ``benchmarks/yardstick.py`` runs them alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor

from lrnnx.ops._numba import HAVE_NUMBA, as_array

__all__ = [
    "HEADLINE",
    "SMALL",
    "YardstickRow",
    "exp_throughput",
    "yardstick_backward",
    "yardstick_forward",
    "yardstick_markdown",
    "yardstick_rows",
]

#: (b, d, n, L): the issue's headline shape, and a Mamba layer of the small LM (d_model = 64 ->
#: d_inner = 128) on selective copying (B = 64, L = 68)
HEADLINE = (2, 1024, 16, 2048)
SMALL = (64, 128, 16, 68)

if HAVE_NUMBA:
    import numba
    import numpy as np

    from lrnnx.ops._numba_math import _exp

    _OPTS = dict(cache=True, fastmath={"reassoc", "contract"}, nogil=True, error_model="numpy")

    @numba.njit(**_OPTS)
    def _channels(task, nblk, d):  # pragma: no cover - compiled
        """(batch element, first channel, end channel) of a task."""
        per = -(-d // nblk)
        c0 = (task % nblk) * per
        return task // nblk, c0, min(d, c0 + per)

    @numba.njit(**_OPTS)
    def _fwd_tasks(first, stride, ntasks, *args):  # pragma: no cover - compiled
        for task in range(first, ntasks, stride):
            _fwd(task, *args)

    @numba.njit(**_OPTS)
    def _bwd_tasks(first, stride, ntasks, *args):  # pragma: no cover - compiled
        for task in range(first, ntasks, stride):
            _bwd(task, *args)

    @numba.njit(**_OPTS)
    def _fwd(task, nblk, u, delta, A, Bt, Ct, y):  # pragma: no cover - compiled
        """y for one task's channels: h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t,
        y_t = C_t . h_t, the state in an (n,) array."""
        b, d, L = u.shape
        n = A.shape[1]
        bi, c0, c1 = _channels(task, nblk, d)
        h = np.zeros(n, u.dtype)
        for ch in range(c0, c1):
            Ac = A[ch]
            for k in range(n):
                h[k] = 0.0
            for t in range(L):
                dt = delta[bi, ch, t]
                du = dt * u[bi, ch, t]
                Bv, Cv = Bt[bi, t], Ct[bi, t]
                acc = u.dtype.type(0.0)
                for k in range(n):
                    hk = _exp(dt * Ac[k]) * h[k] + du * Bv[k]
                    h[k] = hk
                    acc += Cv[k] * hk
                y[bi, ch, t] = acc

    @numba.njit(**_OPTS)
    def _bwd(
        task, nblk, u, delta, A, Bt, Ct, dy, du, ddelta, dA, dBt, dCt
    ):  # pragma: no cover - compiled
        """Every gradient for one task's channels: recompute the states of a channel into an
        (L + 1, n) buffer, then the adjoint G_t = dy_t C_t + A_bar_{t+1} G_{t+1} backwards
        (A_bar recomputed); dBt, dCt (task, L, n) are this task's partial sums."""
        b, d, L = u.shape
        n = A.shape[1]
        bi, c0, c1 = _channels(task, nblk, d)
        zero = u.dtype.type(0.0)
        hs = np.zeros((L + 1, n), u.dtype)
        carry = np.empty(n, u.dtype)
        accA = np.empty(n, u.dtype)
        dBv, dCv = dBt[task], dCt[task]
        for ch in range(c0, c1):
            Ac = A[ch]
            for t in range(L):  # the states h_0 .. h_L (hs[0] = 0)
                dt = delta[bi, ch, t]
                dtu = dt * u[bi, ch, t]
                Bv, hp, hn = Bt[bi, t], hs[t], hs[t + 1]
                for k in range(n):
                    hn[k] = _exp(dt * Ac[k]) * hp[k] + dtu * Bv[k]
            for k in range(n):
                carry[k] = zero
                accA[k] = zero
            for t in range(L - 1, -1, -1):
                dt = delta[bi, ch, t]
                ut = u[bi, ch, t]
                g = dy[bi, ch, t]
                Bv, Cv, hp, hn = Bt[bi, t], Ct[bi, t], hs[t], hs[t + 1]
                dtu = dt * ut
                dut = zero
                ddt = zero
                for k in range(n):
                    a = _exp(dt * Ac[k])
                    G = g * Cv[k] + carry[k]
                    dCv[t, k] += g * hn[k]
                    dBv[t, k] += G * dtu
                    gB = G * Bv[k]
                    dut += gB
                    q = G * hp[k] * a
                    ddt += gB * ut + q * Ac[k]
                    accA[k] += q * dt
                    carry[k] = a * G
                du[bi, ch, t] = dut * dt
                ddelta[bi, ch, t] = ddt
            for k in range(n):
                dA[bi, ch, k] = accA[k]


def _tasks(b: int, d: int) -> int:
    """Channel blocks per batch element: enough tasks for every thread, as lrnnx's split."""
    from lrnnx.ops.selective_scan.cpu import TASKS_PER_THREAD

    return max(1, min(d, -(-TASKS_PER_THREAD * torch.get_num_threads() // b)))


def _prepare(B: Tensor, C: Tensor) -> tuple:
    """B and C (b, n, L) as (b, L, n) arrays: a time step's n values are contiguous."""
    return as_array(B.transpose(1, 2)), as_array(C.transpose(1, 2))


def yardstick_forward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor) -> Tensor:
    """y (b, d, L) of the plain Mamba recurrence (module docstring) for u, delta (b, d, L) with
    delta > 0, real A (d, n), B, C (b, n, L), from a zero state."""
    from lrnnx.ops.selective_scan.cpu import _run

    b, d, L = u.shape
    nblk = _tasks(b, d)
    y = torch.empty_like(u)
    _run(_fwd_tasks, b * nblk, b * d * L * A.shape[1], nblk, as_array(u), as_array(delta), as_array(A), *_prepare(B, C),
         y.numpy())  # fmt: skip
    return y


def yardstick_backward(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, dy: Tensor
) -> dict[str, Tensor]:
    """Gradients of sum(dy * y) for :func:`yardstick_forward`'s inputs, keyed "u", "delta",
    "A", "B", "C" (each the shape of its input)."""
    from lrnnx.ops.selective_scan.cpu import _run

    b, d, L = u.shape
    n = A.shape[1]
    nblk = _tasks(b, d)
    du, ddelta, dA = torch.empty_like(u), torch.empty_like(u), torch.empty(b, d, n, dtype=u.dtype)
    dBt, dCt = (torch.zeros(b * nblk, L, n, dtype=u.dtype) for _ in range(2))
    _run(_bwd_tasks, b * nblk, b * d * L * n, nblk, as_array(u), as_array(delta), as_array(A), *_prepare(B, C),
         as_array(dy), du.numpy(), ddelta.numpy(), dA.numpy(), dBt.numpy(), dCt.numpy())  # fmt: skip
    return dict(
        u=du,
        delta=ddelta,
        A=dA.sum(0),
        B=dBt.view(b, nblk, L, n).sum(1).transpose(1, 2),
        C=dCt.view(b, nblk, L, n).sum(1).transpose(1, 2),
    )


# ----------------------------------------------------------------------------------- ceilings


def _exp_run(numel: int = 1 << 16, calls: int = 16) -> tuple[Callable[[], None], int]:
    """A function evaluating ``numel * calls`` exps with ``torch.exp`` (float32) on one thread,
    on an array small enough to stay in cache, so the rate is the arithmetic's, not the
    memory's; and that count.  The machine's rate is this one's times the thread count: torch's
    own threading of a cache-sized array stalls on a shared machine (a ceiling must not)."""
    x = -torch.rand(numel)
    out = torch.empty_like(x)

    def run() -> None:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for _ in range(calls):
                torch.exp(x, out=out)
        finally:
            torch.set_num_threads(threads)

    return run, numel * calls


def _clone_run(mbytes: int = 32) -> tuple[Callable[[], None], int]:
    """A function cloning a float32 tensor of ``mbytes`` MB (as :func:`lrnnx.bench.copy_bandwidth`
    does), and the bytes it moves (read + write)."""
    x = torch.randn(mbytes * 2**18)
    return (lambda: x.clone()), 2 * 4 * x.numel()


def exp_throughput(numel: int = 1 << 16, calls: int = 16, repeats: int = 5) -> float:
    """Exps per second of ``torch.exp`` on a cache-resident float32 array, one thread's rate
    times torch's thread count (see :func:`_exp_run`)."""
    run, count = _exp_run(numel, calls)
    return count / _median_of_interleaved([run], repeats)[0] * torch.get_num_threads()


# ----------------------------------------------------------------------------------- the rows


@dataclass
class YardstickRow:
    """lrnnx's fused scan against the yardstick at one shape (times in ms)."""

    shape: tuple
    lrnnx_fwd: float
    lrnnx_fb: float
    yard_fwd: float
    yard_fb: float
    exp_frac: float  # the fused scan's exps / s (forward+backward) over torch.exp's
    copy_frac: float  # the bytes it must move / its forward+backward time, over clone's GB/s
    exp_gps: float  # torch.exp's rate, G exps / s, and the clone bandwidth, GB/s, of this run
    copy_gbps: float

    @property
    def ratio(self) -> float:
        return self.lrnnx_fb / self.yard_fb

    @property
    def fwd_ratio(self) -> float:
        return self.lrnnx_fwd / self.yard_fwd

    def line(self) -> str:
        b, d, n, L = self.shape
        return (
            f"b={b} d={d} n={n} L={L}: lrnnx / yardstick {self.ratio:.2f}x fwd+bwd "
            f"({self.lrnnx_fb:.1f} / {self.yard_fb:.1f} ms), {self.fwd_ratio:.2f}x fwd "
            f"({self.lrnnx_fwd:.1f} / {self.yard_fwd:.1f} ms); "
            f"{100 * self.exp_frac:.0f}% of exp throughput, {100 * self.copy_frac:.1f}% of copy"
        )


def _inputs(shape: Sequence[int], seed: int = 0) -> list[Tensor]:
    """u, delta (positive, Mamba's typical range), A, B, C at ``shape`` (b, d, n, L), float32."""
    b, d, n, L = shape
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(b, d, L, generator=g)
    delta = torch.nn.functional.softplus(torch.randn(b, d, L, generator=g) * 0.5 - 1.0)
    A = -torch.rand(d, n, generator=g) - 0.5
    return [u, delta, A, torch.randn(b, n, L, generator=g), torch.randn(b, n, L, generator=g)]


def _bytes_fwd_bwd(shape: Sequence[int], itemsize: int = 4) -> int:
    """Bytes forward+backward must move: forward reads u, delta, B, C and writes y; backward
    reads them and dy and writes du, ddelta, dB, dC."""
    b, d, n, L = shape
    return itemsize * ((3 + 5) * b * d * L + (2 + 4) * b * n * L)


def _median_of_interleaved(fns: Sequence[Callable[[], object]], repeats: int) -> list[float]:
    """Median seconds of each function, timed in turns so load on the machine hits all alike."""
    for f in fns:
        f()  # warm up (and compile)
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for f, ts in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
    return [sorted(ts)[len(ts) // 2] for ts in times]


def measure_shape(shape: Sequence[int], repeats: int = 5) -> YardstickRow:
    """Time lrnnx's fused scan (``backend="cpu"``, forward without and forward+backward through
    autograd) and the yardstick on the same inputs at ``shape`` (b, d, n, L), with the two
    ceilings (``torch.exp`` rate, ``x.clone()`` bandwidth) timed in the same turns, so load
    on a shared machine hits the scans and their ceilings alike."""
    from lrnnx.ops import selective_scan_fn

    inputs = _inputs(shape)
    leaves = [t.clone().requires_grad_() for t in inputs]
    dy = torch.randn_like(inputs[0])

    def lrnnx_fwd() -> None:
        with torch.no_grad():
            selective_scan_fn(*inputs, backend="cpu")

    def lrnnx_fb() -> None:
        torch.autograd.grad(selective_scan_fn(*leaves, backend="cpu"), leaves, dy)

    def yard_fb() -> None:
        yardstick_forward(*inputs)
        yardstick_backward(*inputs, dy)

    exp_run, exps_done = _exp_run()
    clone_run, bytes_cloned = _clone_run()
    fns = [lrnnx_fwd, lrnnx_fb, lambda: yardstick_forward(*inputs), yard_fb, exp_run, clone_run]
    times = _median_of_interleaved(fns, repeats)
    lf, lfb, yf, yfb = (1e3 * t for t in times[:4])
    exp_per_s = exps_done / times[4] * torch.get_num_threads()
    copy_gbps = bytes_cloned / times[5] / 1e9
    b, d, n, L = shape
    exps = 2 * b * d * L * n  # forward, and the backward's recompute
    return YardstickRow(
        tuple(shape), lf, lfb, yf, yfb,
        exp_frac=exps / (lfb * 1e-3) / exp_per_s,
        copy_frac=_bytes_fwd_bwd(shape) / (lfb * 1e-3) / 1e9 / copy_gbps,
        exp_gps=exp_per_s / 1e9, copy_gbps=copy_gbps,
    )  # fmt: skip


def yardstick_rows(
    quick: bool = False, shapes: Optional[Sequence[tuple]] = None
) -> List[YardstickRow]:
    """The rows at the headline and the small shape (a quarter of the headline's L with
    ``quick``), each printed as it is measured."""
    if not HAVE_NUMBA:
        return []
    if shapes is None:
        head = (HEADLINE[0], HEADLINE[1], HEADLINE[2], HEADLINE[3] // 4 if quick else HEADLINE[3])
        shapes = [head, SMALL]
    rows = []
    for shape in shapes:
        rows.append(measure_shape(shape, repeats=3 if quick else 5))
        print("yardstick " + rows[-1].line(), flush=True)
    return rows


def yardstick_markdown(rows: List[YardstickRow]) -> str:
    """The rows as a markdown section for RESULTS.md."""
    if not rows:
        return ""
    lines = [
        "### Fused selective scan against the hardware",
        "",
        'lrnnx\'s fused CPU scan (`backend="cpu"`, autograd included) over a yardstick kernel '
        "of the plain Mamba recurrence (state in registers, backward by recompute; "
        "`lrnnx.bench_yardstick`), both on the same threads in the same run; the exp and copy "
        "columns are the fused scan's forward+backward rate as a fraction of `torch.exp` "
        f"throughput and of `x.clone()` bandwidth, each ceiling timed in turns with the scans "
        f"(so under the same load), on {torch.get_num_threads()} threads.",
        "",
        "| shape | lrnnx fwd+bwd ms | yardstick fwd+bwd ms | ratio | fwd ratio | of exp | of copy "
        "| exp G/s | copy GB/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        b, d, n, L = r.shape
        lines.append(
            f"| b={b} d={d} n={n} L={L} | {r.lrnnx_fb:.1f} | {r.yard_fb:.1f} | {r.ratio:.2f}x "
            f"| {r.fwd_ratio:.2f}x | {100 * r.exp_frac:.0f}% | {100 * r.copy_frac:.1f}% "
            f"| {r.exp_gps:.2f} | {r.copy_gbps:.1f} |"
        )
    return "\n".join(lines) + "\n"


def add_yardstick_section(md: str, quick: bool, device: torch.device) -> str:
    """``md`` with the yardstick section appended (CPU runs with numba; else ``md`` as is)."""
    if device.type != "cpu" or not HAVE_NUMBA:
        return md
    return md.rstrip("\n") + "\n\n" + yardstick_markdown(yardstick_rows(quick))

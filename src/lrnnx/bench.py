"""``lrnnx bench``: speed and memory of every op and model, beside the pure-torch baseline.

Every case is timed in this process as a median over repeats after a warm-up, once with the
backend lrnnx picks for the device and once with a baseline run right after it (the ``torch``
backend, and for ops also the ``reference`` loop where affordable), so the ratio column compares
like with like on a machine whatever else it is doing.

Peak memory is the largest resident set size (RSS) seen above the level before the case: on Linux
the kernel's own high-water mark (VmHWM, reset through ``/proc/self/clear_refs`` when the case
starts), elsewhere samples every 0.5 ms from a background thread (torch and the numba kernels
release the GIL).  Memory freed by earlier runs is first handed back to the OS (``malloc_trim``),
otherwise a case reusing glibc's cached chunks would not raise RSS at all.  On CPU large tensors come straight from the OS, so RSS follows live tensor
memory (tracemalloc would not see torch's allocations at all).  On CUDA the number is
``torch.cuda.max_memory_allocated``.

Memory-bound ops report the bandwidth they reach (bytes they must read and write / time) as a
fraction of the machine's copy bandwidth, measured as ``x.clone()`` of a large tensor (allocation
included, as every op allocates its output).

Without ``--quick`` each op is swept over sequence length, width and batch around the shapes
of the issue (selective scan b=2, d=1024, n=16, L=2048; linear_scan 32768 channels x L=2048),
and the LTI comparison over L = 1024..16384.  The depthwise causal convolution of Mamba and
RG-LRU (``causal_conv1d``) is timed at the Mamba layer's shape B=4, D=512, L=2048, K=4, where
torch's ``aten::convolution_backward`` took seconds on an AMD EPYC.  Peers (mambapy's parallel scan) are timed beside
the selective scan when installed.

``--quick`` shrinks every case (see its ``--help``) so the whole run takes about a minute on a
2-core CPU.  Each case prints one line as soon as it is measured.  The timed cases compile the
fused CPU kernels in this process before timing them (``LRNNX_NUMBA_COMPILE=wait``).

``--cold`` measures the cold start instead: each model's import, build and first two training
steps in fresh processes with an empty numba cache, then with the cache that left, for each
``LRNNX_NUMBA_COMPILE`` mode (see :func:`bench_cold`); it writes ``cold.md``.

Run ``lrnnx bench [--quick] [--models ...] [--ops ...] [--out DIR] [--markdown FILE]`` or
``python -m lrnnx.bench``.  Writes ``bench.csv``, ``bench.md`` and (with matplotlib)
``bench.png``, titled with the machine and the shapes in its labels, under ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import datetime
import gc
import importlib.util
import math
import os
import platform
import statistics
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch
import torch.nn.functional as F

from lrnnx.ops import _dispatch, causal_conv1d, linear_scan, selective_scan_fn
from lrnnx.ops._numba import COMPILE_ENV

OPS = ("linear_scan", "selective_scan", "causal_conv1d")


@dataclass
class Row:
    """One measured case."""

    kind: str  # "op" or "model"
    name: str
    shape: str
    backend: str
    fwd_ms: float
    fwdbwd_ms: Optional[float] = None
    step_us: Optional[float] = None
    peak_mb: Optional[float] = None
    gbps: Optional[float] = None
    frac_copy: Optional[float] = None
    speedup: Dict[str, float] = field(default_factory=dict)  # baseline -> baseline time / ours


# ----------------------------------------------------------------------------------- measuring


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(
    fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1
) -> float:
    """Median wall time of ``fn`` in milliseconds after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _release_free_memory() -> None:
    """Hand memory freed by earlier cases back to the OS (glibc keeps freed chunks for reuse, and
    a case reusing them would not raise RSS: its peak would read as zero)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _reset_hwm() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0); False where that is impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict]:
    """Peak memory above the starting level while the block runs, in MB (``result["mb"]``)."""
    result: dict = {"mb": None}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        yield result
        torch.cuda.synchronize(device)
        result["mb"] = (torch.cuda.max_memory_allocated(device) - start) / 2**20
        return
    if not os.path.exists("/proc/self/statm"):  # no cheap RSS reading on this OS
        yield result
        return
    _release_free_memory()
    start = _rss_bytes()
    peak = [start]
    hwm = _reset_hwm()  # then VmHWM catches spikes shorter than the sampling period
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.0005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        peak[0] = max(peak[0], _rss_bytes())
        if hwm:
            with contextlib.suppress(OSError):
                peak[0] = max(peak[0], _hwm_bytes())
        result["mb"] = (peak[0] - start) / 2**20


def copy_bandwidth(device: torch.device, mbytes: int, preallocated: bool = False) -> float:
    """GB/s of ``x.clone()`` (read + write) for a tensor of ``mbytes`` MB; with
    ``preallocated``, of ``y.copy_(x)`` into an existing tensor (no page faults)."""
    x = torch.randn(mbytes * 2**20 // 4, device=device)
    if preallocated:
        y = torch.empty_like(x)
        ms = median_ms(lambda: y.copy_(x), device, repeats=5)
    else:
        ms = median_ms(lambda: x.clone(), device, repeats=5)
    return 2 * x.numel() * 4 / (ms * 1e-3) / 1e9


# ----------------------------------------------------------------------------------- op cases


def _time_backend(
    fwd: Callable[[], torch.Tensor], inputs: List[torch.Tensor], device: torch.device, repeats: int
) -> tuple[float, float, Optional[float]]:
    """(forward ms, forward+backward ms, peak MB of forward+backward) for one backend."""
    with torch.no_grad():
        f_ms = median_ms(fwd, device, repeats)

    def fwd_bwd() -> None:
        out = fwd()
        torch.autograd.grad(out.real.sum(), inputs)

    fwd_bwd()
    with peak_memory(device) as mem:
        fwd_bwd()
    fb_ms = median_ms(fwd_bwd, device, repeats, warmup=0)
    return f_ms, fb_ms, mem["mb"]


#: the shapes of the issue: selective scan (b, d, n, L) and linear_scan (B, L, C)
HEADLINE_SCAN = (2, 1024, 16, 2048)
HEADLINE_LINEAR = (1, 2048, 32768)
#: causal_conv1d (B, D, L, K): the depthwise conv of a Mamba layer with H=256 (D = 2H)
HEADLINE_CONV = (4, 512, 2048, 4)


def linear_scan_shapes(quick: bool) -> List[tuple]:
    """(B, L, C) cases: the headline, then one axis at a time."""
    if quick:
        return [(1, 1024, 4096)]
    return [HEADLINE_LINEAR, (1, 2048, 4096), (1, 512, 32768), (4, 2048, 8192)]


def selective_scan_shapes(quick: bool) -> List[tuple]:
    """(b, d, n, L) cases: the headline, then length, width and batch one at a time."""
    if quick:
        return [(1, 256, 16, 512)]
    b, d, n, L = HEADLINE_SCAN
    return (
        [HEADLINE_SCAN]
        + [(b, d, n, x) for x in (512, 8192)]
        + [(b, x, n, L) for x in (256, 4096)]
        + [(x, d, n, L) for x in (1, 8)]
    )


def causal_conv1d_shapes(quick: bool) -> List[tuple]:
    """(B, D, L, K) cases: the Mamba layer's conv (1/16 of it with --quick)."""
    return [(1, 256, 512, 4)] if quick else [HEADLINE_CONV]


def bench_causal_conv1d(
    device: torch.device,
    quick: bool,
    copy_gbps: float,
    repeats: int,
    shapes: Optional[Sequence[tuple]] = None,
) -> List[Row]:
    rows = []
    for shape in shapes or causal_conv1d_shapes(quick):
        rows += _causal_conv1d_case(device, shape, copy_gbps, repeats)
    return rows


def _causal_conv1d_case(
    device: torch.device, shape: Sequence[int], copy_gbps: float, repeats: int
) -> List[Row]:
    """lrnnx's choice (the fused numba kernels on CPU) beside the torch backend (F.conv1d and
    its autograd, ``aten::convolution_backward``), on the same tensors."""
    B, D, L, K = shape
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(B, D, L, generator=g).to(device).requires_grad_()
    w = (torch.randn(D, K, generator=g) / K**0.5).to(device).requires_grad_()
    b = torch.randn(D, generator=g).to(device).requires_grad_()
    bytes_moved = 2 * x.numel() * 4  # read x; write y
    call = lambda backend: partial(causal_conv1d, x, w, b, backend=backend)  # noqa: E731
    label = f"B={B} D={D} L={L} K={K}"
    return _chosen_vs_torch(
        "causal_conv1d", label, call, [x, w, b], bytes_moved, device, copy_gbps, repeats
    )


def _chosen_vs_torch(
    op: str,
    label: str,
    call: Callable[[str], Callable[[], Any]],
    inputs: List[torch.Tensor],
    bytes_moved: int,
    device: torch.device,
    copy_gbps: float,
    repeats: int,
) -> List[Row]:
    """Rows of ``op`` on the backend the dispatcher picks and on the torch backend, on the same
    tensors; ``call(backend)`` returns the op's call for that backend."""
    chosen = _dispatch.select(op, device)[0]
    rows = []
    for backend in dict.fromkeys([chosen, "torch"]):
        f, fb, mem = _time_backend(call(backend), inputs, device, repeats)
        gbps = bytes_moved / (f * 1e-3) / 1e9
        rows.append(Row("op", op, label, backend, f, fb, None, mem, gbps, gbps / copy_gbps))
    _add_speedups(rows)
    return rows


def bench_linear_scan(
    device: torch.device,
    quick: bool,
    copy_gbps: float,
    repeats: int,
    shapes: Optional[Sequence[tuple]] = None,
) -> List[Row]:
    rows = []
    for shape in shapes or linear_scan_shapes(quick):
        rows += _linear_scan_case(device, shape, copy_gbps, repeats)
    return rows


def _linear_scan_case(
    device: torch.device, shape: Sequence[int], copy_gbps: float, repeats: int
) -> List[Row]:
    B, L, C = shape
    a = (torch.rand(B, L, C, device=device) * 0.5 + 0.5).requires_grad_()
    b = torch.randn(B, L, C, device=device, requires_grad=True)
    bytes_moved = 3 * a.numel() * 4  # read a, b; write h
    call = lambda backend: partial(linear_scan, a, b, backend=backend)  # noqa: E731
    label = f"B={B} L={L} C={C}"
    return _chosen_vs_torch(
        "linear_scan", label, call, [a, b], bytes_moved, device, copy_gbps, repeats
    )


def _baseline_affordable(
    device: torch.device, quick: bool, shape: Sequence[int], backend: str
) -> bool:
    """Slow selective-scan baselines run up to the headline size only (on CPU the torch backend
    takes tens of seconds there); the textbook loop, which materialises (b, d, L, n) several
    times, not at all in --quick CPU runs."""
    if backend == "reference" and quick and device.type == "cpu":
        return False
    return device.type != "cpu" or math.prod(shape) <= math.prod(HEADLINE_SCAN)


def mambapy_selective_scan() -> Optional[Callable[..., torch.Tensor]]:
    """A selective scan on mambapy's parallel scan (a peer), when mambapy is installed."""
    if importlib.util.find_spec("mambapy") is None:
        return None
    from mambapy.pscan import pscan  # pscan(A, X) over dim 1 of (B, L, D, N)

    def scan(u, delta, A, B, C, D, z, delta_bias):
        dt = F.softplus(delta + delta_bias[:, None]).transpose(1, 2)  # (b, L, d)
        dA = torch.exp(dt[..., None] * A)  # (b, L, d, n)
        BX = (dt * u.transpose(1, 2))[..., None] * B.transpose(1, 2)[:, :, None, :]
        hs = pscan(dA, BX)
        y = (hs @ C.transpose(1, 2)[..., None]).squeeze(-1) + D * u.transpose(1, 2)
        return (y * F.silu(z.transpose(1, 2))).transpose(1, 2)

    return scan


def bench_selective_scan(
    device: torch.device,
    quick: bool,
    copy_gbps: float,
    repeats: int,
    shapes: Optional[Sequence[tuple]] = None,
) -> List[Row]:
    rows = []
    for shape in shapes or selective_scan_shapes(quick):
        rows += _selective_scan_case(device, quick, shape, copy_gbps, repeats)
    return rows


def _selective_scan_case(
    device: torch.device, quick: bool, shape: Sequence[int], copy_gbps: float, repeats: int
) -> List[Row]:
    b, d, n, L = shape
    g = torch.Generator(device="cpu").manual_seed(0)

    def t(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device).requires_grad_()

    u, delta, z = t(b, d, L), t(b, d, L, scale=0.5), t(b, d, L)
    A = (-torch.rand(d, n, generator=g) - 0.5).to(device).requires_grad_()
    Bm, Cm, D, bias = t(b, n, L), t(b, n, L), t(d), t(d, scale=0.1)
    inputs = [u, delta, A, Bm, Cm, D, z, bias]
    bytes_moved = (4 * b * d * L + 2 * b * n * L) * 4  # read u, delta, z, B, C; write y
    label = f"b={b} d={d} n={n} L={L}"
    chosen = _dispatch.select("selective_scan", device)[0]
    # the textbook loop: slow, but the baseline the issue names
    backends = [chosen] + [
        be for be in ("torch", "reference") if _baseline_affordable(device, quick, shape, be)
    ]
    rows = []
    for backend in dict.fromkeys(backends):
        reps = 1 if backend == "reference" else repeats
        fwd = partial(
            selective_scan_fn, u, delta, A, Bm, Cm, D, z=z, delta_bias=bias, delta_softplus=True,
            backend=backend,
        )  # fmt: skip
        f, fb, mem = _time_backend(fwd, inputs, device, reps)
        gbps = bytes_moved / (f * 1e-3) / 1e9
        rows.append(
            Row("op", "selective_scan", label, backend, f, fb, None, mem, gbps, gbps / copy_gbps)
        )
    peer = mambapy_selective_scan()
    if peer is not None:
        try:
            fwd = partial(peer, u, delta, A, Bm, Cm, D, z, bias)
            f, fb, mem = _time_backend(fwd, inputs, device, repeats)
            rows.append(Row("op", "selective_scan", label, "mambapy", f, fb, None, mem))
        except Exception as e:  # a peer's API change must not break the suite
            print(f"mambapy peer failed: {type(e).__name__}: {e}", file=sys.stderr)
    _add_speedups(rows)
    return rows


def _add_speedups(rows: List[Row]) -> None:
    """The first row is lrnnx's choice; record how much faster it is than each baseline row."""
    ours = rows[0]
    for other in rows[1:]:
        ours.speedup[other.backend] = (other.fwdbwd_ms or other.fwd_ms) / (
            ours.fwdbwd_ms or ours.fwd_ms
        )


# -------------------------------------------------------------------------------- model cases


@contextmanager
def _env(**values: Optional[str]) -> Iterator[None]:
    """Set (a string) or unset (None) environment variables for the block."""
    old = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _backend_env(name: Optional[str]) -> contextlib.AbstractContextManager:
    """``LRNNX_BACKEND=name`` (None: lrnnx's choice) with the fused kernels compiled in this
    process before they are timed, never replaced by the torch backend while they compile."""
    return _env(LRNNX_BACKEND=name, **{COMPILE_ENV: "wait"})


def model_shape(quick: bool) -> tuple[int, int, int, int]:
    """(B, L, H, N) of the model cases."""
    return (1, 256, 64, 16) if quick else (4, 2048, 256, 16)


def lti_lengths(quick: bool) -> tuple[int, ...]:
    """Sequence lengths of the LTI FFT-vs-scan comparison."""
    return (2048,) if quick else (1024, 4096, 16384)


def bench_models(names: List[str], device: torch.device, quick: bool, repeats: int) -> List[Row]:
    from lrnnx.models.registry import build_mixer

    Bsz, L, H, N = model_shape(quick)
    rows = []
    for name in names:
        torch.manual_seed(0)
        model = build_mixer(name, H, N).to(device)
        x = torch.randn(Bsz, L, H, device=device)
        params = [p for p in model.parameters() if p.requires_grad]
        pair = []
        for backend in (None, "torch"):
            with _backend_env(backend):
                label = "auto" if backend is None else backend

                f, fb, mem = _time_backend(partial(model, x), params, device, repeats)
                with torch.no_grad():
                    cache = model.allocate_inference_cache(Bsz, L)
                    x_t = x[:, 0]
                    step_ms = median_ms(
                        partial(model.step, x_t, cache), device, repeats=32, warmup=4
                    )
                pair.append(
                    Row(
                        "model",
                        name,
                        f"B={Bsz} L={L} H={H} N={N}",
                        label,
                        f,
                        fb,
                        step_ms * 1e3,
                        mem,
                    )
                )
        _add_speedups(pair)
        rows += pair
    return rows


def bench_lti_modes(
    device: torch.device, quick: bool, repeats: int, lengths: Optional[Sequence[int]] = None
) -> List[Row]:
    """LTI models at long L: FFT convolution vs scan, and what ``mode="auto"`` picks."""
    from lrnnx.models.lti import LRU, S5

    rows = []
    for L in lengths or lti_lengths(quick):
        for cls, kw in ((LRU, {}), (S5, {"discretization": "zoh"})):
            torch.manual_seed(0)
            model = cls(64, 64, **kw).to(device)
            x = torch.randn(1, L, 64, device=device)
            params = [p for p in model.parameters() if p.requires_grad]
            times = {}
            for mode in ("fft", "scan"):
                model.mode = mode
                f, fb, _ = _time_backend(partial(model, x), params, device, repeats)
                times[mode] = (f, fb)
                rows.append(
                    Row("model", f"{cls.__name__} mode={mode}", f"B=1 L={L} H=64 N=64", mode, f, fb)
                )
            # what auto runs is a decision, not a third measurement: it is compared with the
            # faster path (forward+backward), so timing noise cannot flip the verdict
            model.mode = "auto"
            picked = "fft" if model._use_fft(L) else "scan"
            faster = min(times, key=lambda m: times[m][1])
            auto = Row(
                "model", f"{cls.__name__} mode=auto", f"B=1 L={L} H=64 N=64", f"auto->{picked}",
                *times[picked],
            )  # fmt: skip
            auto.speedup["picks faster"] = float(picked == faster)
            rows.append(auto)
    return rows


# --------------------------------------------------------------------------------- cold start

#: LRNNX_NUMBA_COMPILE modes compared by --cold: the default, then compiling in the process
COLD_MODES = ("background", "wait")


@dataclass
class ColdRow:
    """One fresh process: import, build, two training steps; seconds."""

    model: str
    mode: str  # LRNNX_NUMBA_COMPILE
    cache: str  # "cold" (empty numba cache) or "warm"
    import_s: float
    build_s: float
    step1_s: float
    step2_s: float
    compiling_after: bool  # a background compile was still running after step 2
    ready_s: Optional[float] = None  # since the start: the fused kernels are cached
    step3_s: Optional[float] = None  # a step once they are


def _cold_child(t0: float, name: str, B: int, L: int, H: int, N: int, threads: int) -> None:
    """Body of one cold-start process (started by :func:`cold_run`): prints a ColdRow as JSON."""
    import json

    from lrnnx.models.registry import build_mixer
    from lrnnx.ops import _numba

    if threads:
        torch.set_num_threads(threads)
    t1 = time.perf_counter()
    torch.manual_seed(0)
    model = build_mixer(name, H, N)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(B, L, H)
    t2 = time.perf_counter()

    def step() -> float:
        t = time.perf_counter()
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        return time.perf_counter() - t

    s1, s2 = step(), step()
    row = ColdRow(name, _numba.compile_mode(), "", t1 - t0, t2 - t1, s1, s2, _numba.compiling())
    while _numba.compiling():  # the cache fills in the background: when, and a step after it
        _numba.wait_for_background()
        row.ready_s = time.perf_counter() - t0
        row.step3_s = step()  # may start the compile of a variant that waited its turn
    print(json.dumps(asdict(row)), flush=True)


def cold_run(
    name: str, mode: str, cache_dir: Path, shape: tuple, threads: Optional[int]
) -> ColdRow:
    """Run :func:`_cold_child` for ``name`` in a fresh process with ``NUMBA_CACHE_DIR=cache_dir``
    and ``LRNNX_NUMBA_COMPILE=mode`` (lrnnx's backend choice)."""
    import json
    import subprocess

    code = (
        "import sys, time; t0 = time.perf_counter(); from lrnnx.bench import _cold_child; "
        "_cold_child(t0, sys.argv[1], *map(int, sys.argv[2:]))"
    )
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir), **{COMPILE_ENV: mode})
    env.pop("LRNNX_BACKEND", None)
    argv = [sys.executable, "-c", code, name, *map(str, shape), str(threads or 0)]
    out = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"cold start of {name} ({mode}) failed:\n{out.stderr[-2000:]}")
    return ColdRow(**json.loads(out.stdout.strip().splitlines()[-1]))


def bench_cold(
    names: List[str], quick: bool, threads: Optional[int] = None, modes: Sequence[str] = COLD_MODES
) -> List[ColdRow]:
    """Each model's first training steps in fresh processes: with an empty numba cache (a new
    machine, CI, a fresh venv), then again with the cache that run left, per compile mode."""
    import shutil
    import tempfile

    shape = model_shape(quick)
    rows = []
    for name in names:
        for mode in modes:
            cache_dir = Path(tempfile.mkdtemp(prefix="lrnnx-cold-"))
            try:
                for cache in ("cold", "warm"):
                    row = cold_run(name, mode, cache_dir, shape, threads)
                    row.cache = cache
                    rows.append(row)
                    print(f"  {cold_line(row)}", flush=True)
            finally:
                shutil.rmtree(cache_dir, ignore_errors=True)
    return rows


def cold_line(r: ColdRow) -> str:
    line = (
        f"{r.model} {r.mode} {r.cache}: import {r.import_s:.1f}s, build {r.build_s:.2f}s, "
        f"step 1 {r.step1_s:.2f}s, step 2 {r.step2_s:.2f}s"
    )
    if r.ready_s is not None:
        line += f"; fused kernels ready {r.ready_s:.0f}s after start, then a step {r.step3_s:.2f}s"
    return line


def cold_markdown(rows: List[ColdRow], info: str, shape: tuple) -> str:
    B, L, H, N = shape
    lines = [
        f"Cold start on {info}: each model in fresh processes, B={B} L={L} H={H} N={N}, one "
        "training step = forward, backward, SGD step (seconds).  `cold`: empty numba cache; "
        "`warm`: the cache the cold run left.  `ready`: seconds after the process started when "
        "the background compile had filled the cache; `after`: a step then.",
        "",
        "| model | LRNNX_NUMBA_COMPILE | cache | import | build | step 1 | step 2 | ready | after |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.mode} | {r.cache} | {r.import_s:.1f} | {r.build_s:.2f} | "
            f"{r.step1_s:.2f} | {r.step2_s:.2f} | {_fmt(r.ready_s, '.0f')} | "
            f"{_fmt(r.step3_s, '.2f')} |"
        )
    return "\n".join(lines) + "\n"


def run_cold(args: argparse.Namespace, names: List[str], info: str) -> int:
    """``lrnnx bench --cold``: writes cold.md under --out (and --markdown)."""
    print(f"cold start of {len(names)} models, {len(COLD_MODES) * 2} fresh processes each:")
    rows = bench_cold(names, args.quick, getattr(args, "threads", None))
    md = cold_markdown(rows, info, model_shape(args.quick))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "cold.md").write_text(md)
    if getattr(args, "markdown", None):
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text("# lrnnx cold start\n\n" + md)
    print(md)
    print(f"wrote {args.out}/cold.md")
    return 0


# ------------------------------------------------------------------------------------ reports


def machine_info(device: torch.device) -> str:
    """The machine in one line: the CPU with its micro-architecture and widest vector set (one
    model name, e.g. "AMD EPYC", covers generations whose timings differ ~2x), cores, versions."""
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    arch = [torch.backends.cpu.get_cpu_capability()]  # the vector set torch's kernels use
    try:
        import numba
        from llvmlite import binding

        arch.insert(0, binding.get_host_cpu_name())  # what numba compiles for, e.g. znver5
        versions = f"numba {numba.__version__}"
    except ImportError:
        versions = "numba not installed"
    parts = [
        f"{cpu} ({', '.join(arch)}), {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        versions,
    ]
    if device.type == "cuda":
        parts.append(torch.cuda.get_device_name(device))
    return ", ".join(parts)


def _fmt(v: Optional[float], spec: str) -> str:
    return "-" if v is None else format(v, spec)


def markdown(rows: List[Row], info: str, copy_gbps: float) -> str:
    lines = [
        f"Machine: {info}. Copy bandwidth (clone): {copy_gbps:.1f} GB/s.",
        "",
        "| case | shape | backend | fwd ms | fwd+bwd ms | step us | peak MB | GB/s | of copy | speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    noisy = []
    for r in rows:
        speed = ", ".join(
            f"{v:.1f}x vs {k}"
            if k != "picks faster"
            else ("auto picks the faster" if v else "auto picks the slower")
            for k, v in r.speedup.items()
        )
        mark = ""
        if implausible(r):
            mark = " (!)"
            noisy.append(f"{r.name} {r.shape} {r.backend}")
        lines.append(
            f"| {r.name} | {r.shape} | {r.backend} | {r.fwd_ms:.2f}{mark} | {_fmt(r.fwdbwd_ms, '.2f')} | "
            f"{_fmt(r.step_us, '.0f')} | {_fmt(r.peak_mb, '.0f')} | {_fmt(r.gbps, '.1f')} | "
            f"{_fmt(r.frac_copy and 100 * r.frac_copy, '.0f')}{'%' if r.frac_copy else ''} | {speed or '-'} |"
        )
    if noisy:
        lines += [
            "",
            "(!) The forward alone was timed slower than forward + backward, which cannot be: "
            "other load on the machine hit these cases (" + "; ".join(noisy) + "). "
            "Their times and ratios are not to be trusted; run again on a quiet machine.",
        ]
    return "\n".join(lines) + "\n"


def implausible(row: Row) -> bool:
    """Whether a row's times contradict each other: the forward is part of forward + backward,
    so a forward median above the forward + backward median (beyond 5 % of timing noise) means
    the machine was busy while one of them ran."""
    return row.fwdbwd_ms is not None and row.fwd_ms > 1.05 * row.fwdbwd_ms


#: bar colours of the plot: lrnnx's own choice, then each baseline
_ROLE_COLOURS = {
    "lrnnx": "tab:blue",
    "torch": "tab:orange",
    "reference": "tab:red",
    "mambapy": "tab:purple",
    "fft": "tab:green",
    "scan": "tab:olive",
}
_ROLE_LABELS = {
    "lrnnx": "lrnnx (the backend it picks)",
    "torch": "baseline: torch backend (chunked pure PyTorch)",
    "reference": "baseline: reference loop",
    "mambapy": "peer: mambapy parallel scan",
    "fft": "LTI: FFT convolution",
    "scan": "LTI: scan",
}


def _ms(v: float) -> str:
    return f"{v:.0f}" if v >= 100 else f"{v:.3g}"


def _role(row: Row) -> str:
    """Which colour a row gets: lrnnx's choice or the baseline it is."""
    if row.backend in ("auto", "cpu", "triton") or row.backend.startswith("auto->"):
        return "lrnnx"
    return row.backend if row.backend in _ROLE_COLOURS else "torch"


def plot_rows(rows: List[Row], path: Path, title: str) -> bool:
    """A bar per timed case (forward+backward, log scale), coloured by lrnnx vs baseline, with
    the shape in every label and ``title`` on top; False without matplotlib."""
    import textwrap

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    timed = [r for r in rows if r.fwdbwd_ms is not None]
    if not timed:
        return False
    fig, ax = plt.subplots(figsize=(14, 0.32 * len(timed) + 2.2))
    labels = [f"{r.name} [{r.backend}]  {r.shape}" for r in timed]
    roles = [_role(r) for r in timed]
    ax.barh(labels, [r.fwdbwd_ms for r in timed], color=[_ROLE_COLOURS[x] for x in roles])
    for y, r in enumerate(timed):
        ax.annotate(
            f" {_ms(r.fwdbwd_ms)} ms", (r.fwdbwd_ms, y), va="center", fontsize=7, color="0.25"
        )
    handles = [
        matplotlib.patches.Patch(color=_ROLE_COLOURS[x], label=_ROLE_LABELS[x])
        for x in _ROLE_COLOURS
        if x in roles
    ]
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_xscale("log")
    ax.set_xlabel("forward + backward, ms (log scale; shorter is faster)")
    ax.tick_params(axis="y", labelsize=8)
    ax.invert_yaxis()
    lines = title.split("\n", 1)
    head = lines[0] + ("\n" + textwrap.fill(lines[1], 130) if len(lines) > 1 else "")
    ax.set_title(head, fontsize=9, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_reports(
    rows: List[Row], info: str, copy_gbps: float, out: Path, title: Optional[str] = None
) -> str:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "bench.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        w.writeheader()
        for r in rows:
            w.writerow(
                {**asdict(r), "speedup": ";".join(f"{k}={v:.3f}" for k, v in r.speedup.items())}
            )
    md = markdown(rows, info, copy_gbps)
    (out / "bench.md").write_text(md)
    if importlib.util.find_spec("matplotlib") is None:
        print("matplotlib not installed: no bench.png (pip install matplotlib)")
        return md
    plot_rows(rows, out / "bench.png", title or f"lrnnx bench\n{info}")
    return md


# ---------------------------------------------------------------------------------------- CLI


def _positive_int(text: str) -> int:
    """An argparse type: a positive integer (else argparse's one-line error)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small shapes (ops at 1/16-1/32 of the full sweep's headline sizes, models at "
        "B=1 L=256 H=64, one LTI length): about a minute on a 2-core CPU, a line per case as it "
        "goes, plus the one-time compilation of the fused CPU kernels on a first run",
    )
    parser.add_argument(
        "--models",
        nargs="*",
        default=None,
        help="models to time (default: all available; none: --models with no names)",
    )
    parser.add_argument("--ops", nargs="*", default=list(OPS), choices=OPS, help="ops to time")
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where to measure: cpu, cuda or cuda:N (cuda where there is a GPU)",
    )
    parser.add_argument(
        "--repeats", type=_positive_int, default=3, help="timed repeats per case (median)"
    )
    parser.add_argument(
        "--out", default="bench_out", help="folder for bench.csv, bench.md, bench.png"
    )
    parser.add_argument(
        "--markdown", default=None, help="also write the markdown report here (e.g. RESULTS.md)"
    )
    parser.add_argument(
        "--threads", type=_positive_int, default=None, help="torch threads (default: all)"
    )
    parser.add_argument("--no-lti", action="store_true", help="skip the LTI FFT-vs-scan comparison")
    parser.add_argument(
        "--cold",
        action="store_true",
        help="instead of the timings: each model's first training steps in fresh processes, "
        "with an empty numba cache and then a warm one, for each LRNNX_NUMBA_COMPILE mode",
    )
    parser.add_argument(
        "--packing",
        action="store_true",
        help="instead of the timings: tokens/s of forward+backward, padded (lengths) vs packed "
        "(cu_seqlens), per model family at log-normal sequence lengths",
    )
    from lrnnx.bench_packing import add_packing_arguments

    add_packing_arguments(parser)
    parser.add_argument(
        "--small",
        action="store_true",
        help="instead of the timings: per-call overhead at B=1, L=1..64, the LM's step per "
        "mixer and generate per token, default path vs torch backend (--small-busy: again with "
        "another process keeping every core busy)",
    )
    from lrnnx.bench_small import add_small_arguments

    add_small_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from lrnnx.models.registry import available_models, resolve_name

    device = torch.device(args.device)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    names = available_models() if args.models is None else [resolve_name(m) for m in args.models]
    info = machine_info(device)
    print(f"lrnnx bench on {info}")
    if getattr(args, "cold", False):
        return run_cold(args, names, info)
    if getattr(args, "small", False):
        from lrnnx.bench_small import run_small

        with _env(**{COMPILE_ENV: "wait"}):  # time the fused kernels
            return run_small(args)
    if getattr(args, "packing", False):
        from lrnnx.bench_packing import run_packing

        with _env(**{COMPILE_ENV: "wait"}):  # time the fused kernels
            return run_packing(args)
    with _env(**{COMPILE_ENV: "wait"}):  # time the fused kernels, compiled before timing
        return _run_cases(args, device, names, info)


def _run_cases(args: argparse.Namespace, device: torch.device, names: List[str], info: str) -> int:
    copy_gbps = copy_bandwidth(device, 64 if args.quick else 256)
    prealloc_gbps = copy_bandwidth(device, 64 if args.quick else 256, preallocated=True)
    # the ops allocate their outputs, so the clone (allocation included) is the yardstick; the
    # copy into an existing tensor shows how much of it is page faulting on this machine
    info += f"; copy into an existing tensor {prealloc_gbps:.1f} GB/s"
    print(f"copy bandwidth: {copy_gbps:.1f} GB/s (into an existing tensor {prealloc_gbps:.1f})")
    cases = plan_cases(args, device, names, copy_gbps)
    print(
        f"{len(cases)} cases{' (--quick)' if args.quick else ''}, one line each as it finishes "
        "(forward+backward times; the first use of the fused CPU kernels also compiles them):",
        flush=True,
    )
    rows: List[Row] = []
    t_start = time.perf_counter()
    width = len(str(len(cases)))
    for i, (label, measure) in enumerate(cases, 1):
        t0 = time.perf_counter()
        case_rows = measure()
        rows += case_rows
        print(
            f"[{i:>{width}}/{len(cases)}] {label}: {case_summary(case_rows)}"
            f"  ({time.perf_counter() - t0:.1f}s)",
            flush=True,
        )
    elapsed = time.perf_counter() - t_start
    print(f"measured {len(cases)} cases in {elapsed:.0f}s", flush=True)
    title = (
        f"lrnnx bench{' --quick' if args.quick else ''} on {device.type}: forward+backward time "
        f"per case (shapes in the labels)\n{info}"
    )
    md = write_reports(rows, info, copy_gbps, Path(args.out), title=title)
    if "selective_scan" in args.ops:  # the fused scan against a plain yardstick kernel
        from lrnnx.bench_yardstick import add_yardstick_section

        md = add_yardstick_section(md, args.quick, device)
    if getattr(args, "markdown", None):
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(_results_page(md, args))
    print(md)
    print(
        f"wrote {args.out}/bench.csv, bench.md"
        + (", bench.png" if (Path(args.out) / "bench.png").exists() else "")
    )
    return 0


def plan_cases(
    args: argparse.Namespace, device: torch.device, names: List[str], copy_gbps: float
) -> List[tuple[str, Callable[[], List[Row]]]]:
    """The run's cases in order, each a label and a function measuring it (its rows)."""
    quick, repeats = args.quick, args.repeats
    cases: List[tuple[str, Callable[[], List[Row]]]] = []
    if "linear_scan" in args.ops:
        for shape in linear_scan_shapes(quick):
            label = "linear_scan B={} L={} C={}".format(*shape)
            cases.append(
                (label, partial(bench_linear_scan, device, quick, copy_gbps, repeats, [shape]))
            )
    if "selective_scan" in args.ops:
        for shape in selective_scan_shapes(quick):
            label = "selective_scan b={} d={} n={} L={}".format(*shape)
            measure = partial(bench_selective_scan, device, quick, copy_gbps, repeats, [shape])
            cases.append((label, measure))
    if "causal_conv1d" in args.ops:
        for shape in causal_conv1d_shapes(quick):
            label = "causal_conv1d B={} D={} L={} K={}".format(*shape)
            measure = partial(bench_causal_conv1d, device, quick, copy_gbps, repeats, [shape])
            cases.append((label, measure))
    B, L, H, N = model_shape(quick)
    for name in names:
        label = f"model {name} B={B} L={L} H={H} N={N}"
        cases.append((label, partial(bench_models, [name], device, quick, repeats)))
    if names and not getattr(args, "no_lti", False):
        for L in lti_lengths(quick):
            label = f"LRU, S5 at L={L}: FFT vs scan"
            cases.append((label, partial(bench_lti_modes, device, quick, repeats, [L])))
    return cases


def case_summary(rows: List[Row]) -> str:
    """One line for a measured case: each backend's forward+backward time, and lrnnx's speed-up."""
    parts = []
    for r in rows:
        ms = r.fwdbwd_ms if r.fwdbwd_ms is not None else r.fwd_ms
        name = r.name.split(" mode=")[0] + " " if " mode=" in r.name else ""
        parts.append(f"{name}{r.backend} {_ms(ms)} ms")
    speed = [f"{v:.1f}x vs {k}" for r in rows for k, v in r.speedup.items() if k != "picks faster"]
    picks = [r for r in rows if "picks faster" in r.speedup]
    if picks:
        faster = all(r.speedup["picks faster"] for r in picks)
        speed.append(f"auto picks the {'faster' if faster else 'slower'}")
    return ", ".join(parts) + (f" ({'; '.join(speed)})" if speed else "")


def _results_page(md: str, args: argparse.Namespace) -> str:
    """The markdown report with a title, the command line and how to read it."""
    cmd = "lrnnx bench" + (" --quick" if args.quick else "") + f" --device {args.device}"
    return (
        "# lrnnx benchmark results\n\n"
        f"Produced by `{cmd}` on {datetime.date.today().isoformat()} (see "
        "`benchmarks/README.md`).  Times are medians after a warm-up; "
        "`speed-up` is the baseline's forward+backward time over lrnnx's choice, measured in the "
        "same process right after it; `peak MB` is the resident memory added by one "
        "forward+backward (inputs excluded); `of copy` is the forward pass's bytes moved per "
        "second as a fraction of `x.clone()` bandwidth (meaningful for memory-bound ops: "
        "linear_scan, causal_conv1d).\n\n" + md
    )


def add_bench_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``bench`` subcommand on an ``add_subparsers()`` object (runs :func:`run_bench`)."""
    p = subparsers.add_parser("bench", help="speed and memory vs the pure-torch baseline")
    add_arguments(p)
    p.set_defaults(func=run_bench)
    return p


def run_bench(args: argparse.Namespace) -> int:
    """Run the benchmark for parsed ``args`` (same as :func:`run`)."""
    return run(args)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lrnnx.bench", description=__doc__.split("\n")[0]
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

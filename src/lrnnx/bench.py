"""``lrnnx bench``: speed and memory of every op and model, beside the pure-torch baseline.

Every case is timed in this process as a median over repeats after a warm-up, once with the
backend lrnnx picks for the device and once with a baseline run right after it (the ``torch``
backend, and for ops also the ``reference`` loop where affordable), so the ratio column compares
like with like on a machine whatever else it is doing.

Peak memory is the largest resident set size (RSS) seen above the level before the case, sampled
every 0.5 ms by a background thread while the case runs: torch releases the GIL inside its kernels
(numba too, with ``nogil``-free parallel regions running in their own threads), and on CPU large
tensors come straight from the OS, so RSS follows live tensor memory.  On CUDA the number is
``torch.cuda.max_memory_allocated``.

Memory-bound ops report the bandwidth they reach (bytes they must read and write / time) as a
fraction of the machine's copy bandwidth, measured as ``x.clone()`` of a large tensor (allocation
included, as every op allocates its output).

Run ``lrnnx bench [--quick] [--models ...] [--ops ...] [--out DIR]`` or ``python -m lrnnx.bench``.
Writes ``bench.csv``, ``bench.md`` and (with matplotlib) ``bench.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import csv
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
from typing import Callable, Dict, Iterator, List, Optional

import torch

from lrnnx.ops import _dispatch, linear_scan, selective_scan_fn

OPS = ("linear_scan", "selective_scan")


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
    start = _rss_bytes()
    peak = [start]
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
        result["mb"] = (peak[0] - start) / 2**20


def copy_bandwidth(device: torch.device, mbytes: int) -> float:
    """GB/s of ``x.clone()`` (read + write) for a tensor of ``mbytes`` MB."""
    x = torch.randn(mbytes * 2**20 // 4, device=device)
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


def bench_linear_scan(
    device: torch.device, quick: bool, copy_gbps: float, repeats: int
) -> List[Row]:
    B, L, C = (1, 2048, 8192) if quick else (1, 2048, 32768)
    a = (torch.rand(B, L, C, device=device) * 0.5 + 0.5).requires_grad_()
    b = torch.randn(B, L, C, device=device, requires_grad=True)
    bytes_moved = 3 * a.numel() * 4  # read a, b; write h
    rows = []
    chosen = _dispatch.select("linear_scan", device)[0]
    for backend in dict.fromkeys([chosen, "torch"]):
        f, fb, mem = _time_backend(
            lambda be=backend: linear_scan(a, b, backend=be), [a, b], device, repeats
        )
        gbps = bytes_moved / (f * 1e-3) / 1e9
        rows.append(
            Row(
                "op",
                "linear_scan",
                f"B={B} L={L} C={C}",
                backend,
                f,
                fb,
                None,
                mem,
                gbps,
                gbps / copy_gbps,
            )
        )
    _add_speedups(rows)
    return rows


def bench_selective_scan(
    device: torch.device, quick: bool, copy_gbps: float, repeats: int
) -> List[Row]:
    b, d, n, L = (2, 256, 16, 1024) if quick else (2, 1024, 16, 2048)
    g = torch.Generator(device="cpu").manual_seed(0)

    def t(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device).requires_grad_()

    u, delta, z = t(b, d, L), t(b, d, L, scale=0.5), t(b, d, L)
    A = (-torch.rand(d, n, generator=g) - 0.5).to(device).requires_grad_()
    Bm, Cm, D, bias = t(b, n, L), t(b, n, L), t(d), t(d, scale=0.1)
    inputs = [u, delta, A, Bm, Cm, D, z, bias]
    bytes_moved = (4 * b * d * L + 2 * b * n * L) * 4  # read u, delta, z, B, C; write y
    backends = [_dispatch.select("selective_scan", device)[0], "torch"]
    if not quick or device.type != "cpu":
        backends.append("reference")  # the textbook loop: slow, but the baseline the issue names
    rows = []
    for backend in dict.fromkeys(backends):
        reps = 1 if backend == "reference" else repeats

        def fwd(be=backend):
            return selective_scan_fn(
                u, delta, A, Bm, Cm, D, z=z, delta_bias=bias, delta_softplus=True, backend=be
            )

        f, fb, mem = _time_backend(fwd, inputs, device, reps)
        gbps = bytes_moved / (f * 1e-3) / 1e9
        rows.append(
            Row(
                "op",
                "selective_scan",
                f"b={b} d={d} n={n} L={L}",
                backend,
                f,
                fb,
                None,
                mem,
                gbps,
                gbps / copy_gbps,
            )
        )
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
def _backend_env(name: Optional[str]) -> Iterator[None]:
    old = os.environ.get("LRNNX_BACKEND")
    if name is None:
        os.environ.pop("LRNNX_BACKEND", None)
    else:
        os.environ["LRNNX_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("LRNNX_BACKEND", None)
        else:
            os.environ["LRNNX_BACKEND"] = old


def bench_models(names: List[str], device: torch.device, quick: bool, repeats: int) -> List[Row]:
    from lrnnx.models.registry import build_mixer

    Bsz, L, H, N = (2, 512, 128, 16) if quick else (4, 2048, 256, 16)
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


def bench_lti_modes(device: torch.device, quick: bool, repeats: int) -> List[Row]:
    """LTI models at long L: FFT convolution vs scan, and what ``mode="auto"`` picks."""
    from lrnnx.models.lti import LRU, S5

    L = 4096 if quick else 16384
    rows = []
    for cls, kw in ((LRU, {}), (S5, {"discretization": "zoh"})):
        model = cls(64, 64, **kw).to(device)
        x = torch.randn(1, L, 64, device=device)
        times = {}
        for mode in ("fft", "scan", "auto"):
            model.mode = mode
            with torch.no_grad():
                times[mode] = median_ms(partial(model, x), device, repeats)
            rows.append(
                Row(
                    "model",
                    f"{cls.__name__} mode={mode}",
                    f"B=1 L={L} H=64 N=64",
                    mode,
                    times[mode],
                )
            )
        faster = min(("fft", "scan"), key=times.get)
        rows[-1].speedup["picks faster"] = float(times["auto"] <= 1.1 * times[faster])
    return rows


# ------------------------------------------------------------------------------------ reports


def machine_info(device: torch.device) -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    parts = [
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    ]
    try:
        import numba

        parts.append(f"numba {numba.__version__}")
    except ImportError:
        parts.append("numba not installed")
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
    for r in rows:
        speed = ", ".join(
            f"{v:.1f}x vs {k}"
            if k != "picks faster"
            else ("auto picks the faster" if v else "auto picks the slower")
            for k, v in r.speedup.items()
        )
        lines.append(
            f"| {r.name} | {r.shape} | {r.backend} | {r.fwd_ms:.2f} | {_fmt(r.fwdbwd_ms, '.2f')} | "
            f"{_fmt(r.step_us, '.0f')} | {_fmt(r.peak_mb, '.0f')} | {_fmt(r.gbps, '.1f')} | "
            f"{_fmt(r.frac_copy and 100 * r.frac_copy, '.0f')}{'%' if r.frac_copy else ''} | {speed or '-'} |"
        )
    return "\n".join(lines) + "\n"


def write_reports(rows: List[Row], info: str, copy_gbps: float, out: Path) -> str:
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
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no bench.png (pip install matplotlib)")
        return md
    timed = [r for r in rows if r.fwdbwd_ms is not None]
    fig, ax = plt.subplots(figsize=(10, 0.35 * len(timed) + 1.5))
    labels = [f"{r.name} [{r.backend}]" for r in timed]
    ax.barh(labels, [r.fwdbwd_ms for r in timed])
    ax.set_xscale("log")
    ax.set_xlabel("forward + backward, ms (log scale)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(out / "bench.png", dpi=120)
    plt.close(fig)
    return md


# ---------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quick", action="store_true", help="small shapes: the whole run in about a minute"
    )
    parser.add_argument(
        "--models",
        nargs="*",
        default=None,
        help="models to time (default: all available; none: --models with no names)",
    )
    parser.add_argument("--ops", nargs="*", default=list(OPS), choices=OPS, help="ops to time")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per case (median)")
    parser.add_argument(
        "--out", default="bench_out", help="folder for bench.csv, bench.md, bench.png"
    )


def run(args: argparse.Namespace) -> int:
    from lrnnx.models.registry import available_models, resolve_name

    device = torch.device(args.device)
    names = available_models() if args.models is None else [resolve_name(m) for m in args.models]
    info = machine_info(device)
    print(f"lrnnx bench on {info}")
    copy_gbps = copy_bandwidth(device, 64 if args.quick else 256)
    print(f"copy bandwidth: {copy_gbps:.1f} GB/s")
    rows: List[Row] = []
    if "linear_scan" in args.ops:
        rows += bench_linear_scan(device, args.quick, copy_gbps, args.repeats)
    if "selective_scan" in args.ops:
        rows += bench_selective_scan(device, args.quick, copy_gbps, args.repeats)
    if names:
        rows += bench_models(names, device, args.quick, args.repeats)
        rows += bench_lti_modes(device, args.quick, args.repeats)
    md = write_reports(rows, info, copy_gbps, Path(args.out))
    print(md)
    print(
        f"wrote {args.out}/bench.csv, bench.md"
        + (", bench.png" if (Path(args.out) / "bench.png").exists() else "")
    )
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lrnnx.bench", description=__doc__.split("\n")[0]
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

"""Packed vs padded throughput: tokens per second of forward + backward, per model family.

A batch of S sequences with realistic, long-tailed lengths (log-normal, mean ``mean_len``,
clipped to [1, ``max_len``], as document lengths in text corpora are) is run two ways through
the same mixer (:func:`lrnnx.models.registry.build_mixer`):

* padded: x (S, L_max, H) with ``lengths`` (L_max = the batch's longest sequence, as a data
  loader pads), so every sequence costs L_max steps;
* packed: x (1, T, H) with ``cu_seqlens``, T = the sum of the lengths, no padding.

Both compute the same outputs for the valid tokens (tested in tests/test_packed_architectures.py),
so the throughput counts only the T real tokens: tokens/s = T / (forward + backward time).  The
ratio packed / padded is what packing buys at that spread; with mean 256 and max 2048 a batch
is mostly padding (L_max is several times the mean), so time-linear models gain close to
S L_max / T, while attention's packed mask is (T, T) and may gain less or lose.

``lrnnx bench --packing`` runs :func:`run_packing` (or ``python -m lrnnx.bench_packing``).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor

#: the model families compared by default (registry names)
FAMILIES = ("mamba", "s5", "lru", "s4d", "attn", "rglru")


@dataclass
class PackingRow:
    """One model's padded and packed timings (forward + backward, median over repeats)."""

    model: str
    n_seqs: int  # S
    tokens: int  # T, the real tokens
    padded_len: int  # L_max
    padded_ms: float
    packed_ms: float

    @property
    def padded_tok_s(self) -> float:
        return self.tokens / (self.padded_ms / 1e3)

    @property
    def packed_tok_s(self) -> float:
        return self.tokens / (self.packed_ms / 1e3)

    @property
    def ratio(self) -> float:
        """Packed throughput over padded (> 1: packing is faster)."""
        return self.padded_ms / self.packed_ms


def sample_lengths(
    n_seqs: int, mean_len: float = 256, max_len: int = 2048, sigma: float = 1.0, seed: int = 0
) -> Tensor:
    """(n_seqs,) int64 lengths from a log-normal with mean ``mean_len`` before clipping to
    [1, max_len] (mu = log mean - sigma^2 / 2); sigma = 1 puts about 0.5 % above 2048 at mean
    256.  Deterministic by ``seed``."""
    if n_seqs < 1 or max_len < 1 or not mean_len > 0 or not sigma >= 0:
        raise ValueError(
            f"n_seqs, mean_len, max_len, sigma: expected n_seqs >= 1, mean_len > 0, max_len >= 1, "
            f"sigma >= 0, got {n_seqs}, {mean_len}, {max_len}, {sigma}"
        )
    gen = torch.Generator().manual_seed(seed)
    mu = math.log(mean_len) - sigma**2 / 2
    z = torch.randn(n_seqs, generator=gen, dtype=torch.float64)
    return torch.exp(mu + sigma * z).round().long().clamp(1, max_len)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(fn: Callable[[], None], device: torch.device, repeats: int) -> float:
    fn()  # warm-up: kernel compilation, caches, allocator
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _fwd_bwd(model: torch.nn.Module, x: Tensor, **kwargs: Tensor) -> Callable[[], None]:
    """One forward + backward of ``model(x, **kwargs)`` (gradients of x and the parameters)."""

    def run() -> None:
        xg = x.detach().requires_grad_()
        model(xg, **kwargs).float().square().mean().backward()
        model.zero_grad(set_to_none=True)

    return run


def bench_packing(
    models: Sequence[str] = FAMILIES,
    n_seqs: int = 16,
    mean_len: float = 256,
    max_len: int = 2048,
    d_model: int = 256,
    d_state: int = 16,
    device: str | torch.device = "cpu",
    repeats: int = 3,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    log: Optional[Callable[[str], None]] = None,
) -> List[PackingRow]:
    """Time padded vs packed forward + backward for each model (see the module docstring).

    Args:
        models: registry names (one mixer each, built by ``build_mixer(name, d_model,
            d_state)``; attention with its defaults).
        n_seqs: S, sequences per batch.  mean_len, max_len: the length distribution
            (:func:`sample_lengths`).  d_model, d_state: the mixers' sizes.
        device, dtype: where and in what precision to run.  repeats: timed runs (median).
        seed: the lengths' and the inputs' seed.  log: called with one line per model.

    Returns:
        One :class:`PackingRow` per model.
    """
    from lrnnx.models.registry import build_mixer

    device = torch.device(device)
    lengths = sample_lengths(n_seqs, mean_len, max_len, seed=seed)
    T, L = int(lengths.sum()), int(lengths.max())
    cu = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
    gen = torch.Generator().manual_seed(seed + 1)
    x_packed = torch.randn(1, T, d_model, generator=gen).to(device, dtype)
    # the same tokens as a padded batch (zeros after each length)
    valid = torch.arange(L)[None, :] < lengths[:, None]
    x_padded = x_packed.new_zeros(n_seqs, L, d_model)
    x_padded[valid.to(device)] = x_packed[0]
    lengths_dev = lengths.to(device)
    rows = []
    for name in models:
        torch.manual_seed(seed)
        model = build_mixer(name, d_model, d_state).to(device, dtype)
        padded = _median_ms(_fwd_bwd(model, x_padded, lengths=lengths_dev), device, repeats)
        packed = _median_ms(_fwd_bwd(model, x_packed, cu_seqlens=cu), device, repeats)
        row = PackingRow(name, n_seqs, T, L, padded, packed)
        rows.append(row)
        if log is not None:
            log(format_row(row))
    return rows


def format_row(row: PackingRow) -> str:
    return (
        f"{row.model:>8}: padded {row.padded_ms:9.1f} ms ({_rate(row.padded_tok_s)} tok/s)  "
        f"packed {row.packed_ms:9.1f} ms ({_rate(row.packed_tok_s)} tok/s)  "
        f"packed/padded {row.ratio:5.2f}x"
    )


def _rate(x: float) -> str:
    return f"{x / 1e6:6.2f}M" if x >= 1e6 else f"{x / 1e3:6.1f}k"


def markdown(rows: List[PackingRow], header: str) -> str:
    """A markdown table of the rows under a one-line ``header``."""
    lines = [
        header,
        "",
        "| model | padded ms | packed ms | padded tok/s | packed tok/s | packed / padded |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.padded_ms:.1f} | {r.packed_ms:.1f} | {_rate(r.padded_tok_s)} "
            f"| {_rate(r.packed_tok_s)} | {r.ratio:.2f}x |"
        )
    return "\n".join(lines)


def add_packing_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of :func:`run_packing` (prefixed, so they sit beside ``lrnnx bench``'s)."""
    parser.add_argument("--pack-seqs", type=int, default=16, help="--packing: sequences/batch")
    parser.add_argument("--pack-mean-len", type=float, default=256, help="--packing: mean length")
    parser.add_argument("--pack-max-len", type=int, default=2048, help="--packing: max length")
    parser.add_argument("--pack-d-model", type=int, default=256, help="--packing: mixer width")


def run_packing(args: argparse.Namespace) -> int:
    """The CLI entry: times the families (``args.models`` if given, else :data:`FAMILIES`) on
    ``args.device`` and prints the lines and a markdown table (also written to
    ``args.markdown`` when set)."""
    device = torch.device(getattr(args, "device", "cpu"))
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    models = getattr(args, "models", None) or list(FAMILIES)
    S, mean, mx = args.pack_seqs, args.pack_mean_len, args.pack_max_len
    lengths = sample_lengths(S, mean, mx)
    header = (
        f"Packed vs padded, forward+backward on {device.type}: S={S} sequences, log-normal "
        f"lengths (mean {mean:g}, max {mx}; drawn: T={int(lengths.sum())} tokens, padded to "
        f"L_max={int(lengths.max())}), d_model={args.pack_d_model}, d_state=16, float32"
    )
    print(header, flush=True)
    rows = bench_packing(
        models, S, mean, mx, args.pack_d_model, 16, device, getattr(args, "repeats", 3),
        log=lambda line: print(line, flush=True),
    )  # fmt: skip
    md = markdown(rows, header)
    print(md)
    if getattr(args, "markdown", None):
        with open(args.markdown, "w") as f:
            f.write(md + "\n")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lrnnx.bench_packing", description=__doc__)
    parser.add_argument("--models", nargs="*", default=None, help=f"default: {list(FAMILIES)}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--markdown", default=None, help="write the table here too")
    add_packing_arguments(parser)
    return run_packing(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

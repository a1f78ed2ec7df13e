"""lrnnx's fused CPU selective scan against the yardstick kernel, alone (no other bench cases).

    LRNNX_NUMBA_COMPILE=wait python benchmarks/yardstick.py [--threads N] [--quick]
        [--shape b d n L ...]

Prints, per shape, lrnnx's forward+backward and forward time over the yardstick's (the plain
Mamba recurrence, state in registers, backward by recompute: :mod:`lrnnx.bench_yardstick`) and
the fractions of the machine's exp throughput and copy bandwidth the fused scan reaches, all
measured in this process.  ``lrnnx bench`` prints the same rows with the other cases.
"""

from __future__ import annotations

import argparse

import torch

from lrnnx.bench_yardstick import yardstick_markdown, yardstick_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--quick", action="store_true", help="headline shape at L / 4")
    parser.add_argument(
        "--shape", type=int, nargs=4, action="append", metavar=("b", "d", "n", "L"),
        help="a shape to measure instead of the headline and small ones (repeatable)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"threads: {torch.get_num_threads()}")
    shapes = [tuple(s) for s in args.shape] if args.shape else None
    rows = yardstick_rows(quick=args.quick, shapes=shapes)
    print(yardstick_markdown(rows))


if __name__ == "__main__":
    main()

"""Training-step time of the small selective-copying LM with Mamba against S4D (issue #11,
"Small shapes"), with the torch profiler's table on request.

    python benchmarks/lm_step_ratio.py [--threads N] [--repeats R]
        [--models mamba s4d ...] [--profile]

Both LMs are what ``lrnnx train`` builds for the task (2 layers, d_model = 64, d_state = 16,
B = 64, L = 68 by default); one step is forward, loss, backward and an AdamW update on a fresh
batch (:func:`lrnnx.bench_small.train_step_fn`).  The steps are timed in turns in one process
(so load on the machine hits them alike) and each median is printed with its ratio to S4D's
(:func:`lrnnx.bench_small.train_rows`; ``lrnnx bench --small --small-train`` prints the same
table for every mixer).  ``--profile`` adds the torch profiler's table of the first model's
step (where its time goes).
"""

from __future__ import annotations

import argparse
import os

# time the fused kernels, compiled in this process first: in the default "background" mode a cold
# cache ran the steps on the torch fallback meanwhile (Mamba's step then took 15x longer)
os.environ.setdefault("LRNNX_NUMBA_COMPILE", "wait")

import torch  # noqa: E402

from lrnnx.bench_small import train_markdown, train_rows, train_step_fn  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--models", nargs="+", default=["mamba"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--repeats", type=int, default=20, help="timed steps per model")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=68)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = dict(batch=args.batch, seq_len=args.seq_len, d_model=args.d_model, layers=args.layers)
    print(train_markdown(train_rows(args.models, args.repeats, **shape)))
    if args.profile:
        first = train_step_fn(args.models[0], **shape)
        first()
        with torch.profiler.profile() as prof:
            for _ in range(5):
                first()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()

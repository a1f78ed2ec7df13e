"""Training-step time of the small selective-copying LM with Mamba against S4D (issue #11,
"Small shapes": Mamba's step no more than 1.5x S4D's).

    LRNNX_NUMBA_COMPILE=wait python benchmarks/lm_step_ratio.py [--threads N] [--repeats R]
        [--models mamba s4d ...] [--profile]

Both LMs are what ``lrnnx train`` builds for the task (2 layers, d_model = 64, d_state = 16,
B = 64, L = 68 by default); one step is forward, loss, backward and an AdamW update on a fresh
batch.  The models' steps are timed in turns in one process (so load on the machine hits them
alike) and the median of each is printed with its ratio to the last model's (S4D by default).
``--profile`` adds the torch profiler's table of the first model's step (where its time goes).
"""

from __future__ import annotations

import argparse
import time

import torch

from lrnnx.train import TrainConfig, batch_indices, forward_batch, prepare


def step_fn(model_name: str, args: argparse.Namespace):
    """A closure running one training step of ``model_name``'s LM on the next batch."""
    cfg = TrainConfig(task="selective-copy", model=model_name, layers=args.layers,
                      d_model=args.d_model, d_state=16, batch_size=args.batch,
                      seq_len=args.seq_len, n_train=4 * args.batch, n_test=args.batch,
                      steps=1)  # fmt: skip
    prep = prepare(cfg)
    model = prep.model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = prep.data
    count = [0]

    def step() -> None:
        if args.threads:  # kernels' thread handling may leave torch's count changed
            torch.set_num_threads(args.threads)
        idx = batch_indices(len(data.train), cfg.batch_size, cfg.seed, 0, count[0] % 4)
        count[0] += 1
        loss, _, _ = forward_batch(model, data.train[idx], data.kind)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mamba", "s4d"])
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
    steps = {name: step_fn(name, args) for name in args.models}
    for step in steps.values():  # warm up: compile or load kernels, first allocations
        step()
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    median = {name: sorted(ts)[len(ts) // 2] * 1e3 for name, ts in times.items()}
    base = args.models[-1]
    print(f"threads: {torch.get_num_threads()}; B={args.batch} L={args.seq_len} "
          f"d_model={args.d_model} layers={args.layers}; median of {args.repeats} steps")  # fmt: skip
    for name, ms in median.items():
        print(f"  {name:>10}: {ms:8.2f} ms per training step, {ms / median[base]:.2f}x {base}")
    if args.profile:
        first = steps[args.models[0]]
        with torch.profiler.profile() as prof:
            for _ in range(5):
                first()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()

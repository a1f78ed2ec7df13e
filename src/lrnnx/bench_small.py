"""Small work: per-call overhead, decoding steps and generation per token, on a quiet machine
and on a busy one (issue #11, "Small shapes", "Decoding", "Across CPUs and under load").

Three kinds of rows, each timed on lrnnx's default path (``LRNNX_BACKEND`` unset: the fused
kernels where they pay, with the small-work rules of :mod:`lrnnx.ops._dispatch` and
:mod:`lrnnx.ops._numba`) and on the pure-torch backend (``LRNNX_BACKEND=torch``):

* ``forward``: one mixer's inference forward at B = 1 and L = 1, 4, 16, 64 (d_model 64,
  d_state 16), where dispatch, validation and glue are most of the cost;
* ``lm step``: one decoding step of a 2-layer LM (:class:`lrnnx.architectures.LRNNLMHeadModel`,
  d_model 64, vocabulary 256) with that mixer, microseconds per token;
* ``generate``: :func:`lrnnx.utils.generation.generate`'s decoding loop per new token (step,
  greedy choice, bookkeeping) after an 8-token prompt.

Beside them, :func:`train_rows` times one training step (forward, loss, backward, AdamW) of
the LM ``lrnnx train`` builds for selective copying (2 layers, d_model 64, d_state 16, B = 64,
L = 68) with each mixer on the default path, in turns, and gives each step's ratio to S4D's
(issue #11: Mamba's step against a same-size S4D step).

The two paths are timed in alternation (load on the machine hits both alike) and each row
gives their medians and the ratio default / torch: the claim is that the ratio stays <= 1 (up
to noise), i.e. the default path never loses to the torch backend at these sizes.  With
``busy=True`` the same rows are measured again while a separate process keeps every core busy
with torch matrix products (:func:`busy_machine`): on a shared or oversubscribed machine a
parallel region on tiny work waits for a descheduled thread, so this is where a wrong thread
count shows.

``python -m lrnnx.bench_small [--busy] [--models ...]``, or ``lrnnx bench --small`` once hooked
into :mod:`lrnnx.bench`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence

import torch

#: sequence lengths of the per-call overhead rows (B = 1)
LENGTHS = (1, 4, 16, 64)
#: model width, state size, LM depth and vocabulary of every row
D_MODEL, D_STATE, LM_LAYERS, VOCAB = 64, 16, 2, 256
#: the prompt length and the new tokens of the ``generate`` rows
PROMPT, NEW_TOKENS = 8, 16

_COMPILE_ENV = "LRNNX_NUMBA_COMPILE"


@dataclass
class SmallRow:
    """One case timed on the default path and on the torch backend (medians, microseconds)."""

    case: str  # "forward", "lm step" or "generate"
    model: str
    shape: str
    default_us: float
    torch_us: float
    busy: bool = False

    @property
    def ratio(self) -> float:
        """default / torch: <= 1 means the default path is at least as fast."""
        return self.default_us / max(self.torch_us, 1e-9)


def _set_env(key: str, value: Optional[str]) -> None:
    if value is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = value


@contextmanager
def _backend(name: Optional[str]) -> Iterator[None]:
    """``LRNNX_BACKEND=name`` (None: unset, lrnnx's choice) with the fused kernels compiled in
    this process (never replaced by the torch backend while a background compile runs)."""
    old = {k: os.environ.get(k) for k in ("LRNNX_BACKEND", _COMPILE_ENV)}
    _set_env("LRNNX_BACKEND", name)
    _set_env(_COMPILE_ENV, "wait")
    try:
        yield
    finally:
        for k, v in old.items():
            _set_env(k, v)


def paired_us(
    default: Callable[[], object], torch_path: Callable[[], object], repeats: int
) -> tuple[float, float]:
    """Median microseconds of ``default`` (run with lrnnx's choice) and ``torch_path`` (run
    with ``LRNNX_BACKEND=torch``), timed in alternation after one untimed call of each (which
    also compiles the fused kernels)."""
    times: tuple[list, list] = ([], [])
    for i in range(repeats + 1):
        for j, (name, fn) in enumerate(((None, default), ("torch", torch_path))):
            with _backend(name):
                t0 = time.perf_counter()
                fn()
                if i:
                    times[j].append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times[0]), statistics.median(times[1])


def forward_rows(names: Sequence[str], repeats: int, lengths: Sequence[int] = LENGTHS):
    """Inference forward of each mixer at B = 1 and each length: per-call overhead rows."""
    from lrnnx.models.registry import build_mixer

    rows = []
    for name in names:
        torch.manual_seed(0)
        model = build_mixer(name, D_MODEL, D_STATE).eval()
        for L in lengths:
            x = torch.randn(1, L, D_MODEL)

            def fwd(model=model, x=x) -> None:
                with torch.no_grad():
                    model(x)

            d, t = paired_us(fwd, fwd, repeats)
            rows.append(SmallRow("forward", name, f"B=1 L={L} H={D_MODEL} N={D_STATE}", d, t))
    return rows


def _lm(name: str) -> torch.nn.Module:
    from lrnnx.architectures.lm import LRNNLMHeadModel

    torch.manual_seed(0)
    return LRNNLMHeadModel(
        d_model=D_MODEL, d_state=D_STATE, n_layer=LM_LAYERS, vocab_size=VOCAB, mixer_types=name
    ).eval()


def lm_rows(names: Sequence[str], repeats: int) -> List[SmallRow]:
    """Per mixer: one LM decoding step (us/token) and generate's decoding loop per new token."""
    from lrnnx.utils.generation import generate

    rows = []
    shape = f"B=1 layers={LM_LAYERS} H={D_MODEL} N={D_STATE} V={VOCAB}"
    for name in names:
        lm = _lm(name)
        ids = torch.tensor([3])
        cache = lm.allocate_inference_cache(1)

        def step(lm=lm, cache=cache, ids=ids) -> None:
            with torch.no_grad():
                lm.step(ids, cache)

        d, t = paired_us(step, step, repeats)
        rows.append(SmallRow("lm step", name, shape, d, t))
        prompt = torch.randint(0, VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(0))
        per_token: list = []

        def gen(lm=lm, per_token=per_token, prompt=prompt) -> None:
            out = generate(lm, prompt, NEW_TOKENS, return_dict_in_generate=True)
            per_token.append(out.decode_s * 1e6 / max(out.num_new_tokens - 1, 1))

        paired_us(gen, gen, max(1, repeats // 4))
        # per_token alternates default, torch (the first pair untimed by paired_us: dropped)
        d = statistics.median(per_token[2::2])
        t = statistics.median(per_token[3::2])
        rows.append(SmallRow("generate", name, f"{shape} prompt={PROMPT} new={NEW_TOKENS}", d, t))
    return rows


#: the training shape of :func:`train_rows`: ``lrnnx train``'s selective-copying LM
TRAIN_SHAPE = dict(layers=2, d_model=64, batch=64, seq_len=68)
#: the mixer every training step is compared with
TRAIN_BASE = "s4d"


@dataclass
class TrainRow:
    """One mixer's training step on the default path (median, milliseconds) and its ratio to
    :data:`TRAIN_BASE`'s step, timed in turns with it."""

    model: str
    shape: str
    step_ms: float
    ratio: float
    #: the LM's parameter count, and its ratio to the base's (same width, different mixers)
    params: int = 0
    params_ratio: float = 1.0


def train_step_fn(
    model: str, layers: int = 2, d_model: int = 64, batch: int = 64, seq_len: int = 68
) -> Callable[[], None]:
    """A closure running one training step (forward, loss, backward, AdamW update, on the next
    of four fixed batches) of ``lrnnx train``'s selective-copying LM with mixer ``model``; the
    closure's ``params`` is the LM's parameter count."""
    from lrnnx.train import TrainConfig, batch_indices, forward_batch, prepare

    cfg = TrainConfig(task="selective-copy", model=model, layers=layers, d_model=d_model,
                      d_state=D_STATE, batch_size=batch, seq_len=seq_len, n_train=4 * batch,
                      n_test=batch, steps=1)  # fmt: skip
    prep = prepare(cfg)
    net = prep.model.train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    data, count = prep.data, [0]

    def step() -> None:
        idx = batch_indices(len(data.train), cfg.batch_size, cfg.seed, 0, count[0] % 4)
        count[0] += 1
        loss, _, _ = forward_batch(net, data.train[idx], data.kind)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step.params = sum(p.numel() for p in net.parameters())
    return step


def train_rows(names: Sequence[str], repeats: int, **shape) -> List[TrainRow]:
    """Median training step of each mixer (and of :data:`TRAIN_BASE`), timed in turns after
    two warm-up steps each, with its ratio to the base's step."""
    shape = {**TRAIN_SHAPE, **shape}
    order = list(dict.fromkeys([*names, TRAIN_BASE]))
    steps = {name: train_step_fn(name, **shape) for name in order}
    for step in steps.values():  # compile or load kernels, first allocations
        step()
        step()
    times: dict = {name: [] for name in order}
    for _ in range(repeats):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    ms = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
    text = "B={batch} L={seq_len} d_model={d_model} layers={layers}".format(**shape)
    base = steps[TRAIN_BASE].params
    return [
        TrainRow(
            name,
            text,
            ms[name],
            ms[name] / ms[TRAIN_BASE],
            steps[name].params,
            steps[name].params / base,
        )
        for name in order
    ]


def train_markdown(rows: List[TrainRow]) -> str:
    lines = [
        f"Training step of `lrnnx train`'s selective-copying LM per mixer (default path, "
        f"{torch.get_num_threads()} torch threads), medians of steps timed in turns; ratio to "
        f"the {TRAIN_BASE} step, and the LM's parameters (all mixers at the same width) with "
        f"their ratio to the {TRAIN_BASE} LM's:",
        "",
        f"| model | shape | ms per step | / {TRAIN_BASE} | parameters | / {TRAIN_BASE} |",
        "|---|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r.model} | {r.shape} | {r.step_ms:.1f} | {r.ratio:.2f}x | {r.params} | "
        f"{r.params_ratio:.2f}x |"
        for r in rows
    ]
    return "\n".join(lines)


#: the CPU-burning process of :func:`busy_machine`: torch matrix products on every core until
#: its parent exits
_BURN = """
import os, sys, torch
torch.set_num_threads(int(sys.argv[1]))
a = torch.randn(256, 256) / 16
parent = os.getppid()
print("ready", flush=True)
while os.getppid() == parent:
    for _ in range(20):
        a = torch.tanh(a @ a)
"""


@contextmanager
def busy_machine(threads: Optional[int] = None) -> Iterator[subprocess.Popen]:
    """Keep ``threads`` cores (default: all) busy in a separate process for the block: torch
    matrix products in a loop, as another job on a shared machine would.  The process is
    stopped when the block ends (and ends by itself should this process die)."""
    n = threads or os.cpu_count() or 1
    proc = subprocess.Popen(
        [sys.executable, "-c", _BURN, str(n)], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL
    )
    try:
        proc.stdout.readline()  # running: its threads are started
        yield proc
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def bench_small(
    names: Sequence[str], repeats: int = 20, busy: bool = False,
    lengths: Sequence[int] = LENGTHS, lm: bool = True,
) -> List[SmallRow]:  # fmt: skip
    """The rows for ``names`` on a quiet machine, then (``busy``) the same under load."""

    def measure(loaded: bool) -> List[SmallRow]:
        rows = forward_rows(names, repeats, lengths)
        if lm:
            rows += lm_rows(names, repeats)
        for r in rows:
            r.busy = loaded
        return rows

    rows = measure(False)
    if busy:
        with busy_machine():
            rows += measure(True)
    return rows


def markdown(rows: List[SmallRow], header: str) -> str:
    """A table: one line per row, times in microseconds and the ratio default / torch."""
    lines = [
        header,
        "",
        "| case | model | shape | machine | default us | torch us | default/torch |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.case} | {r.model} | {r.shape} | {'busy' if r.busy else 'quiet'} | "
            f"{r.default_us:.0f} | {r.torch_us:.0f} | {r.ratio:.2f} |"
        )
    return "\n".join(lines)


def add_small_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of :func:`run_small` (prefixed, so they sit beside ``lrnnx bench``'s)."""
    parser.add_argument(
        "--small-busy",
        action="store_true",
        help="--small: measure again while another process keeps every core busy",
    )
    parser.add_argument(
        "--small-repeats", type=int, default=20, help="--small: timed calls per path (median)"
    )
    parser.add_argument(
        "--small-train",
        action="store_true",
        help=f"--small: also a training step of the selective-copying LM per mixer, as a "
        f"ratio to {TRAIN_BASE}'s",
    )


def run_small(args: argparse.Namespace) -> int:
    """The CLI entry: the rows for ``args.models`` (default: every available mixer) on the CPU,
    printed as a markdown table (also written to ``args.markdown`` when set)."""
    from lrnnx.models.registry import available_models

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    names = getattr(args, "models", None) or available_models()
    header = (
        f"Small work on the CPU ({torch.get_num_threads()} torch threads, {os.cpu_count()} "
        f"cores): medians of {args.small_repeats} alternating calls; default = lrnnx's "
        "choice, torch = LRNNX_BACKEND=torch"
    )
    print(header, flush=True)
    rows = bench_small(names, args.small_repeats, args.small_busy)
    md = markdown(rows, header)
    print(md, flush=True)
    if args.small_train:
        train = train_rows(names, max(5, args.small_repeats // 2))
        md += "\n\n" + train_markdown(train)
        print("\n" + train_markdown(train))
    if getattr(args, "markdown", None):
        with open(args.markdown, "w") as f:
            f.write(md + "\n")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lrnnx.bench_small", description=__doc__)
    parser.add_argument("--models", nargs="*", default=None, help="default: every mixer")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--markdown", default=None, help="write the table here too")
    add_small_arguments(parser)
    return run_small(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

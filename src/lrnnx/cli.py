"""The ``lrnnx`` command.

    lrnnx models                                   the model zoo (paper, LTI/LTV, parameters)
    lrnnx tasks                                    the training tasks and their options
    lrnnx train --task selective-copy --model mamba --steps 500 --out runs/sc
    lrnnx demo                                     selective copying: Mamba vs LTI models
    torchrun --nproc_per_node=2 -m lrnnx.cli train ...   data-parallel training

Every subcommand is one :class:`Subcommand` (a name, a help line, a function adding its
arguments and a function running it) in :data:`SUBCOMMANDS`; adding a command means importing
its two functions and appending one entry there.

Start-up is kept short: this module imports neither torch nor the models, and only the
subcommand being run adds its arguments (``lrnnx --help``, ``lrnnx tasks`` never load torch;
``lrnnx models`` reads its table from a cache that the package's files and the installed
distributions key, see :func:`models_cache_path`).
"""

from __future__ import annotations

import argparse
import ast
import atexit
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, NoReturn, Optional, Sequence

#: exit status for a bad command line or configuration (argparse uses the same)
EXIT_USAGE = 2
#: exit status after Ctrl-C (128 + SIGINT)
EXIT_INTERRUPTED = 130
#: a training run that stopped on a non-finite loss or gradient
EXIT_DIVERGED = 1
#: exit status when stdout's reader closed the pipe (128 + SIGPIPE, what a shell reports)
EXIT_BROKEN_PIPE = 141

#: the reference size of the ``models`` table
REFERENCE_D_MODEL = 64
REFERENCE_D_STATE = 64


class CommandError(Exception):
    """A user error reported as one line on stderr with exit status 2."""


@dataclass(frozen=True)
class Subcommand:
    """One ``lrnnx <name>`` command."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: Optional[str] = None  # ``lrnnx NAME --help``'s text (default: ``help``)


# ----------------------------------------------------------------------------- argument types


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _key_text(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` with VALUE kept as typed (read later with the declared type of KEY)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip().replace("-", "_"), raw


def _key_value(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE read as a Python literal when it is one, true/false/none in any
    case as the booleans and None (as ``--task-option`` reads them), else as a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = _WORDS.get(raw.strip().lower(), raw)
    return key.strip().replace("-", "_"), value


#: values of ``--mixer-option`` read as words rather than Python literals
_WORDS = {"true": True, "false": False, "none": None, "null": None}


def _model_name(text: str) -> str:
    """Resolve a model name or alias, or fail listing the valid names."""
    from lrnnx.train import ConfigError, canonical_model_name

    try:
        return canonical_model_name(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("model: ")) from None


# ----------------------------------------------------------------------------- lrnnx models


def _add_models_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    p.add_argument(
        "--no-cache",
        action="store_true",
        help="rebuild the table (import every model, count its parameters) instead of reading "
        "the cached one",
    )


#: version of the cached ``models`` table's layout
_MODELS_CACHE_VERSION = 1


def models_cache_path() -> Path:
    """Where ``lrnnx models`` keeps its table: ``$LRNNX_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/lrnnx``, else ``~/.cache/lrnnx``."""
    root = os.environ.get("LRNNX_CACHE_DIR")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(xdg, "lrnnx")
    return Path(root) / "models-table.json"


def _models_cache_key() -> str:
    """A digest of everything the table depends on, read without importing anything: every
    source file of the package (path, size, mtime), the installed distributions (a model's
    availability depends on them) and the interpreter."""
    package = Path(__file__).resolve().parent
    h = hashlib.sha256(f"{_MODELS_CACHE_VERSION}|{sys.version}|{sys.prefix}".encode())
    for root, dirs, files in os.walk(package):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(root, name)
                st = os.stat(path)
                h.update(f"{os.path.relpath(path, package)}|{st.st_size}|{st.st_mtime_ns}".encode())
    for entry in sys.path:
        try:
            names = sorted(n for n in os.listdir(entry or ".") if n.endswith(".dist-info"))
        except OSError:
            continue
        h.update(f"{entry}|{','.join(names)}".encode())
    return h.hexdigest()


def _cached_zoo_table(refresh: bool = False) -> List[Dict[str, Any]]:
    """:func:`zoo_table`, from the cache when its key still matches (then torch is not even
    imported); otherwise built and stored."""
    path = models_cache_path()
    key = _models_cache_key()
    if not refresh:
        try:
            cached = json.loads(path.read_text())
            if cached.get("key") == key:
                return cached["rows"]
        except (OSError, ValueError, KeyError, AttributeError):
            pass
    rows = zoo_table()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps({"key": key, "rows": rows}))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: no cache, the table is simply rebuilt next time
    return rows


def _count_mixer_parameters(name: str) -> Optional[int]:
    """Parameters of one mixer at the reference size, or None if it cannot be built."""
    import torch

    from lrnnx.models.registry import build_mixer

    torch.manual_seed(0)
    try:
        mixer = build_mixer(name, REFERENCE_D_MODEL, REFERENCE_D_STATE)
    except Exception:  # noqa: BLE001 - a model that cannot be built is reported as "-"
        return None
    return sum(p.numel() for p in mixer.parameters())


def zoo_table() -> List[Dict[str, Any]]:
    """One row per registry entry: name, aliases, family, params at the reference size, ..."""
    from lrnnx.models.registry import MODEL_REGISTRY
    from lrnnx.train import model_info

    rows = []
    for name, spec in MODEL_REGISTRY.items():
        info = model_info(name)
        aliases = list(spec.aliases)
        rows.append(
            {
                "name": name,
                "aliases": aliases,
                "family": info.family,
                "params": _count_mixer_parameters(name) if info.available else None,
                "timesteps": info.supports_timesteps,
                "available": info.available,
                "arxiv": info.arxiv,
                "paper": info.paper,
            }
        )
    return rows


def _format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(header, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += [
        "  ".join(str(x).ljust(w) for x, w in zip(r, widths, strict=True)).rstrip() for r in rows
    ]
    return "\n".join(lines)


def cmd_models(args: argparse.Namespace) -> int:
    rows = _cached_zoo_table(refresh=args.no_cache)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = ["model", "aliases", "family", "params", "timesteps", "arXiv", "paper"]
    body = [
        [
            r["name"],
            ", ".join(r["aliases"]) or "-",
            r["family"],
            f"{r['params']:,}" if r["params"] is not None else "unavailable",
            "yes" if r["timesteps"] else "-",
            r["arxiv"],
            r["paper"],
        ]
        for r in rows
    ]
    print(
        f"lrnnx model zoo (parameters of one layer at d_model={REFERENCE_D_MODEL}, "
        f"d_state={REFERENCE_D_STATE}; timesteps: accepts integration_timesteps)\n"
    )
    print(_format_table(header, body))
    missing = [r["name"] for r in rows if not r["available"]]
    if missing:
        print(f"\nnot importable in this installation: {', '.join(missing)}")
    return 0


# ----------------------------------------------------------------------------- lrnnx tasks


def _add_tasks_arguments(p: argparse.ArgumentParser) -> None:
    del p  # no options


def cmd_tasks(args: argparse.Namespace) -> int:
    from lrnnx.tasks import TASKS

    del args
    for t in TASKS.values():
        status = "" if t.available else "  [not installed]"
        print(f"{t.name} ({t.kind}){status}\n    {t.description}\n    from: {t.reference}")
        opts = ", ".join(f"{k}={v}" for k, v in t.options.items())
        if opts:
            print(f"    options: {opts}")
    print("\nset options with --task-option KEY=VALUE; sizes with --seq-len/--n-train/--n-test")
    return 0


# ----------------------------------------------------------------------------- lrnnx train


def _add_train_arguments(p: argparse.ArgumentParser) -> None:
    from lrnnx.tasks import TASKS
    from lrnnx.train import TrainConfig

    d = TrainConfig()
    p.add_argument("--task", required=True, choices=list(TASKS), help="what to train on")
    p.add_argument(
        "--model", required=True, type=_model_name, help="model name or alias (see `lrnnx models`)"
    )
    p.add_argument("--layers", type=_positive_int, default=d.layers, help="number of blocks")
    p.add_argument("--d-model", type=_positive_int, default=d.d_model, help="model width")
    p.add_argument("--d-state", type=_positive_int, default=d.d_state, help="state size")
    p.add_argument(
        "--d-intermediate",
        type=_nonneg_int,
        default=d.d_intermediate,
        help="gated-MLP width after each mixer (0: none)",
    )
    p.add_argument("--steps", type=_positive_int, default=d.steps, help="optimizer steps")
    p.add_argument(
        "--batch-size", type=_positive_int, default=d.batch_size, help="sequences per step+process"
    )
    p.add_argument("--lr", type=_positive_float, default=d.lr, help="peak learning rate")
    p.add_argument(
        "--weight-decay",
        type=float,
        default=d.weight_decay,
        help="AdamW weight decay of the matrices (never of the SSM parameters a model marks)",
    )
    p.add_argument(
        "--warmup",
        type=_nonneg_int,
        default=None,
        help="warm-up steps (default: 10%% of --steps, at most 100)",
    )
    p.add_argument("--grad-clip", type=float, default=d.grad_clip, help="0 disables clipping")
    p.add_argument("--seed", type=int, default=d.seed, help="data, init and batch-order seed")
    task_default = "(default: the task's, see `lrnnx tasks`)"
    p.add_argument(
        "--seq-len", type=_positive_int, default=None, help=f"sequence length {task_default}"
    )
    p.add_argument(
        "--n-train", type=_positive_int, default=None, help=f"training sequences {task_default}"
    )
    p.add_argument(
        "--n-test", type=_positive_int, default=None, help=f"held-out sequences {task_default}"
    )
    p.add_argument(
        "--task-option",
        type=_key_text,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="task generator option, read with the option's type (repeatable; see `lrnnx tasks`)",
    )
    p.add_argument(
        "--mixer-option",
        type=_key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra constructor argument of every mixer (repeatable); VALUE is read as a "
        "Python literal (3, 0.1, True, 'zoh'), true/false/none as booleans and None, else as "
        "a string",
    )
    p.add_argument(
        "--eval-every",
        type=_positive_int,
        default=None,
        help="evaluate and checkpoint every this many steps (default: 10 times per run)",
    )
    p.add_argument(
        "--log-every",
        type=_positive_int,
        default=None,
        help="print a progress line every this many steps (default: about 20 per run)",
    )
    p.add_argument(
        "--max-time", type=_positive_float, default=None, help="stop after this many seconds"
    )
    p.add_argument(
        "--out",
        default=None,
        help="output directory (default runs/TASK-MODEL): checkpoint.pt, metrics.json, "
        "learning_curve.png and the save_pretrained directories best/ and last/",
    )
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:N")
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="CPU threads for torch (default: the faster of 1 and torch's default, timed)",
    )
    p.add_argument(
        "--pack",
        action="store_true",
        help="variable-length tasks (e.g. --task selective-copy --task-option min_len=32): lay "
        "each batch's examples back to back in one row of about batch-size x mean-length "
        "tokens (cu_seqlens) instead of padding them; same losses as padded, no compute on "
        "padding",
    )
    again = p.add_mutually_exclusive_group()
    again.add_argument(
        "--resume", action="store_true", help="continue from OUT's checkpoint (error if none)"
    )
    again.add_argument(
        "--overwrite", action="store_true", help="replace an earlier run's files in OUT"
    )
    p.add_argument("--no-plot", action="store_true", help="do not write the learning curve")


def _task_options(task: str, pairs: Sequence[tuple[str, str]]) -> Dict[str, Any]:
    """``--task-option`` pairs read with the task's declared option types."""
    from lrnnx.tasks import parse_option

    options = {}
    for key, text in pairs:
        try:
            options[key] = parse_option(task, key, text)
        except ValueError as e:
            message = str(e).removeprefix(f"{key}: ")
            raise CommandError(f"--task-option {key}: {message}") from None
    return options


def _config_from_args(args: argparse.Namespace):
    from lrnnx.train import TrainConfig

    return TrainConfig(
        task=args.task,
        model=args.model,
        layers=args.layers,
        d_model=args.d_model,
        d_state=args.d_state,
        d_intermediate=args.d_intermediate,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup=args.warmup,
        grad_clip=args.grad_clip,
        seed=args.seed,
        seq_len=args.seq_len,
        n_train=args.n_train,
        n_test=args.n_test,
        task_options=_task_options(args.task, args.task_option),
        mixer_kwargs=dict(args.mixer_option),
        eval_every=args.eval_every,
        log_every=args.log_every,
        max_time=args.max_time,
        out=args.out or str(Path("runs") / f"{args.task}-{args.model}"),
        device=args.device,
        resume=args.resume,
        overwrite=args.overwrite,
        plot=not args.no_plot,
        threads=args.threads,
        pack=args.pack,
    )


@contextlib.contextmanager
def _compile_before_training() -> Iterator[None]:
    """Unless the user chose (``LRNNX_NUMBA_COMPILE``), a training command compiles the fused
    CPU kernels in its own process at their first use ("wait") and marks them ready for later
    processes (:data:`lrnnx.ops._numba.MARK_WAIT_COMPILES`), for the command's duration.  The
    library's default, "background", runs the first calls on the pure-torch backend while an
    idle-priority process compiles; but a training run keeps every core busy, so on a 2-core
    machine that process got 5-35% of a core and never finished, and a whole first run (the
    demo's Mamba: 7k tokens/s against 55k) stayed on the slow path.  Under torchrun the ranks
    keep "background", whose lock lets one of them compile for all."""
    from lrnnx.ops import _numba
    from lrnnx.train import launch_env

    if launch_env("WORLD_SIZE", 1) > 1 or os.environ.get(_numba.COMPILE_ENV):
        yield
        return
    marking = _numba.MARK_WAIT_COMPILES
    os.environ[_numba.COMPILE_ENV] = "wait"
    _numba.MARK_WAIT_COMPILES = True
    try:
        yield
    finally:
        del os.environ[_numba.COMPILE_ENV]
        _numba.MARK_WAIT_COMPILES = marking


@contextlib.contextmanager
def _torch_threads_restored() -> Iterator[None]:
    """torch's thread count as it was before the block: train, demo and bench may set another
    (``--threads``, or the faster count they timed), and a caller of :func:`main` keeps its own."""
    import torch

    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


#: glibc's settings of when freed memory goes back to the system; a user who sets any of them
#: (or its tunables) keeps their own choice
_MALLOC_ENV = (
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "GLIBC_TUNABLES",
)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep freed memory for the next allocations (as PyTorch's CUDA caching
    allocator does on the GPU) instead of handing it back to the system after every step;
    returns whether it was set.

    A training step frees and allocates the same activations again and again.  By default glibc
    returns the top of its heap to the system once more than twice the (adaptive) mmap threshold
    is free, so the next step takes every page afresh: the selective-copying LM's step took
    2,000-3,400 page faults (8-13 MB) on 2 threads, and without them the S4D step ran 14-22%
    faster, Mamba's 3-8% (same peak memory).  Tensors up to 32 MiB then come from the heap
    (mmap_threshold; larger ones are mapped and unmapped as before) and up to 1 GiB of free heap
    is kept (trim_threshold).  Both are set, in that order: setting either stops glibc adapting
    the other, and the 128 KiB mmap threshold alone would map every activation afresh.  Not set
    when the user set ``MALLOC_*_`` or ``GLIBC_TUNABLES``, nor without glibc.  Called by the
    training commands only: a process-wide setting is the command's to make, not the library's.
    """
    if not sys.platform.startswith("linux") or any(k in os.environ for k in _MALLOC_ENV):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        if not hasattr(libc, "gnu_get_libc_version"):  # musl and others: other knobs
            return False
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))


def cmd_train(args: argparse.Namespace) -> int:
    from lrnnx.train import ConfigError, launch_env, train

    keep_freed_memory()
    config = _config_from_args(args)
    try:
        with _torch_threads_restored(), _compile_before_training():
            result = train(config, prepared=_pick_threads(config))
    except (ConfigError, ImportError) as e:
        raise CommandError(str(e)) from None
    code = EXIT_INTERRUPTED if result.interrupted else 0
    if result.diverged is not None:
        print(f"lrnnx train: error: {result.diverged}", file=sys.stderr)
        code = EXIT_DIVERGED
    if launch_env("WORLD_SIZE", 1) > 1:  # one process of a torchrun launch
        exit_worker(code)
    return code


def _pick_threads(config: Any) -> Any:
    """Without ``--threads``, on the CPU and outside torchrun: time a few steps with torch's
    default thread count and with one, and keep the faster (as ``lrnnx demo`` does: a small
    model on a machine whose cores are busy can train many times faster on one thread).
    Returns the prepared run (data and model, built once), or None when nothing was timed."""
    import torch

    from lrnnx.train import (
        CHECKPOINT_NAME,
        check_output_dir,
        check_resume,
        check_writable,
        launch_env,
        prepare,
        resolve_device,
    )

    if config.threads is not None or launch_env("WORLD_SIZE", 1) > 1:
        return None
    config.validate()
    if resolve_device(config.device).type != "cpu" or torch.get_num_threads() == 1:
        return None
    # a bad --out and a resume that cannot continue fail before the timing; --out is created
    # only once prepare has accepted the model for the task (an impossible pair left it behind)
    check_output_dir(config, clear=False)
    prep = prepare(config)
    if config.out is not None and not config.resume:
        check_writable(Path(config.out))
    if config.resume and config.out is not None:
        check_resume(Path(config.out) / CHECKPOINT_NAME, prep)
    _time_steps({prep.info.name: prep}, config.device, None)
    return prep


def exit_worker(code: int) -> NoReturn:
    """End a torchrun worker now that its run is saved and its process group destroyed.

    A process that has used a gloo process group sometimes aborts after its Python code has
    finished, while C++ objects are destroyed at exit ("terminate called without an active
    exception", SIGABRT): 14 of 40 runs of a plain two-process DDP script with torch 2.13 on a
    loaded 2-core machine, none of 40 ending with ``os._exit``.  torchrun then reports the
    whole run as failed.  So the worker runs the atexit handlers (lrnnx's background compile
    processes are stopped there), flushes its output and leaves with ``os._exit``."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# ----------------------------------------------------------------------------- lrnnx demo

#: the demo's contenders in table order: the selective model, then time-invariant ones
DEMO_MODELS = ("mamba", "s4d", "s4", "s5", "lru", "centaurus")


@dataclass(frozen=True)
class DemoSettings:
    """A scaled-down Table 1 of the Mamba paper (arXiv 2312.00752): selective copying.

    Every model gets the same backbone (an LM of ``layers`` blocks, no MLP, as in the Mamba
    architecture) and the same number of steps on the same data.  The selective model is built
    at ``d_model``; every other model's width is chosen so that its parameter count matches the
    selective model's (``match_params``), so no model wins by size.
    """

    seq_len: int = 64
    n_tokens: int = 8
    n_memorize: int = 4
    layers: int = 2
    d_model: int = 64
    d_state: int = 16
    steps: int = 1000
    batch_size: int = 32
    lr: float = 5e-3
    n_train: int = 8192
    n_test: int = 512
    time_budget: float = 540.0
    match_params: bool = True
    #: the widths tried when matching parameter counts
    max_d_model: int = 512


#: ``lrnnx demo --help``: what it does and how long it takes
DEMO_DESCRIPTION = (
    "Selective copying, a scaled-down Table 1 of the Mamba paper: the selective model (Mamba)\n"
    f"against the time-invariant ones ({', '.join(DEMO_MODELS[1:])}), each trained from\n"
    "scratch on the same data.\n\n"
    "How long: the training of all the models together is held to --time-budget seconds\n"
    f"(default {DemoSettings.time_budget:.0f}, about {DemoSettings.time_budget / 60:.0f} minutes; "
    f"on a fast machine the {DemoSettings.steps} steps finish sooner), plus\n"
    "about a minute of set-up: data, timing each model and, on the first run, compiling the\n"
    "fused CPU kernels.  On a slower machine every model is planned fewer steps (the same\n"
    "number for all, from a timing of a few steps); a model that runs slower than planned (a\n"
    "machine busy with other work) stops at its share of the budget, and the table then says\n"
    "the comparison is not like-for-like.  A small budget gives a quick but less conclusive\n"
    "table, e.g. `lrnnx demo --time-budget 120`.  Ctrl-C stops it and prints the table so far.\n"
    "Writes results.json and selective_copy.png to --out."
)


def _add_demo_arguments(p: argparse.ArgumentParser) -> None:
    d = DemoSettings()
    p.add_argument("--out", default="runs/demo", help="where the table, plot and runs go")
    p.add_argument("--models", default=",".join(DEMO_MODELS), help="comma-separated models")
    p.add_argument("--steps", type=_positive_int, default=d.steps, help="steps per model")
    p.add_argument("--seq-len", type=_positive_int, default=d.seq_len, help="sequence length")
    p.add_argument(
        "--time-budget",
        type=_positive_float,
        default=d.time_budget,
        help="seconds of training for all the models together (the demo's run time, plus about "
        "a minute of set-up); models get fewer steps to fit it",
    )
    p.add_argument("--seed", type=int, default=0, help="data, init and batch-order seed")
    p.add_argument(
        "--no-match-params",
        dest="match_params",
        action="store_false",
        default=argparse.SUPPRESS,  # (read with the demo's default; no "(default: True)")
        help="give every model d_model 64 instead of matching the selective model's parameter "
        "count",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="CPU threads for torch (default: the faster of 1 and torch's default, timed)",
    )


def cmd_demo(args: argparse.Namespace) -> int:
    from lrnnx.train import ConfigError

    keep_freed_memory()
    try:
        with _torch_threads_restored(), _compile_before_training():
            return _run_demo(args)
    except ConfigError as e:  # (the demo's own configs are valid: this is the environment)
        raise CommandError(str(e)) from None


def _run_demo(args: argparse.Namespace) -> int:
    from lrnnx.train import (
        ConfigError,
        TrainConfig,
        check_writable,
        model_info,
        plot_curves,
        prepare,
        resolve_device,
        train,
    )
    from lrnnx.train import write_json as _write_json

    s = DemoSettings()
    out = Path(args.out)
    try:  # before minutes of training: a device or a folder that cannot work
        resolve_device(args.device)
        check_writable(out)
    except ConfigError as e:
        raise CommandError(str(e)) from None
    infos, missing = [], []
    for name in dict.fromkeys(m.strip() for m in args.models.split(",") if m.strip()):
        try:
            info = model_info(name)
        except ConfigError as e:
            raise CommandError(str(e)) from None
        (infos if info.available else missing).append(info)
    if not infos and not missing:
        raise CommandError(f"--models: expected comma-separated model names, got {args.models!r}")
    if not infos:
        raise CommandError(
            "demo: none of the requested models is available: "
            + "; ".join(f"{m.name}: {m.reason}" for m in missing)
        )
    k = s.n_memorize
    print(
        "lrnnx demo: selective copying, a scaled-down Table 1 of Mamba (arXiv 2312.00752)\n"
        f"  Copy the {k} data tokens (vocabulary {s.n_tokens}) scattered at random among noise "
        f"tokens in a sequence of {args.seq_len}, in order, at {k} markers.\n"
        f"  Every model: LM of {s.layers} blocks, d_model {s.d_model} (matched below), "
        f"d_state {s.d_state}; "
        f"{args.steps} steps of batch {s.batch_size}, lr {s.lr:g}.  Chance: {1 / s.n_tokens:.1%}."
        "\n  Expected, as in the paper: the selective (input-dependent) model solves it.  A "
        "time-invariant (LTI) model\n  mixes its inputs with one fixed kernel, whatever they "
        "hold: it cannot skip the noise by content, and\n  gets part-way at best through the "
        "nonlinearities around it (S4/S4D's gated output layer)."
    )
    if missing:
        print(
            "  Not available in this installation, skipped: "
            + "; ".join(f"{m.name} ({m.reason})" for m in missing)
        )
    configs, preps = {}, {}
    for info in infos:
        configs[info.name] = TrainConfig(
            task="selective-copy",
            model=info.name,
            layers=s.layers,
            d_model=s.d_model,
            d_state=s.d_state,
            steps=args.steps,
            batch_size=s.batch_size,
            lr=s.lr,
            seed=args.seed,
            seq_len=args.seq_len,
            n_train=s.n_train,
            n_test=s.n_test,
            task_options={"n_tokens": s.n_tokens, "n_memorize": k},
            eval_every=max(1, args.steps // 10),
            log_every=max(1, args.steps // 5),
            out=str(out / info.name),
            device=args.device,
            overwrite=True,  # the demo's own folder: a new demo replaces the last one
            plot=False,
        )
        try:
            preps[info.name] = prepare(configs[info.name])
        except ConfigError as e:
            raise CommandError(f"demo: {e}") from None
    if getattr(args, "match_params", s.match_params):
        _match_parameter_counts(configs, preps, infos, s.max_d_model)

    # same number of steps for every model, scaled down if this machine cannot fit them in the
    # time budget (timed on a few training steps of each model)
    per_step = _time_steps(preps, args.device, args.threads)
    steps = min(
        args.steps, max(1, int(args.time_budget / (_EVAL_OVERHEAD * sum(per_step.values()))))
    )
    estimate = {n: _EVAL_OVERHEAD * steps * c for n, c in per_step.items()}
    if steps < args.steps:
        print(
            f"  This machine needs about {_EVAL_OVERHEAD * args.steps * sum(per_step.values()):.0f}s"
            f" for {args.steps} steps per model; training {steps} step{'s' * (steps != 1)} each"
            f" to fit the {args.time_budget:.0f}s budget (--time-budget)."
        )
    print(f"  Estimated training time: {sum(estimate.values()):.0f}s.")

    results: Dict[str, Dict[str, Any]] = {}
    curves: Dict[str, Dict[str, Any]] = {}
    t_start = time.perf_counter()
    interrupted = False
    try:
        for i, info in enumerate(infos):
            # a model slowed down by a busy machine stops early rather than blow the budget:
            # each gets its share of the time left, in proportion to its estimate (a fixed cap
            # near the estimate stopped models early on short runs, whose evaluation the
            # estimate undercounts, although the budget had room)
            left = args.time_budget - (time.perf_counter() - t_start)
            remaining = sum(estimate[m.name] for m in infos[i:])
            max_time = max(1.0, left * estimate[info.name] / max(remaining, 1e-9))
            config = dataclasses.replace(
                configs[info.name],
                steps=steps,
                eval_every=max(1, steps // 10),
                log_every=max(1, steps // 5),
                max_time=max_time,
            )
            print(f"\n[{i + 1}/{len(infos)}] {info.name} ({info.family})", flush=True)
            result = train(
                config, log=lambda m: print("  " + m, flush=True), prepared=preps[info.name]
            )
            m = result.metrics
            curves[info.name] = {"eval": m["history"]["eval"]}
            results[info.name] = {
                "model": info.name,
                "family": info.family,
                "d_model": configs[info.name].d_model,
                "params": m["n_params"],
                "test_acc": m["final"]["test_acc"] if m["final"] else float("nan"),
                "eval_step": m["final"]["step"] if m["final"] else None,
                "steps": m["steps_completed"],
                "time_s": m["time_s"],
            }
            if result.interrupted:
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        print("\ndemo interrupted; results so far:")
        interrupted = True

    rows = [results[m.name] for m in infos if m.name in results]  # table in the asked order
    elapsed = time.perf_counter() - t_start
    print(f"\nSelective copying, L={args.seq_len}, {k} tokens to copy ({elapsed:.0f}s in all)")
    header = ["model", "family", "d_model", "params", "steps", "time", "test accuracy"]
    body = [
        [r["model"], r["family"], r["d_model"], f"{r['params']:,}", r["steps"],
         f"{r['time_s']:.0f}s", _accuracy_cell(r)]
        for r in rows
    ]  # fmt: skip
    print(_format_table(header, body))
    verdict = _demo_verdict(rows)
    steps_run = [r["steps"] for r in rows]
    if verdict and min(steps_run) < 0.9 * max(steps_run):  # (a few steps apart: comparable)
        verdict = (
            f"not a like-for-like comparison, the models trained {min(steps_run)}-"
            f"{max(steps_run)} steps: " + verdict
        )
    if verdict:
        print("\n" + verdict)
    _write_json(
        out / "results.json",
        {
            "settings": {
                **vars(s),
                "steps": steps,
                "seq_len": args.seq_len,
                "seed": args.seed,
                "time_budget": args.time_budget,  # the run's, not the default's
            },
            "results": rows,
            "missing": {m.name: m.reason for m in missing},
            "interrupted": interrupted,
        },
    )
    chance = {"acc": 1 / s.n_tokens, "loss": math.log(s.n_tokens)}
    if curves and plot_curves(
        curves,
        out / "selective_copy.png",
        f"selective copying, L={args.seq_len}, K={k}",
        chance=chance,
    ):
        print(f"plot: {out / 'selective_copy.png'}")
    print(f"results: {out / 'results.json'}")
    return EXIT_INTERRUPTED if interrupted else 0


#: evaluation and logging on top of the training steps, as a factor on their time
_EVAL_OVERHEAD = 1.15


def _match_parameter_counts(
    configs: Dict[str, Any], preps: Dict[str, Any], infos: List[Any], max_d_model: int
) -> None:
    """Rebuild every model but the first LTV one at the width whose parameter count is closest
    to that model's (widths in steps of 8; parameter counts grow with the width).

    ``configs`` and ``preps`` are updated in place; a model none of whose widths builds keeps
    its own.
    """
    from lrnnx.train import architecture_spec, build_from_spec, count_parameters

    ref = next((i.name for i in infos if i.family == "LTV"), None)
    if ref is None:
        return
    target = count_parameters(preps[ref].model)

    def params_at(name: str, width: int) -> Optional[int]:
        cfg = dataclasses.replace(configs[name], d_model=width)
        try:
            return count_parameters(build_from_spec(architecture_spec(cfg, preps[name].data, name)))
        except (ValueError, TypeError, AssertionError):
            return None

    for info in infos:
        if info.name == ref:
            continue
        widths = list(range(8, max_d_model + 1, 8))
        lo, hi = 0, len(widths) - 1
        while lo < hi:  # the smallest width with at least the target's parameters
            mid = (lo + hi) // 2
            n = params_at(info.name, widths[mid])
            if n is not None and n >= target:
                hi = mid
            else:
                lo = mid + 1
        candidates = widths[max(0, lo - 1) : lo + 1]
        counts = {w: params_at(info.name, w) for w in candidates}
        counts = {w: n for w, n in counts.items() if n is not None}
        if not counts:
            continue
        width = min(counts, key=lambda w: abs(counts[w] - target))
        if width == configs[info.name].d_model:
            continue
        cfg = dataclasses.replace(configs[info.name], d_model=width)
        prep = preps[info.name]
        _seed_torch(cfg.seed)  # the same initialisation as prepare() would give
        model = build_from_spec(architecture_spec(cfg, prep.data, info.name))
        configs[info.name] = cfg
        preps[info.name] = dataclasses.replace(
            prep, config=cfg, model=model, arch=architecture_spec(cfg, prep.data, info.name)
        )
    widths = ", ".join(f"{i.name} {configs[i.name].d_model}" for i in infos)
    print(f"  Parameter counts matched to {ref}'s {target:,}: d_model {widths}.")


def _seed_torch(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


def _time_steps(preps: Dict[str, Any], device: str, threads: Optional[int]) -> Dict[str, float]:
    """Seconds per training step of every model, after fixing torch's CPU thread count.

    Without ``threads``, the default count is timed against a single thread and the faster is
    kept: these models are small, and on a machine whose cores are busy with other work a
    multi-threaded step can be many times slower than a single-threaded one.
    """
    import torch

    from lrnnx.train import resolve_device

    if threads is not None:
        torch.set_num_threads(threads)
    if resolve_device(device).type == "cuda" or threads is not None:
        return {n: _seconds_per_step(p, device) for n, p in preps.items()}
    default = torch.get_num_threads()
    timed = {default: {n: _seconds_per_step(p, device) for n, p in preps.items()}}
    if default > 1:
        torch.set_num_threads(1)
        timed[1] = {n: _seconds_per_step(p, device) for n, p in preps.items()}
    best = min(timed, key=lambda t: sum(timed[t].values()))
    torch.set_num_threads(best)
    print(f"  Using {best} CPU thread{'s' * (best != 1)} (timed {sorted(timed)}).")
    return timed[best]


def _seconds_per_step(prep: Any, device: str, n: int = 3) -> float:
    """Wall time of one training step of ``prep``'s model (on a copy; one warm-up step first)."""
    import copy

    import torch

    from lrnnx.train import batch_indices, forward_batch, resolve_device

    dev = resolve_device(device)
    model = copy.deepcopy(prep.model).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cfg, data = prep.config, prep.data
    times = []
    for i in range(n + 1):
        batch = data.train[batch_indices(len(data.train), cfg.batch_size, cfg.seed, 0, i)].to(dev)
        t0 = time.perf_counter()
        loss, _, _ = forward_batch(model, batch, data.kind)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t0)
    return sorted(times[1:])[len(times[1:]) // 2]  # median, after the warm-up (and any JIT)


def _accuracy_cell(row: Dict[str, Any]) -> str:
    """The test accuracy, with the step it was measured at when that is not the last one
    trained (a run interrupted between evaluations)."""
    acc = f"{row['test_acc']:.1%}"
    if row.get("eval_step") is not None and row["eval_step"] != row["steps"]:
        acc += f" (at step {row['eval_step']})"
    return acc


def _demo_verdict(results: List[Dict[str, Any]]) -> str:
    """One line comparing the best selective (LTV) model with the best LTI one."""
    ltv = [r for r in results if r["family"] == "LTV"]
    lti = [r for r in results if r["family"] == "LTI"]
    if not ltv or not lti:
        return ""
    best_ltv = max(ltv, key=lambda r: r["test_acc"])
    best_lti = max(lti, key=lambda r: r["test_acc"])
    if best_ltv["test_acc"] > best_lti["test_acc"]:
        return (
            f"selective {best_ltv['model']} reaches {best_ltv['test_acc']:.1%}; the best LTI model "
            f"({best_lti['model']}) {best_lti['test_acc']:.1%}."
        )
    return (
        f"with this budget the best LTI model ({best_lti['model']}, {best_lti['test_acc']:.1%}) "
        f"is not behind the selective one ({best_ltv['model']}, {best_ltv['test_acc']:.1%})."
    )


# ----------------------------------------------------------------------------- entry point


def _add_bench_arguments(p: argparse.ArgumentParser) -> None:
    from lrnnx import bench

    bench.add_arguments(p)


def _run_bench(args: argparse.Namespace) -> int:
    from lrnnx import bench
    from lrnnx.train import ConfigError, canonical_model_name, check_writable, resolve_device

    try:  # before minutes of measuring: names, a device or a folder that cannot work
        for name in args.models or []:
            canonical_model_name(name)
        resolve_device(args.device)
        check_writable(Path(args.out))
    except ConfigError as e:
        raise CommandError(str(e)) from None

    with _torch_threads_restored():
        return bench.run(args)


#: every ``lrnnx`` subcommand, in help order (the one place to register a new one)
SUBCOMMANDS: List[Subcommand] = [
    Subcommand("models", "list the model zoo", _add_models_arguments, cmd_models),
    Subcommand("tasks", "list the training tasks", _add_tasks_arguments, cmd_tasks),
    Subcommand("train", "train a model on a task", _add_train_arguments, cmd_train),
    Subcommand(
        "demo",
        "selective copying: selective vs LTI models (about 10 minutes; see --time-budget)",
        _add_demo_arguments,
        cmd_demo,
        DEMO_DESCRIPTION,
    ),
    Subcommand(
        "bench",
        "speed and memory vs the pure-torch baseline",
        _add_bench_arguments,
        _run_bench,
    ),
]


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the uninformative None/False/[] ones; descriptions as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        default = action.default
        if default is None or default is False or default == [] or default is argparse.SUPPRESS:
            return action.help or ""
        return super()._get_help_string(action)


def _chosen_command(argv: Sequence[str]) -> Optional[str]:
    """The subcommand ``argv`` names (its first non-option word), if any."""
    for word in argv:
        if not word.startswith("-"):
            return word
    return None


def build_parser(argv: Optional[Sequence[str]] = None) -> argparse.ArgumentParser:
    """The ``lrnnx`` parser.  Given ``argv``, only the subcommand it names gets its arguments
    (they may import torch and the models: ``lrnnx --help`` and the listings stay fast)."""
    parser = argparse.ArgumentParser(
        prog="lrnnx",
        description="lrnnx: linear RNNs in PyTorch — model zoo, tasks and training",
        epilog="`lrnnx COMMAND --help` describes a command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = None if argv is None else _chosen_command(argv)
    for cmd in SUBCOMMANDS:
        p = sub.add_parser(
            cmd.name,
            help=cmd.help,
            description=cmd.description or cmd.help,
            formatter_class=_HelpFormatter,
        )
        if argv is None or cmd.name == chosen:
            cmd.add_arguments(p)
        p.set_defaults(_run=cmd.run, _parser=p)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``lrnnx`` with ``argv`` (default: the process's arguments); returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        return args._run(args)
    except CommandError as e:
        print(f"{args._parser.prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # the reader went away (``lrnnx train ... | head``): stop quietly, as a Unix filter
        # does on SIGPIPE; point stdout at devnull so the interpreter's final flush cannot
        # raise again (the recipe in Python's signal module documentation)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())

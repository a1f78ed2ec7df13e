"""Train a model of the zoo on a task of :mod:`lrnnx.tasks`: the engine behind ``lrnnx train``.

    from lrnnx.train import TrainConfig, train
    result = train(TrainConfig(task="selective-copy", model="mamba", steps=500, out="runs/sc"))
    result.metrics["final"]["test_acc"]

Token tasks get an :class:`lrnnx.architectures.LRNNLMHeadModel` (loss and accuracy on the
positions the task scores), classification tasks a :class:`lrnnx.architectures.Classifier`.

Variable-length tasks (splits with ``lengths``, e.g. ``selective-copy`` with ``min_len``) are
batched as padded (B, L) batches with ``lengths``, or with ``pack=True`` (``--pack``) packed:
the batch's examples are laid back to back in one row of about batch_size * mean length tokens
with ``cu_seqlens`` (fla's convention), so no compute goes to padding.  Both give the same loss
and gradients up to rounding (each example is still run as if alone).
Training is AdamW with linear warm-up and cosine decay, gradient clipping, periodic evaluation on
the held-out split, an atomically written checkpoint (so an interrupt never leaves a torn file),
a metrics JSON and, when matplotlib is installed, a learning-curve PNG.

A run's output directory holds::

    checkpoint.pt        model + optimizer state, for ``--resume`` (see :func:`load_checkpoint`)
    metrics.json         configuration, history, final and best scores
    learning_curve.png   loss and accuracy against step, with the task's chance level
    best/                the weights with the best test accuracy so far     } save_pretrained
    last/                the latest weights (also written on Ctrl-C)         } directories

so the trained network loads with ``LRNNLMHeadModel.from_pretrained("runs/sc/best")`` (or
``Classifier`` for classification tasks; :func:`load_pretrained` picks the class itself).

Started by ``torchrun --nproc_per_node=N`` (WORLD_SIZE > 1 in the environment), it trains with
DistributedDataParallel: gloo on CPU, nccl on CUDA.  Every process draws its own batches
(``batch_size`` is per process); evaluation is sharded over processes and summed; only rank 0
prints and writes files.  A script of your own that calls :func:`train` under torchrun may end
with :func:`lrnnx.cli.exit_worker` as ``lrnnx train`` does: with torch 2.13 a process that used
a gloo group sometimes aborts at interpreter exit, and torchrun then fails the whole run.
"""

from __future__ import annotations

import dataclasses
import difflib
import io
import json
import math
import numbers
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from lrnnx.tasks import IGNORE_INDEX, Split, TaskData, get_task, make_task
from lrnnx.utils.optim import param_groups

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.json"
CURVE_NAME = "learning_curve.png"
#: ``save_pretrained`` directories inside a run's output directory
BEST_NAME = "best"
LAST_NAME = "last"
#: everything a run writes into its output directory (what ``overwrite`` replaces)
RUN_FILES = (CHECKPOINT_NAME, METRICS_NAME, CURVE_NAME, BEST_NAME, LAST_NAME)
CHECKPOINT_FORMAT = "lrnnx-train-checkpoint-v1"


class ConfigError(ValueError):
    """A training configuration that cannot work (unknown name, impossible sizes, ...)."""


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        expected = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ConfigError(f"{name}: expected {expected}, got {value!r}")


def _check_real(name: str, value: Any, positive: bool, what: str) -> None:
    """A finite real number, > 0 (``positive``) or >= 0: NaN and inf would make a run's
    parameters non-finite (or, for grad_clip, switch clipping off) without an error."""
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not real or not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ConfigError(f"{name}: expected {what}, got {value!r}")


# ----------------------------------------------------------------------------- configuration


@dataclass
class TrainConfig:
    """Everything that defines a training run (stored in checkpoints and metrics).

    Attributes:
        task: a name from :data:`lrnnx.tasks.TASKS`.
        model: a model name or alias from :mod:`lrnnx.models.registry` (case-insensitive).
        layers: number of blocks.
        d_model: model width.
        d_state: state size passed to every mixer (None: the mixer's own default).
        d_intermediate: hidden width of the gated MLP after each mixer (0: no MLP).
        steps: optimizer steps.
        batch_size: sequences per step and process.
        lr: peak learning rate (AdamW), reached after ``warmup`` steps, cosine-decayed to lr/10.
        weight_decay: AdamW weight decay.
        warmup: warm-up steps (None: 10% of ``steps``, at most 100).
        grad_clip: maximum gradient norm (0 disables clipping).
        seed: seeds the data, the initialisation and the batch order.
        seq_len: sequence length (None: the task's default).
        n_train, n_test: split sizes (None: the task's defaults).
        task_options: extra keyword arguments of the task's generator.
        mixer_kwargs: extra keyword arguments of every mixer.
        eval_every: evaluate (and checkpoint) every this many steps (None: 10 times per run).
        log_every: print a progress line every this many steps (None: about 20 per run).
        eval_batch_size: sequences per evaluation batch.
        max_time: stop (after a final evaluation) once training has run this many seconds.
        out: output directory for checkpoint, metrics, plot and the ``best``/``last`` model
            directories (None: write nothing).  Must be empty or absent, unless ``resume`` or
            ``overwrite``.
        device: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
        resume: continue from ``out``'s checkpoint (a ConfigError if there is none).
        overwrite: replace the files of an earlier run in ``out``.
        plot: write the learning-curve PNG (needs matplotlib).
        threads: CPU threads for torch (None: leave torch's setting; small models on a busy
            machine often train faster with 1).
        pack: batch variable-length examples packed (one row of the batch's examples back to
            back, with ``cu_seqlens``) instead of padded (with ``lengths``); training and
            evaluation see the same examples and losses either way.  Needs a task with
            variable lengths and mixers that take packed sequences.
    """

    task: str = "selective-copy"
    model: str = "s5"
    layers: int = 2
    d_model: int = 64
    d_state: Optional[int] = 16
    d_intermediate: int = 0
    steps: int = 1000
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup: Optional[int] = None
    grad_clip: float = 1.0
    seed: int = 0
    seq_len: Optional[int] = None
    n_train: Optional[int] = None
    n_test: Optional[int] = None
    task_options: Dict[str, Any] = field(default_factory=dict)
    mixer_kwargs: Dict[str, Any] = field(default_factory=dict)
    eval_every: Optional[int] = None
    log_every: Optional[int] = None
    eval_batch_size: int = 256
    max_time: Optional[float] = None
    out: Optional[str] = None
    device: str = "auto"
    resume: bool = False
    overwrite: bool = False
    plot: bool = True
    threads: Optional[int] = None
    pack: bool = False

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first impossible setting (types included:
        a number given as a string, NaN or inf, a negative seed)."""
        positive = ["layers", "d_model", "steps", "batch_size", "eval_batch_size"]
        for name in positive:
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("d_state", "seq_len", "n_train", "n_test", "eval_every", "log_every",
                     "threads"):  # fmt: skip
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), minimum=1)
        _check_int("d_intermediate", self.d_intermediate, minimum=0)
        _check_int("seed", self.seed, minimum=0)
        if self.warmup is not None:
            _check_int("warmup", self.warmup, minimum=0)
        _check_real("lr", self.lr, positive=True, what="a positive learning rate")
        _check_real("weight_decay", self.weight_decay, positive=False, what="a number >= 0")
        _check_real("grad_clip", self.grad_clip, positive=False, what="a number >= 0 (0: off)")
        if self.max_time is not None:
            _check_real(
                "max_time", self.max_time, positive=True, what="a positive number of seconds"
            )
        if not isinstance(self.device, str):
            raise ConfigError(
                f"device: expected a string such as 'cpu' or 'cuda', got {self.device!r}"
            )
        if self.resume and self.overwrite:
            raise ConfigError(
                "resume, overwrite: choose one (--resume continues the run in --out, "
                "--overwrite starts a new one there)"
            )

    @property
    def warmup_steps(self) -> int:
        return min(100, self.steps // 10) if self.warmup is None else self.warmup

    @property
    def eval_interval(self) -> int:
        return max(1, self.steps // 10) if self.eval_every is None else self.eval_every

    @property
    def log_interval(self) -> int:
        return max(1, self.steps // 20) if self.log_every is None else self.log_every


# ----------------------------------------------------------------------------- model zoo access


@dataclass(frozen=True)
class ModelInfo:
    """What training needs to know about a registry entry."""

    name: str  # canonical name
    family: str  # "LTI" / "LTV" / "attention"
    paper: str  # title
    arxiv: str  # identifier, e.g. "2312.00752"
    supports_timesteps: bool
    available: bool
    reason: str = ""  # why it is unavailable


def model_names(include_attention: bool = True) -> List[str]:
    """Canonical names of every model in the registry, importable or not."""
    from lrnnx.models.registry import MODEL_REGISTRY

    return [n for n, s in MODEL_REGISTRY.items() if include_attention or s.family != "attention"]


def _valid_names_message() -> str:
    from lrnnx.models.registry import MODEL_REGISTRY

    aliases = [a for s in MODEL_REGISTRY.values() for a in s.aliases]
    return f"choose one of: {', '.join(model_names())} (aliases: {', '.join(aliases)})"


def canonical_model_name(name: str) -> str:
    """Resolve a user-typed name or alias (case-insensitive) to the registry's canonical name.

    Raises:
        ConfigError: unknown name; the message lists the valid ones.
    """
    from lrnnx.models.registry import resolve_name

    try:
        return resolve_name(name)
    except (TypeError, ValueError):
        from lrnnx.models.registry import MODEL_REGISTRY

        known = model_names() + [a for s in MODEL_REGISTRY.values() for a in s.aliases]
        close = difflib.get_close_matches(str(name).lower(), known, n=1)
        mean = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(
            f"model: unknown model {name!r}; {mean}{_valid_names_message()}"
        ) from None


def model_info(name: str) -> ModelInfo:
    """Registry facts about ``name`` (any alias), including whether its module imports."""
    from lrnnx.models.registry import get_model_class, get_spec

    spec = get_spec(canonical_model_name(name))
    available, reason = True, ""
    try:
        get_model_class(spec.name)
    except ImportError as e:  # a model not written yet, or a missing optional dependency
        available, reason = False, str(e.__cause__ or e)
    return ModelInfo(
        name=spec.name,
        family=spec.family,
        paper=spec.paper,
        arxiv=spec.arxiv,
        supports_timesteps=spec.supports_timesteps,
        available=available,
        reason=reason,
    )


def available_model_names() -> List[str]:
    """Canonical names of the models (attention included) whose modules import."""
    from lrnnx.models.registry import available_models

    return available_models(include_attention=True)


# ----------------------------------------------------------------------------- building


def architecture_spec(config: TrainConfig, data: TaskData, model: str) -> Dict[str, Any]:
    """Class name and constructor arguments of the network for ``data`` (stored in checkpoints)."""
    common = {
        "d_model": config.d_model,
        "d_state": config.d_state,
        "mixer_kwargs": dict(config.mixer_kwargs) or None,
        "d_intermediate": config.d_intermediate,
    }
    if data.kind == "lm":
        kwargs = {"n_layer": config.layers, "vocab_size": data.vocab_size, "mixer_types": model}
        return {"class": "LRNNLMHeadModel", "kwargs": {**common, **kwargs}}
    kwargs = {
        "d_input": data.d_input,
        "n_classes": data.n_classes,
        "n_layers": config.layers,
        "mixer": model,
        "encoder": "linear",
        "pooling": "mean",
    }
    return {"class": "Classifier", "kwargs": {**common, **kwargs}}


def build_from_spec(spec: Dict[str, Any]) -> nn.Module:
    """Instantiate the network described by :func:`architecture_spec`."""
    from lrnnx import architectures

    cls = getattr(architectures, spec["class"])
    return cls(**spec["kwargs"])


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """``"auto"`` -> CUDA (this process's GPU under torchrun) if available, else CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"device: {e}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device: {device!r} requested but CUDA is not available")
        if dev.index is None:
            dev = torch.device("cuda", local_rank % torch.cuda.device_count())
    elif dev.type != "cpu":  # mps, xpu, ...: usable only where torch has that backend
        backend = getattr(torch, dev.type, None)
        usable = dev.type != "meta" and callable(getattr(backend, "is_available", None))
        if not usable or not backend.is_available():
            raise ConfigError(
                f"device: {device!r} is not available here (use 'auto', 'cpu' or 'cuda')"
            )
    return dev


@dataclass
class Prepared:
    """A run's data and network, built and checked before any training."""

    config: TrainConfig
    data: TaskData
    model: nn.Module
    info: ModelInfo
    arch: Dict[str, Any]


def prepare(config: TrainConfig) -> Prepared:
    """Validate ``config``, generate the task and build the network on the CPU.

    Raises:
        ConfigError: a bad setting, with a one-line message.
        ImportError: the task needs an optional package that is missing.
    """
    config.validate()
    try:
        task = get_task(config.task)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    info = model_info(config.model)
    if not info.available:
        raise ConfigError(
            f"model: {info.name!r} is not available in this installation ({info.reason}); "
            f"available: {', '.join(available_model_names())}"
        )
    if task.needs_timesteps and not info.supports_timesteps:
        able = [n for n in model_names() if model_info(n).supports_timesteps]
        raise ConfigError(
            f"model: task {task.name!r} feeds integration_timesteps, which {info.name!r} does not "
            f"accept; use one of: {', '.join(able) or 'none available'}"
        )
    try:
        data = make_task(
            task.name,
            n_train=config.n_train,
            n_test=config.n_test,
            seq_len=config.seq_len,
            seed=config.seed,
            **config.task_options,
        )
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{task.name}: {e}") from None
    arch = architecture_spec(config, data, info.name)
    torch.manual_seed(config.seed)  # same initialisation on every process and every run
    try:
        model = build_from_spec(arch)
    except (ValueError, TypeError, AssertionError) as e:
        raise ConfigError(f"cannot build {arch['class']} with {info.name!r}: {e}") from None
    if config.pack:
        _check_packing(data, model, info.name)
    return Prepared(config, data, model, info, arch)


def _check_packing(data: TaskData, model: nn.Module, name: str) -> None:
    """``pack`` needs variable-length examples and mixers that take ``cu_seqlens``."""
    if data.train.lengths is None:
        raise ConfigError(
            f"pack: task {data.name!r} has fixed-length examples (no padding to save); packing "
            "needs variable lengths, e.g. --task selective-copy --task-option min_len=32"
        )
    from lrnnx.models.registry import MixerAdapter

    for module in model.modules():
        if isinstance(module, MixerAdapter) and not module.supports_cu_seqlens:
            raise ConfigError(
                f"pack: model {name!r} does not take packed sequences yet (its forward has no "
                "cu_seqlens); train it without --pack (padded batches with lengths)"
            )


# ----------------------------------------------------------------------------- loss and metrics


def pack_batch(batch: Split, kind: str) -> tuple[Split, Tensor]:
    """Lay a padded batch's examples back to back: (packed split, cu_seqlens).

    The packed split holds inputs (1, T) (or (1, T, d_input)), elapsed times (1, T) and, for
    ``"lm"`` tasks, targets (1, T) (an example's targets are its own: none crosses into the
    next); classification targets stay (S,).  ``cu_seqlens`` is int64 (S + 1,) on the CPU (the
    models validate it there, without a device sync per layer).  Needs ``batch.lengths``.
    """
    lengths = batch.lengths
    if lengths is None:
        raise ValueError("batch: packing needs the examples' lengths, got a split without them")
    L = batch.inputs.shape[1]
    valid = torch.arange(L, device=lengths.device)[None, :] < lengths[:, None]
    ts = batch.integration_timesteps
    packed = Split(
        batch.inputs[valid][None],
        batch.targets[valid][None] if kind == "lm" else batch.targets,
        None if ts is None else ts[valid][None],
    )
    cu = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to("cpu", torch.int64)
    return packed, cu


def forward_batch(
    model: nn.Module, batch: Split, kind: str, pack: bool = False
) -> tuple[Tensor, Tensor, int]:
    """Mean loss, number of correct predictions and number of scored predictions of one batch.

    A batch with ``lengths`` runs padded (``lengths=``), or packed with ``pack``
    (:func:`pack_batch`, ``cu_seqlens=``); the two give the same numbers up to rounding.
    """
    kwargs: Dict[str, Any] = {}
    if batch.lengths is not None and pack:
        batch, kwargs["cu_seqlens"] = pack_batch(batch, kind)
    elif batch.lengths is not None:
        kwargs["lengths"] = batch.lengths
    if batch.integration_timesteps is not None:
        kwargs["integration_timesteps"] = batch.integration_timesteps
    logits = model(batch.inputs, **kwargs)
    if kind == "lm":
        scored = batch.targets != IGNORE_INDEX
        logits, targets = logits[scored], batch.targets[scored]  # (n_scored, V), (n_scored,)
    else:
        targets = batch.targets
    loss = nn.functional.cross_entropy(logits.float(), targets)
    correct = (logits.argmax(-1) == targets).sum()
    return loss, correct, targets.numel()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    split: Split,
    kind: str,
    device: torch.device,
    batch_size: int = 256,
    rank: int = 0,
    world_size: int = 1,
    pack: bool = False,
) -> Dict[str, float]:
    """Loss and accuracy over ``split`` (each process takes every world_size-th example);
    variable-length batches packed with ``pack`` (see :func:`forward_batch`)."""
    was_training = model.training
    model.eval()
    idx = torch.arange(rank, len(split), world_size)
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    for start in range(0, len(idx), batch_size):
        batch = split[idx[start : start + batch_size]].to(device)
        loss, correct, count = forward_batch(model, batch, kind, pack)
        totals += torch.stack(
            [loss.double() * count, correct.double(), torch.tensor(count, device=device).double()]
        )
    if world_size > 1:
        dist.all_reduce(totals)
    model.train(was_training)
    count = max(float(totals[2]), 1.0)
    return {"loss": float(totals[0]) / count, "acc": float(totals[1]) / count}


def batch_indices(n: int, batch_size: int, seed: int, rank: int, step: int) -> Tensor:
    """The training examples drawn at ``step`` by process ``rank`` (with replacement).

    A fresh generator per (seed, rank, step) makes the order independent of where a run was
    resumed and different on every process.
    """
    state = np.random.SeedSequence([seed, rank, step]).generate_state(2, dtype=np.uint32)
    g = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
    return torch.randint(0, n, (batch_size,), generator=g)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then cosine decay to 0.1 at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- files


def atomic_write_bytes(path: Path, write: Callable[[Any], None]) -> None:
    """Write via a temporary file in the same directory and ``os.replace`` it into place.

    The rename is atomic, so an interrupt leaves either the old file or the new one, never a
    partial one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


#: settings a resumed run must share with its checkpoint: they define the data, the batches
#: and the optimisation (changing one midway would make a different run than the one reported);
#: steps, evaluation/logging intervals, time limits, device and threads may change
RESUME_FIXED = ("seed", "batch_size", "lr", "weight_decay", "warmup", "grad_clip", "n_train")


def _check_resumed_run(
    ckpt_path: Path, state: Dict[str, Any], config: TrainConfig, data: Any
) -> None:
    """Raise ConfigError naming every setting that differs between ``config`` and the run that
    wrote the checkpoint ``state`` (the task and its options, and :data:`RESUME_FIXED`)."""
    saved = state.get("config", {})
    task = state.get("task", {})
    diffs = []
    if task.get("name") != data.name or task.get("params") != data.params:
        diffs.append(
            f"task {task.get('name')} {task.get('params')} (now {data.name} {data.params})"
        )
    # the data's sizes as generated (task defaults resolved): another length or test set
    # would continue on other data and compare best/ across different test sets
    for name, now in (("seq_len", data.seq_len), ("n_test", len(data.test))):
        if name in task and task[name] != now:
            diffs.append(f"--{name.replace('_', '-')} {task[name]!r} (now {now!r})")
    for name in RESUME_FIXED:
        if name in saved and saved[name] != getattr(config, name):
            diffs.append(
                f"--{name.replace('_', '-')} {saved[name]!r} (now {getattr(config, name)!r})"
            )
    if diffs:
        raise ConfigError(
            f"resume: {ckpt_path} was trained with "
            + "; ".join(diffs)
            + ". Resume with the same settings, or use another --out / --overwrite"
        )


def check_resume(ckpt_path: Path, prep: Prepared, map_location: Any = "cpu") -> Dict[str, Any]:
    """The checkpoint to resume, once it is known to continue the run ``prep`` describes.

    Raises:
        ConfigError: an unreadable checkpoint, settings that differ from the run's
            (:func:`_check_resumed_run`, checked first: a task change explains the rest), or
            another architecture (its vocabulary, say)."""
    state = read_checkpoint(ckpt_path, map_location)
    _check_resumed_run(ckpt_path, state, prep.config, prep.data)
    if state.get("architecture") != prep.arch:
        raise ConfigError(
            f"resume: {ckpt_path} was trained with a different architecture; "
            "use another --out or the same model settings"
        )
    return state


def save_checkpoint(path: Path, state: Dict[str, Any]) -> None:
    atomic_write_bytes(path, lambda f: torch.save(state, f))


def save_model_dir(model: nn.Module, path: Path) -> None:
    """``model.save_pretrained(path)``, swapped into place so an interrupt leaves the old
    directory or the new one, never a half-written one."""
    import shutil

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    old = path.with_name(f".{path.name}.old.{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def load_pretrained(path: str | os.PathLike, **kwargs: Any) -> nn.Module:
    """The network of a training run: ``path`` is a run's output directory (its ``best/`` is
    loaded, or ``last/`` when a run stopped before its first evaluation) or one of its
    ``best``/``last`` directories.  ``kwargs`` go to ``from_pretrained``.

    The same as ``LRNNLMHeadModel.from_pretrained(run_dir + "/best")`` (``Classifier`` for
    classification tasks), without having to know the class.
    """
    from lrnnx import architectures

    path = Path(path)
    if not (path / "config.json").is_file():
        # a run's folder: its best evaluation, else (interrupted before the first evaluation)
        # the weights it reached
        for name in (BEST_NAME, LAST_NAME):
            if (path / name / "config.json").is_file():
                path = path / name
                break
    metrics = path.parent / METRICS_NAME
    if not metrics.is_file():
        raise FileNotFoundError(
            f"{path}: not a training run's model directory (no {METRICS_NAME} beside it); "
            "load a save_pretrained directory with the architecture's from_pretrained"
        )
    cls_name = json.loads(metrics.read_text())["architecture"]["class"]
    return getattr(architectures, cls_name).from_pretrained(path, **kwargs)


def launch_env(name: str, default: int) -> int:
    """A torchrun variable (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``) as an int >= 0; unset or
    empty: ``default``.

    Raises:
        ConfigError: (a ValueError) the variable holds anything else (named, with its value).
    """
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise ConfigError(
            f"{name}: expected an integer >= 0 (torchrun sets it), got {os.environ[name]!r}"
        )
    return value


def _rank_from_env() -> int:
    return launch_env("RANK", 0)


def check_output_dir(config: TrainConfig, clear: bool = True) -> None:
    """Refuse an output directory that would mix runs; with ``overwrite``, clear the earlier
    run's files (only ``clear=True``, the first process under torchrun).

    Raises:
        ConfigError: ``resume`` without a checkpoint to resume (the message names the path), or
            a non-empty ``out`` without ``resume`` or ``overwrite``.
    """
    import shutil

    if config.out is None:
        if config.resume:
            raise ConfigError("resume: no output directory (--out) to resume from")
        return
    out = Path(config.out)
    ckpt = out / CHECKPOINT_NAME
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out: {out} exists and is not a directory")
    if config.resume:
        if not ckpt.is_file():
            raise ConfigError(
                f"resume: no checkpoint at {ckpt} (nothing to resume); drop --resume to start a "
                "new run" + (", with --overwrite to replace what is there" if out.is_dir() else "")
            )
        return
    if out.is_dir() and any(out.iterdir()):
        if not config.overwrite:
            what = "an earlier run" if ckpt.exists() or (out / METRICS_NAME).exists() else "files"
            raise ConfigError(
                f"out: {out} is not empty (it holds {what}); use --resume to continue its "
                "checkpoint, --overwrite to replace it, or another --out"
            )
        if clear:
            for name in RUN_FILES:
                target = out / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()


def check_writable(out: Path) -> None:
    """Create ``out`` and write a file in it now, so that a path that cannot hold the run (a
    parent that is a file, a read-only place) fails before training, not at the first
    checkpoint with the work lost."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".lrnnx-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"out: cannot write to {out} ({e.strerror or e})") from None


def read_checkpoint(path: Path, map_location: Any = "cpu") -> Dict[str, Any]:
    """The dict of a checkpoint written by :func:`train`.

    Raises:
        ConfigError: (a ValueError) the file is unreadable (truncated, empty, not a torch
            file) or not an lrnnx training checkpoint; the message names it.
    """
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ...
        raise ConfigError(
            f"{path}: cannot read this checkpoint ({type(e).__name__}: {str(e)[:120]}); it is "
            "damaged or not a torch file"
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{path}: not an lrnnx training checkpoint (no {CHECKPOINT_FORMAT!r})")
    return state


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the trained network from a checkpoint written by :func:`train`.

    ``path`` is the checkpoint file or the run's output directory.  Returns ``(model, state)``
    with the model in eval mode and ``state`` the whole checkpoint dict (``"config"``,
    ``"step"``, ``"task"``, ``"architecture"``, optimizer state, history).

    Raises:
        ConfigError: (a ValueError) an unreadable file or not an lrnnx training checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    state = read_checkpoint(path, map_location)
    model = build_from_spec(state["architecture"])
    model.load_state_dict(state["model_state"])
    model.to(map_location if isinstance(map_location, (str, torch.device)) else "cpu")
    return model.eval(), state


def plot_curves(
    runs: Dict[str, Dict[str, List[Dict[str, float]]]],
    path: Path,
    title: str = "",
    log: Callable[[str], None] = print,
    chance: Optional[Dict[str, float]] = None,
) -> bool:
    """Loss and accuracy against step for one or more runs' histories; False if nothing was
    written (no matplotlib, or no points to plot yet).

    ``runs`` maps a label to a history ``{"train": [{step, loss, acc}], "eval": [...]}``.
    ``chance`` (``{"acc": ..., "loss": ...}``) draws the chance level as a horizontal line on
    both panels.  The loss axis starts at 0 and the accuracy axis spans [0, 1], so a flat
    curve looks flat.
    """
    if not any(hist.get(split) for hist in runs.values() for split in ("train", "eval")):
        log(f"no training steps logged yet: skipping {Path(path).name}")
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log(f"matplotlib is not installed: skipping {Path(path).name} (pip install matplotlib)")
        return False
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for label, hist in runs.items():
        prefix = f"{label} " if len(runs) > 1 else ""
        for split, style in (("train", "-"), ("eval", "o-")):
            pts = hist.get(split, [])
            if not pts:
                continue
            name = prefix + ("train" if split == "train" else "test")
            steps = [p["step"] for p in pts]
            (line,) = ax_loss.plot(steps, [p["loss"] for p in pts], style, label=name, ms=3)
            ax_acc.plot(
                steps, [p["acc"] for p in pts], style, label=name, ms=3, color=line.get_color()
            )
    if chance and chance.get("acc") is not None:
        label = f"chance ({chance['acc']:.1%})"
        ax_acc.axhline(chance["acc"], color="gray", ls="--", lw=1, label=label)
    if chance and chance.get("loss") is not None:
        label = f"chance ({chance['loss']:.2f})"
        ax_loss.axhline(chance["loss"], color="gray", ls="--", lw=1, label=label)
    ax_loss.set(xlabel="step", ylabel="cross-entropy", title="loss")
    ax_loss.set_ylim(0, 1.08 * ax_loss.get_ylim()[1])  # from 0: a flat loss must look flat
    ax_acc.set(xlabel="step", ylabel="accuracy", ylim=(0, 1.02), title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(Path(path), lambda f: f.write(buf.getvalue()))
    return True


# ----------------------------------------------------------------------------- distributed


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # whether train() initialised the process group (and tears it down)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> DistContext:
    """Join the process group torchrun describes in the environment (WORLD_SIZE > 1)."""
    world = launch_env("WORLD_SIZE", 1)
    if world <= 1:
        return DistContext()
    local = launch_env("LOCAL_RANK", 0)
    owns = False
    if not dist.is_initialized():
        wants_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        if wants_cuda:
            torch.cuda.set_device(local % torch.cuda.device_count())
        dist.init_process_group(backend="nccl" if wants_cuda else "gloo")
        owns = True
    return DistContext(dist.get_rank(), dist.get_world_size(), local, owns)


# ----------------------------------------------------------------------------- training


def _time_is_up(max_time: Optional[float], elapsed: float, ctx: DistContext) -> bool:
    """Whether to stop for ``max_time``; under DDP rank 0 decides for everyone (no deadlock)."""
    if max_time is None:
        return False
    flag = torch.tensor([float(elapsed >= max_time)])
    if ctx.world_size > 1:
        if dist.get_backend() == "nccl":
            flag = flag.cuda()
        dist.broadcast(flag, src=0)
    return bool(flag.item())


@dataclass
class TrainResult:
    """What :func:`train` returns: the trained (unwrapped) network and the metrics dict."""

    model: nn.Module
    metrics: Dict[str, Any]
    interrupted: bool = False
    #: why the run stopped on a non-finite loss or gradient norm (None: it did not)
    diverged: Optional[str] = None


def _batching_text(data: TaskData, config: TrainConfig) -> str:
    """How variable-length batches are laid out, for the run's header line."""
    if data.train.lengths is None:
        return ""
    mean = float(data.train.lengths.float().mean())
    if config.pack:
        return f" packed (rows of ~{config.batch_size * mean:.0f} tokens, mean length {mean:.0f})"
    return f" padded to {data.seq_len} (mean length {mean:.0f})"


def _batch_tokens(batch: Split) -> int:
    """Tokens of a batch's examples (without padding, so padded and packed runs compare)."""
    if batch.lengths is None:
        return batch.inputs.shape[0] * batch.inputs.shape[1]
    return int(batch.lengths.sum())


def _fmt_rate(x: float) -> str:
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}"


def train(
    config: TrainConfig,
    log: Optional[Callable[[str], None]] = None,
    prepared: Optional[Prepared] = None,
) -> TrainResult:
    """Train, evaluate and save one run (see the module docstring).

    Args:
        config: the run.
        log: where progress lines go (default: print to stdout, flushed; rank 0 only).
        prepared: the result of :func:`prepare`, if the caller already built it.

    A ``KeyboardInterrupt`` stops training cleanly: the last checkpoint stays as it was (it is
    only ever replaced atomically), the weights reached are saved to ``last/``, metrics are
    written with ``"interrupted": true`` and the result has ``interrupted=True``.

    Raises:
        ConfigError: a bad setting; ``resume`` without a checkpoint in ``out``; a non-empty
            ``out`` without ``resume`` or ``overwrite``.
    """
    threads = torch.get_num_threads()
    config.validate()
    # before joining the process group: no process writes anything before every process has
    # checked (and only the first one clears an --overwrite directory)
    check_output_dir(config, clear=_rank_from_env() == 0)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    ctx = init_distributed(config.device)
    try:
        return _train(config, ctx, log, prepared)
    finally:
        torch.set_num_threads(threads)
        if ctx.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _train(
    config: TrainConfig,
    ctx: DistContext,
    log: Optional[Callable[[str], None]],
    prepared: Optional[Prepared],
) -> TrainResult:
    def say(msg: str) -> None:
        if ctx.is_main:
            (log or (lambda m: print(m, flush=True)))(msg)

    prep = prepared or prepare(config)
    data, info, arch = prep.data, prep.info, prep.arch
    if config.out is not None and ctx.is_main:  # a run that can work: its folder, now
        check_writable(Path(config.out))
    device = resolve_device(config.device, ctx.local_rank)
    model = prep.model.to(device)
    out = Path(config.out) if config.out else None
    ckpt_path = out / CHECKPOINT_NAME if out else None

    # the models' own hints (S4/S4D's _optim, Mamba's and RG-LRU's _no_weight_decay) decide
    groups = param_groups(model, config.weight_decay)
    opt = torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.98))
    warmup = config.warmup_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup, config.steps))

    history: Dict[str, List[Dict[str, float]]] = {"train": [], "eval": []}
    start_step, elapsed_before = 0, 0.0
    if config.resume and ckpt_path is not None:  # check_output_dir made sure it exists
        state = check_resume(ckpt_path, prep, device)
        model.load_state_dict(state["model_state"])
        try:
            opt.load_state_dict(state["optimizer_state"])
        except ValueError as e:  # its parameter groups differ (an older lrnnx's grouping)
            raise ConfigError(
                f"resume: {ckpt_path} holds an optimizer with other parameter groups ({e}); "
                "start a new run (another --out, or --overwrite)"
            ) from None
        sched.load_state_dict(state["scheduler_state"])
        start_step, history = state["step"], state["history"]
        elapsed_before = state.get("time_s", 0.0)

    net = model
    if ctx.world_size > 1:
        ids = [device.index] if device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(model, device_ids=ids)

    n_params = count_parameters(model)
    chance = chance_level(data)
    # the best evaluation so far (kept in best/); a resumed run continues the earlier record
    best: Optional[Dict[str, float]] = None
    if start_step and out is not None and (out / BEST_NAME / "config.json").is_file():
        best = max(history["eval"], key=_eval_rank, default=None)

    def snapshot(step: int, elapsed: float, final: Optional[dict], interrupted: bool) -> dict:
        return {
            "task": data.name,
            "task_kind": data.kind,
            "task_params": data.params,
            "seq_len": data.seq_len,
            "model": info.name,
            "family": info.family,
            "architecture": arch,
            "n_params": n_params,
            "config": dataclasses.asdict(config),
            "world_size": ctx.world_size,
            "device": str(device),
            "steps_completed": step,
            "interrupted": interrupted,
            "stopped_early": stopped_early,
            "diverged": diverged,
            "time_s": elapsed,
            "history": history,
            "final": final,
            "chance": chance,
            "checkpoint": CHECKPOINT_NAME if last_ckpt_step is not None else None,
            "best": None if best is None else {**best, "dir": BEST_NAME},
            "last": None if last_dir_step is None else {"step": last_dir_step, "dir": LAST_NAME},
        }

    def checkpoint(step: int, elapsed: float) -> None:
        if ckpt_path is None or not ctx.is_main:
            return
        save_checkpoint(
            ckpt_path,
            {
                "format": CHECKPOINT_FORMAT,
                "step": step,
                "time_s": elapsed,
                "model_state": model.state_dict(),
                "optimizer_state": opt.state_dict(),
                "scheduler_state": sched.state_dict(),
                "config": dataclasses.asdict(config),
                "architecture": arch,
                "task": {
                    "name": data.name,
                    "kind": data.kind,
                    "params": data.params,
                    "seq_len": data.seq_len,
                    "n_test": len(data.test),
                },
                "history": history,
            },
        )

    def save_last(step: int) -> None:
        nonlocal last_dir_step
        if out is not None and ctx.is_main:
            save_model_dir(model, out / LAST_NAME)
            last_dir_step = step

    stopped_early = False
    diverged: Optional[str] = None  # why the run stopped on a non-finite loss or gradient
    # the step of the checkpoint this run stands behind (a resumed run's, then its own ones)
    last_ckpt_step = start_step if config.resume and start_step > 0 else None
    last_dir_step: Optional[int] = None  # the step of the weights this run wrote to last/

    if start_step >= config.steps:  # a finished run, or --steps lowered below the checkpoint's
        say(
            f"{ckpt_path} is already at step {start_step}, at or past --steps {config.steps}: "
            "nothing to train (raise --steps to train further)"
        )
        final = _final_metrics(history)
        return TrainResult(model=model, metrics=snapshot(start_step, elapsed_before, final, False))

    if start_step:
        what = f"{config.steps} steps (resumed from {ckpt_path} at step {start_step})"
    else:
        what = f"{config.steps} steps"
    say(
        f"lrnnx train: task {data.name} ({data.kind}, L={data.seq_len}, {len(data.train)} train / "
        f"{len(data.test)} test) | model {info.name} ({info.family}) in {arch['class']}, "
        f"{config.layers} layers, d_model {config.d_model}, {n_params:,} parameters | "
        f"{what}, batch {config.batch_size}"
        + (f" x {ctx.world_size} processes" if ctx.world_size > 1 else "")
        + _batching_text(data, config)
        + f", lr {config.lr:g} | device {device}"
    )
    if chance is not None:
        say(f"chance level: {_chance_text(chance)}")

    t0 = time.perf_counter()
    step, interrupted = start_step, False
    window = {"loss": 0.0, "correct": 0.0, "count": 0.0, "tokens": 0, "steps": 0, "lr": 0.0}
    t_window = time.perf_counter()

    def log_window(step: int) -> None:
        """The training steps since the last record: one history record and progress line."""
        nonlocal window, t_window
        dt = max(time.perf_counter() - t_window, 1e-9)
        rec = {
            "step": step,
            "loss": window["loss"] / window["steps"],
            "acc": window["correct"] / max(window["count"], 1.0),
            "tokens_per_s": window["tokens"] / dt,
        }
        history["train"].append(rec)
        say(
            f"step {step:>{len(str(config.steps))}}/{config.steps}  loss {rec['loss']:.4f}"
            f"  acc {rec['acc']:6.1%}  tok/s {_fmt_rate(rec['tokens_per_s'])}"
            f"  lr {window['lr']:.2e}"
            f"  {elapsed_before + time.perf_counter() - t0:.0f}s"
        )
        window = {k: 0 for k in window}
        t_window = time.perf_counter()

    model.train()
    try:
        while step < config.steps:
            idx = batch_indices(len(data.train), config.batch_size, config.seed, ctx.rank, step)
            batch = data.train[idx].to(device)
            loss, correct, count = forward_batch(net, batch, data.kind, config.pack)
            loss_value = float(loss.detach())
            if not _all_finite(loss_value, ctx, device):
                diverged = f"the training loss at step {step + 1} is not finite ({loss_value})"
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                norm = float(nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip))
                if not _all_finite(norm, ctx, device):
                    diverged = f"the gradient norm at step {step + 1} is not finite ({norm})"
                    break
            opt.step()
            window["lr"] = sched.get_last_lr()[0]  # the rate this step ran at, before the next
            sched.step()
            step += 1
            window["loss"] += loss_value
            window["correct"] += float(correct)
            window["count"] += count
            window["tokens"] += _batch_tokens(batch) * ctx.world_size
            window["steps"] += 1
            stop = _time_is_up(config.max_time, elapsed_before + time.perf_counter() - t0, ctx)
            if step % config.log_interval == 0 or step == config.steps or stop:
                log_window(step)
            if step % config.eval_interval == 0 or step == config.steps or stop:
                t_eval = time.perf_counter()
                ev = evaluate(
                    model,
                    data.test,
                    data.kind,
                    device,
                    config.eval_batch_size,
                    ctx.rank,
                    ctx.world_size,
                    config.pack,
                )
                history["eval"].append({"step": step, **ev})
                say(f"eval step {step}: test loss {ev['loss']:.4f}  test acc {ev['acc']:.1%}")
                elapsed = elapsed_before + time.perf_counter() - t0
                checkpoint(step, elapsed)
                if ckpt_path is not None:
                    last_ckpt_step = step
                save_last(step)
                if best is None or _eval_rank(history["eval"][-1]) > _eval_rank(best):
                    best = history["eval"][-1]
                    if out is not None and ctx.is_main:
                        save_model_dir(model, out / BEST_NAME)
                if out is not None and ctx.is_main:
                    write_json(out / METRICS_NAME, snapshot(step, elapsed, None, False))
                t_window += time.perf_counter() - t_eval  # evaluation does not count in tok/s
            if stop and step < config.steps:
                stopped_early = True
                say(f"time limit of {config.max_time:.0f}s reached after {step} steps")
                break
    except KeyboardInterrupt:
        interrupted = True
        say(f"\ninterrupted at step {step}")
        if window["steps"]:  # the steps since the last record still count (curve, metrics)
            log_window(step)
        if out is not None and ctx.is_main and last_dir_step != step:
            save_last(step)  # the weights reached, even before the first evaluation
        if last_ckpt_step is not None:
            say(
                f"checkpoint of step {last_ckpt_step} kept: {ckpt_path} (`lrnnx train` with the "
                f"run's settings, --out {out} and --resume continues it)"
            )
        elif out is not None:
            say(
                f"no checkpoint yet (the first comes with the evaluation at step "
                f"{config.eval_interval}): --resume has nothing to continue"
            )

    if diverged is not None:
        diverged += (
            ": the run diverged and stopped before that step's update (lower --lr, keep "
            "--grad-clip on, or check the task's options)"
        )
        say(diverged)
    elapsed = elapsed_before + time.perf_counter() - t0
    final_metrics = _final_metrics(history)
    metrics = snapshot(step, elapsed, final_metrics, interrupted)
    if out is not None and ctx.is_main:
        write_json(out / METRICS_NAME, metrics)
        if config.plot:
            title = f"{data.name}: {info.name} ({n_params:,} parameters)"
            if plot_curves({info.name: history}, out / CURVE_NAME, title, log=say, chance=chance):
                say(f"wrote {out / CURVE_NAME}")
        saved = f" and {ckpt_path}" if last_ckpt_step is not None else ""
        say(f"wrote {out / METRICS_NAME}{saved}")
        _say_model_dirs(say, out, arch["class"], best, last_dir_step)
    if final_metrics is not None and not interrupted and diverged is None:
        vs = f", chance {chance['acc']:.1%}" if chance is not None else ""
        say(
            f"done: test accuracy {final_metrics['test_acc']:.1%} (loss "
            f"{final_metrics['test_loss']:.4f}{vs}) after {step} steps in {elapsed:.0f}s"
        )
    return TrainResult(model=model, metrics=metrics, interrupted=interrupted, diverged=diverged)


def _all_finite(value: float, ctx: DistContext, device: torch.device) -> bool:
    """Whether ``value`` is finite on every process (one all-reduce under torchrun, so that all
    stop at the same step)."""
    ok = math.isfinite(value)
    if ctx.world_size > 1:
        flag = torch.tensor([0.0 if ok else 1.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        ok = flag.item() == 0.0
    return ok


def chance_level(data: TaskData) -> Optional[Dict[str, float]]:
    """Accuracy and loss of a uniform guess among the task's possible answers (None if the
    task does not say how many there are)."""
    if data.chance_acc is None:
        return None
    return {"acc": data.chance_acc, "loss": data.chance_loss, "n_choices": data.n_choices}


def _chance_text(chance: Dict[str, float]) -> str:
    return (
        f"test accuracy {chance['acc']:.1%}, loss {chance['loss']:.3f} "
        f"(a uniform guess among {chance['n_choices']} possible answers)"
    )


def _eval_rank(ev: Dict[str, float]) -> tuple:
    """Order of evaluations for ``best/``: higher accuracy, then lower loss, then earlier."""
    return (ev["acc"], -ev["loss"], -ev["step"])


def _final_metrics(history: Dict[str, List[Dict[str, float]]]) -> Optional[Dict[str, float]]:
    if not history["eval"]:
        return None
    final = history["eval"][-1]
    out = {"test_loss": final["loss"], "test_acc": final["acc"], "step": final["step"]}
    if history["train"]:
        out["train_loss"] = history["train"][-1]["loss"]
        out["train_acc"] = history["train"][-1]["acc"]
    return out


def _say_model_dirs(
    say: Callable[[str], None],
    out: Path,
    cls_name: str,
    best: Optional[Dict[str, float]],
    last_step: Optional[int],
) -> None:
    """Where the ``save_pretrained`` directories are and how to load them."""
    if best is not None:
        say(f"best model (step {best['step']}, test accuracy {best['acc']:.1%}): {out / BEST_NAME}")
    if last_step is not None:
        say(f"last model (step {last_step}): {out / LAST_NAME}")
    if best is not None or last_step is not None:
        which = BEST_NAME if best is not None else LAST_NAME
        say(
            f"load it: from lrnnx.architectures import {cls_name}; "
            f'{cls_name}.from_pretrained("{(out / which).as_posix()}")'
        )

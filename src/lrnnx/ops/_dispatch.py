"""Backend selection for every op in :mod:`lrnnx.ops`.

Each op folder registers its backends here by name.  A call picks, in order:
the ``backend=`` argument, the ``LRNNX_BACKEND`` environment variable, then the first
available backend in the device's preference list.  A backend whose import or toolchain is
missing is skipped with one warning (naming the backend used instead and how to install the
missing one), so a call always lands on a backend that runs.

A numba backend picked from the preference list runs on the pure-torch backend while its kernels
compile in a background process, unless ``LRNNX_NUMBA_COMPILE=wait`` (see
:mod:`lrnnx.ops._numba`) or the op is in :data:`COMPILE_IN_PROCESS`; one asked for by name runs
its own kernels, compiling them if needed.

Small work.  Picked from the preference list, a numba backend also hands calls too small to
repay its fixed cost to the pure-torch backend (:data:`SMALL_CALLS`, :func:`call_backend`); the
kernels run on :func:`lrnnx.ops._numba.threads_for` threads (one below
:data:`lrnnx.ops._numba.SERIAL_WORK` elements, never more than ``torch.get_num_threads()``),
torch's own (:func:`lrnnx.ops._numba.run_on_threads`).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import warnings
from typing import Callable, Dict, Optional

import torch

from lrnnx.core.autograd import transformed
from lrnnx.core.checks import recording_program, user_stacklevel

#: preference order per device type; "reference" is only used when asked for
PREFERENCE = {
    "cpu": ("cpu", "torch"),
    "cuda": ("triton", "torch"),
}
DEFAULT_PREFERENCE = ("torch",)

# op -> backend name -> "module:function"
_REGISTRY: Dict[str, Dict[str, str]] = {}
_LOADED: Dict[tuple, Optional[Callable]] = {}
_WARNED: set = set()
_REASONS: Dict[tuple, str] = {}  # why a backend is unavailable

#: how to get a backend whose toolchain is missing
_INSTALL = {"triton": "pip install triton (CUDA only)"}

#: what each fallback is, for the warning
_DESCRIBE = {"torch": "chunked pure PyTorch, slower", "cpu": "the fused numba kernels"}


def register(op: str, backend: str, target: str) -> None:
    """Register ``target`` ("package.module:function") as backend ``backend`` of ``op``.

    The pure-torch backend is imported at once: it is light, and torch.compile may need it
    while tracing, where no module can be imported."""
    _REGISTRY.setdefault(op, {})[backend] = target
    if backend == "torch":
        _load(op, backend)


def backends(op: str) -> list[str]:
    """Names registered for ``op``."""
    return list(_REGISTRY.get(op, {}))


def _missing_reason(mod, name: str) -> str:
    """Why an imported backend module reports itself unavailable, and how to fix it."""
    from lrnnx.ops import _numba

    if getattr(mod, "HAVE_NUMBA", None) is not None and not _numba.HAVE_NUMBA:
        return _numba.MISSING_NUMBA
    fix = _INSTALL.get(name)
    return "its toolchain is not available" + (f"; {fix}" if fix else "")


def _load(op: str, name: str) -> Optional[Callable]:
    key = (op, name)
    if key not in _LOADED:
        module, func = _REGISTRY[op][name].split(":")
        try:
            mod = importlib.import_module(module)
            fn = getattr(mod, func)
            available = getattr(mod, "is_available", lambda: True)
            _LOADED[key] = fn if available() else None
            if _LOADED[key] is None:
                _REASONS[key] = _missing_reason(mod, name)
        except Exception as e:  # a missing optional dependency must never break the op
            _LOADED[key] = None
            _REASONS[key] = f"{type(e).__name__}: {e}"
    return _LOADED[key]


def _warn_unavailable(op: str, name: str, used: str) -> None:
    """One warning per (op, backend): what is missing, what runs instead, how to fix it."""
    key = (op, name)
    if key in _WARNED:
        return
    _WARNED.add(key)
    what = _DESCRIBE.get(used)
    warnings.warn(
        f"lrnnx: backend {name!r} of {op} is unavailable ({_REASONS.get(key, 'unknown reason')})"
        f"; falling back to {used!r}" + (f" ({what})" if what else ""),
        RuntimeWarning,
        stacklevel=user_stacklevel(),
    )


#: the environment variable that forces a backend for every op that has it
BACKEND_ENV = "LRNNX_BACKEND"


def _env_value() -> str:
    """``LRNNX_BACKEND`` as set ("" when unset), read afresh at each eager call.

    Marked a constant for torch.compile and torch.export (below): Dynamo calls it while
    tracing and records its value in the graph, as torch 2.13's Dynamo does tracing
    ``os.environ`` itself (with no guard either way: a graph keeps the backends it was traced
    with); Dynamo 2.4 fails on ``os.environ.get`` ("constant fold exception:
    KeyError(b'LRNNX_BACKEND')"; "const method call bytes.decode" when set)."""
    return os.environ.get(BACKEND_ENV, "")


# torch.compiler.assume_constant_result(_env_value) sets just this attribute (torch 2.4 to 2.13),
# but imports Dynamo (over a second) when nothing may ever be compiled.  The name's leading
# underscore matters with torch 2.4, whose Dynamo stores the value as a global of the traced
# frame's module named after the function: "sub" + the name when it does not start with a
# letter, never a name lrnnx uses.
_env_value._dynamo_marked_constant = True  # type: ignore[attr-defined]


def env_backend() -> Optional[str]:
    """``LRNNX_BACKEND`` as a name (case and surrounding spaces ignored), or None when unset or
    empty; not checked against any op's backends (see :func:`requested_backend`)."""
    return _env_value().strip().lower() or None


def requested_backend(op: str, backend: Optional[str] = None) -> Optional[str]:
    """The backend asked for: ``backend=``, else ``LRNNX_BACKEND`` (case and spaces ignored),
    else None (lrnnx's choice).  A name from the variable that another op has but ``op`` lacks
    (``triton``: the causal convolution and the Cauchy product have no Triton kernels) leaves
    ``op`` to lrnnx's choice, with one warning: the variable sets a whole model's backend.

    Raises:
        ValueError: ``backend=`` names no backend of ``op``, or the variable names no backend
            of any op.
    """
    table = _REGISTRY[op]
    if backend is not None:
        if backend not in table:
            raise ValueError(f"backend: expected one of {list(table)} for {op}, got {backend!r}")
        return backend
    env = env_backend()
    if env is None or env in table:
        return env
    known = sorted({name for ops in _REGISTRY.values() for name in ops})
    if env not in known:
        raise ValueError(f"{BACKEND_ENV}: expected one of {known}, got {_env_value()!r}")
    if (op, env, "absent") not in _WARNED:
        _WARNED.add((op, env, "absent"))
        warnings.warn(
            f"lrnnx: {BACKEND_ENV}={env}: {op} has no {env!r} backend (it has {list(table)}); "
            f"it runs on lrnnx's choice for the device",
            RuntimeWarning,
            stacklevel=user_stacklevel(),
        )
    return None


def select(op: str, device: torch.device, backend: Optional[str] = None) -> tuple[str, Callable]:
    """The backend ``op`` runs on for tensors on ``device``: its name and its function."""
    table = _REGISTRY[op]
    requested = requested_backend(op, backend)
    skipped = []  # backends tried and unavailable, warned about once a working one is found
    if requested is not None:
        fn = _load(op, requested)
        if fn is not None:
            return requested, fn
        skipped.append(requested)
    for name in PREFERENCE.get(device.type, DEFAULT_PREFERENCE):
        if name in table and name != requested:
            fn = _load(op, name)
            if fn is not None:
                for s in skipped:
                    _warn_unavailable(op, s, name)
                return name, _deferred(op, name, fn)
            skipped.append(name)
    for s in skipped:
        _warn_unavailable(op, s, "torch")
    return "torch", _load(op, "torch")


#: ops whose numba kernels compile in the process at their first call even in "background"
#: mode, because their torch backend is far slower than the compile: torch's depthwise
#: convolution backward took 12.6 s per call at B=4, D=512, L=2048 on the 2-core AMD EPYC
#: (the fused kernels: 0.1 s, compiled in about 5 s)
COMPILE_IN_PROCESS = {"causal_conv1d"}


def _few_steps(most: int) -> Callable[..., bool]:
    """A rule: the call's ``b`` (second argument, (B, L, ...)) has at most ``most`` steps."""

    def rule(*args, **kwargs) -> bool:
        b = args[1] if len(args) > 1 else kwargs.get("b")
        return isinstance(b, torch.Tensor) and b.dim() > 1 and b.shape[1] <= most

    return rule


def _small_cauchy_matrix(most: int) -> Callable[..., bool]:
    """A rule: the call's Cauchy matrix (w (H, N) by a (K,), its second and third arguments)
    has at most ``most`` entries."""

    def rule(*args, **kwargs) -> bool:
        w = args[1] if len(args) > 1 else kwargs.get("w")
        a = args[2] if len(args) > 2 else kwargs.get("a")
        return (
            isinstance(w, torch.Tensor)
            and isinstance(a, torch.Tensor)
            and (w.numel() * a.numel() <= most)
        )

    return rule


#: calls too small to repay a fused kernel's fixed cost: where the fused backend is lrnnx's own
#: choice they run on the pure-torch backend (same arguments, same results up to rounding).
#: linear_scan over <= 2 steps: the fused call took 113 us against torch's 71 (B = 1, 16 to 128
#: channels, float32 or complex64; forward+backward 451 against 356), its fixed cost (array
#: views, a zero state, the autograd Function) being all there is; from 4 steps on the kernel
#: is as fast or faster.  The fused selective scan and causal_conv1d were faster from one step.
#: cauchy with a Cauchy matrix of at most 2**16 (h, n, k) entries (512 KiB in complex64): there
#: the fused call's fixed cost (~80 us forward at the smallest sizes, torch's 46) dominates;
#: S4's layer at B = 1, L <= 64, H = 64, N = 16 ran 1.1-1.25x slower on the fused kernels
#: (2-core AMD EPYC znver5: forward+backward of the op at H = 64, N = 16, K = 33: 496 us against
#: torch's 364; at K = 65: 586 against 1181)
SMALL_CALLS: Dict[str, Callable[..., bool]] = {
    "linear_scan": _few_steps(2),
    "cauchy": _small_cauchy_matrix(1 << 16),
}


def small_call(op: str, args: tuple, kwargs: Optional[dict] = None) -> bool:
    """Whether a call of ``op`` with these (backend) arguments is small enough to run on the
    pure-torch backend rather than a fused one lrnnx picked (see :data:`SMALL_CALLS`)."""
    rule = SMALL_CALLS.get(op)
    return rule is not None and rule(*args, **(kwargs or {}))


def call_backend(
    op: str, device: torch.device, args: tuple, kwargs: Optional[dict] = None,
    backend: Optional[str] = None,
) -> str:  # fmt: skip
    """The backend a call of ``op`` with these backend arguments runs on: :func:`select`'s pick,
    except that a small call (:func:`small_call`) goes to "torch" when the pick was lrnnx's own
    (a backend asked for by name always runs).  Background compilation aside (see
    :mod:`lrnnx.ops._numba`)."""
    name, _ = select(op, device, backend)
    requested = requested_backend(op, backend)
    if name != requested and name != "torch" and "torch" in _REGISTRY[op]:
        if small_call(op, args, kwargs):
            return "torch"
    return name


_DEFERRED: Dict[tuple, Callable] = {}


def _deferred(op: str, name: str, fn: Callable) -> Callable:
    """``fn`` as lrnnx's own pick runs it.  A numba backend's ``fn`` is wrapped: a small call
    (:data:`SMALL_CALLS`) runs the torch backend; and, unless the op is in
    :data:`COMPILE_IN_PROCESS`, calls run the torch backend until the kernels are compiled
    (:func:`lrnnx.ops._numba.deferred`)."""
    key = (op, name, fn)
    if key not in _DEFERRED:
        module = sys.modules[_REGISTRY[op][name].split(":")[0]]
        fallback = _load(op, "torch") if "torch" in _REGISTRY[op] else None
        if getattr(module, "HAVE_NUMBA", False):
            _DEFERRED[key] = _numba_call(op, module, fn, fallback)
        else:
            _DEFERRED[key] = fn
    return _DEFERRED[key]


def _numba_call(op: str, module, fn: Callable, fallback: Optional[Callable]) -> Callable:
    """The wrapper :func:`_deferred` gives a numba backend (``__wrapped__``: ``fn``)."""
    from lrnnx.ops import _numba

    # (the kernels choose their threads per call: lrnnx.ops._numba.threads_for)
    if fallback is None:
        return fn
    fused = fn if op in COMPILE_IN_PROCESS else _numba.deferred(module, fn, fallback)
    rule = SMALL_CALLS.get(op)

    def call(*args, **kwargs):
        if rule is not None and rule(*args, **kwargs):
            return fallback(*args, **kwargs)
        return fused(*args, **kwargs)

    call.__wrapped__ = fn  # inspect.unwrap finds the backend's own function
    call.__name__ = getattr(fn, "__name__", "call")
    call.__doc__ = fn.__doc__
    return call


_OPAQUE: Dict[Callable, Callable] = {}


def _opaque(fn: Callable) -> Callable:
    """``fn`` as one opaque call for torch.compile (a graph break) rather than traced into numba or
    Triton launchers and chunk loops, which Dynamo cannot follow.  Only once Dynamo is loaded:
    importing it costs seconds, and without it nothing is being compiled."""
    if "torch._dynamo" not in sys.modules:
        return fn
    if fn not in _OPAQUE:
        _OPAQUE[fn] = torch.compiler.disable(fn)
    return _OPAQUE[fn]


def no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """A context with autocast off on ``device`` while an op's backend runs: the ops cast their
    inputs to their compute dtype (float32 at least) themselves, and autocast would otherwise
    run the torch backends' einsums and convolutions in bf16/fp16 inside them (the recurrences
    must accumulate in float32 on every backend); the models' recurrences enter it too.  A
    null context when autocast is off: torch.export 2.4 records an autocast context, even a
    disabling one, as a node its verifier then rejects ("Node.meta _enter_autocast is missing
    val field")."""
    try:
        on = torch.is_autocast_enabled(device.type)
    except (RuntimeError, TypeError):  # a device without autocast (meta), or torch < 2.4
        on = False
    return torch.autocast(device.type, enabled=False) if on else contextlib.nullcontext()


def resolve(
    op: str, device: torch.device, backend: Optional[str] = None, inputs: tuple = ()
) -> Callable:
    """Return the function implementing ``op`` for tensors on ``device``.

    ``inputs``: the call's tensors.  Under a torch.func transform or with forward-mode tangents
    (:func:`lrnnx.core.autograd.transformed`) the op runs on its ``reference`` backend, plain
    differentiable torch that every transform handles, whatever was asked: the fused kernels
    read raw memory and their Functions have no vmap or jvp rules.  While ``torch.export`` or
    ``torch.jit.trace`` records a program (:func:`lrnnx.core.checks.recording_program`) it runs
    on its ``torch`` backend, which both record (the fused kernels read raw memory).

    Under torch.compile the pure-torch backend is returned as it is, so Dynamo traces it into
    the graph (``fullgraph=True`` works with it: ``LRNNX_BACKEND=torch`` or ``backend="torch"``);
    the fused numba/Triton kernels stay opaque calls, one graph break each, since Dynamo cannot
    follow their launchers."""
    if inputs and transformed(*inputs):
        backend = "reference"
    elif recording_program():
        backend = "torch"
    name, fn = select(op, device, backend)
    if name == "torch":
        return fn
    return _opaque(fn)

"""Shared plumbing for the numba CPU backends: availability, threads, tensor <-> array views, and
when their kernels compile.

Cold start.  numba compiles a kernel at its first call for each argument type (dtype, real or
complex) and keeps the machine code in its on-disk cache (``cache=True``: next to the source
file, or under ``NUMBA_CACHE_DIR`` or numba's per-user cache directory when the install
directory is read-only).  Compiling the selective scan takes 10-30 s on a 2-core machine, so
``LRNNX_NUMBA_COMPILE`` chooses what a first call does when its kernels are not in the cache:

* ``background`` (default): the call runs on the pure-torch backend at once (same results up to
  rounding) while a separate process, on otherwise idle CPU time, compiles the kernels into the
  cache; calls switch to the fused kernels once that process is done (one such process at a
  time).  A process, not a thread: compiling holds the GIL.  The process ends with this one (it
  watches a pipe from it), so it never outlives it; what it compiled so far stays cached.
  Processes starting together (pytest-xdist, DDP ranks, CI jobs) take turns through a lock file
  in the cache directory: one compiles, the others then find the kernels cached.
* ``wait``: the call compiles in this process and waits (reproducible timing: ``lrnnx bench``).
  With :data:`MARK_WAIT_COMPILES` (``lrnnx train`` and ``lrnnx demo`` set it), every kernel of
  the call's variant compiles at once and leaves the marker the background process would
  (:func:`compile_here`).

Either way the first compilation is announced once per process (only when numba actually
compiles, not when it loads from the cache).  A backend asked for by name (``backend="cpu"``,
``LRNNX_BACKEND=cpu``) always runs its own kernels, compiling in this process if needed.

Threads.  The kernels are compiled ``nogil`` and split their work into shares that
:func:`run_on_threads` runs on torch's own intra-op (OpenMP) threads, so the kernels and torch
never compete for the cores: a kernel never uses more than ``torch.get_num_threads()`` threads,
and small work (below :data:`SERIAL_WORK` elements) runs on the calling thread alone
(:func:`threads_for`).  numba's own threading layer (``parallel=True``) is not used: it starts
a second OpenMP runtime whose threads would spin beside torch's.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import hashlib
import itertools
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Dict, Optional

import torch
from torch import Tensor

from lrnnx.core.checks import user_stacklevel

try:
    import numba

    HAVE_NUMBA = True
except ImportError:  # the CPU backends then report themselves unavailable and dispatch falls back
    numba = None
    HAVE_NUMBA = False

#: channels handled by one parallel task: long enough to vectorise, short enough to balance threads
CHANNEL_BLOCK = 256

#: why the ``cpu`` backends are unavailable without numba, and the fix
MISSING_NUMBA = 'numba is not installed: pip install "lrnnx[cpu]" adds it'

#: the environment variable choosing what a first call does while its kernels are not cached
COMPILE_ENV = "LRNNX_NUMBA_COMPILE"
COMPILE_MODES = ("background", "wait")

#: the modules whose kernels' compilation is announced
KERNEL_PACKAGE = "lrnnx."

logger = logging.getLogger("lrnnx.ops")
_ANNOUNCED = False
_IN_WORKER = False  # set in the background compile process: notices go to the parent


def is_available() -> bool:
    return HAVE_NUMBA


#: below this much work (elements of a call's largest tensor) a kernel runs on the calling
#: thread.  On a busy 2-core machine a numba parallel launch of tiny work (one step of 16
#: channels) took 2 us on one thread and 1.4-2.7 ms on average on two (p90 8 ms: the launch
#: waits for a worker thread the OS has descheduled, a whole scheduler tick); torch's own
#: parallel regions (oneDNN's gelu on 64 values) collapse the same way
SERIAL_WORK = 1 << 16


def threads_for(work: int, serial_below: int = SERIAL_WORK) -> int:
    """Threads a kernel call of ``work`` elements should use.

    1 below ``serial_below`` (starting threads costs more than the work), 1 on a thread of
    lrnnx's kernel pool (named "lrnnx-...": a kernel inside another kernel's parallel work
    would nest pools), and otherwise ``torch.get_num_threads()``: the kernels run on torch's
    own threads (:func:`run_on_threads`), so they never exceed the count torch is told to use.
    """
    if work < serial_below or threading.current_thread().name.startswith("lrnnx-"):
        return 1
    return max(1, torch.get_num_threads())


class _OpenMP:
    """The OpenMP runtime torch's intra-op pool runs on (GNU libgomp, or a runtime exporting
    its entry points: Intel's libiomp5, LLVM's libomp), reached through its C ABI."""

    def __init__(self, lib: ctypes.CDLL, path: str) -> None:
        self.path = path
        self.parallel = lib.GOMP_parallel  # (fn, data, num_threads, flags): GCC >= 4.9's ABI
        self.parallel.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
        self.parallel.restype = None
        self.thread_num = lib.omp_get_thread_num
        self.num_threads = lib.omp_get_num_threads
        for f in (self.thread_num, self.num_threads):
            f.argtypes, f.restype = [], ctypes.c_int


_OMP_NAMES = ("libgomp", "libiomp5", "libomp")
#: where a kernel's threads come from: "openmp" (torch's own OpenMP threads where found, the
#: default) or "pool" (a Python thread pool of lrnnx's: the fallback, and for comparison)
THREADS_ENV = "LRNNX_KERNEL_THREADS"
THREADS_MODES = ("openmp", "pool")


def kernel_threads_mode() -> str:
    """``LRNNX_KERNEL_THREADS``: "openmp" (default) or "pool".

    Raises:
        ValueError: the variable holds anything else.
    """
    return _env_choice(THREADS_ENV, THREADS_MODES)


def _env_choice(name: str, choices: tuple[str, ...]) -> str:
    """Environment variable ``name``, one of ``choices`` (case and spaces ignored; unset or
    empty: the first).

    Raises:
        ValueError: the variable holds anything else.
    """
    value = os.environ.get(name, "").strip().lower() or choices[0]
    if value not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {os.environ[name]!r}")
    return value


_OMP_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


_POOL: Optional[ThreadPoolExecutor] = None
_POOL_LOCK = threading.Lock()


#: set in a process forked from this one: the parent's OpenMP team does not exist there (GNU
#: libgomp does not support fork), so a forked child runs kernels on a thread pool
_FORKED = False


def _mark_forked() -> None:
    """In a forked child: no OpenMP team, and no pool (its threads were not copied)."""
    global _FORKED, _POOL, _POOL_LOCK
    _FORKED = True
    _POOL, _POOL_LOCK = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_mark_forked)


@functools.cache
def _find_openmp(pid: int) -> Optional[_OpenMP]:
    """torch's OpenMP runtime in this process (``pid``: looked up once per process), or None:
    a forked child, another parallel backend, a platform without ``/proc/self/maps`` (macOS,
    Windows), no runtime with the GNU entry points, or ``LRNNX_KERNEL_THREADS=pool``."""
    if _FORKED or kernel_threads_mode() == "pool":
        return None
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        with open("/proc/self/maps") as f:
            loaded = {line.split()[-1] for line in f if "/" in line}
    except OSError:
        return None
    names = [p for p in loaded if os.path.basename(p).startswith(_OMP_NAMES)]
    torch_dir = os.path.dirname(torch.__file__)
    names.sort(key=lambda p: not p.startswith(torch_dir))  # torch's own copy first
    for path in names:
        try:
            lib = ctypes.CDLL(path)
            return _OpenMP(lib, path)
        except (OSError, AttributeError):
            continue
    return None


def _pool_run(fn: Callable[[int, int], None], threads: int) -> None:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL._max_workers < threads - 1:  # follow torch.set_num_threads
            if _POOL is not None:
                _POOL.shutdown(wait=False)
            _POOL = ThreadPoolExecutor(threads - 1, thread_name_prefix="lrnnx-kernel")
        # submitted under the lock: another thread that needs more workers shuts this pool
        # down only after (its queued work still runs), never between the choice and a submit
        futures = [_POOL.submit(fn, i, threads) for i in range(1, threads)]
    try:
        fn(0, threads)
    finally:
        for f in futures:
            f.result()


def run_on_threads(fn: Callable[[int, int], None], threads: int) -> None:
    """Call ``fn(i, n)`` for i = 0 .. n - 1 on n threads at once (n <= ``threads``; thread 0
    is the calling one) and return when all are done; ``fn`` runs a ``nogil`` numba kernel on
    its share i of the work (its tasks i, i + n, ...).

    The threads are torch's own OpenMP threads when torch runs on OpenMP (Linux builds): after
    each parallel region of a torch op those threads spin for a few milliseconds waiting for
    the next, so threads of a separate pool would share the cores with them and run at half
    speed (measured on 2 cores: a selective scan forward took 13.8 ms after a torch op on a
    Python thread pool, 7.3 ms on torch's threads).  The calling thread's OpenMP team runs
    ``fn`` through ``GOMP_parallel``, each thread taking the GIL only to enter the kernel.
    Elsewhere (or with ``LRNNX_KERNEL_THREADS=pool``) a thread pool of lrnnx's runs it.  An
    exception raised in any thread is raised here after all have finished.
    """
    if threads <= 1:
        fn(0, 1)
        return
    omp = _find_openmp(os.getpid())
    if omp is None:
        _pool_run(fn, threads)
        return
    key = next(_OMP_KEYS)
    errors: list = []
    _OMP_WORK[key] = (fn, errors, omp)
    try:
        omp.parallel(_OMP_ENTRY_PTR, key, threads, 0)
    finally:
        del _OMP_WORK[key]
    if errors:
        raise errors[0]


#: the work of the run_on_threads calls in flight, by key (the ``data`` pointer of
#: GOMP_parallel): one ctypes callback serves every call, since a callback object made per
#: call sits in a reference cycle and kept the call's arrays alive until the next garbage
#: collection (hundreds of MB per call at large shapes)
_OMP_WORK: Dict[int, tuple] = {}
_OMP_KEYS = itertools.count(1)


def _omp_entry(key: int) -> None:
    """What each thread of the OpenMP team runs: its share of the call ``key``."""
    fn, errors, omp = _OMP_WORK[key]
    try:
        fn(omp.thread_num(), omp.num_threads())
    except BaseException as e:  # raised in the caller: a ctypes callback cannot raise
        errors.append(e)


_OMP_ENTRY = _OMP_CALLBACK(_omp_entry)
_OMP_ENTRY_PTR = ctypes.cast(_OMP_ENTRY, ctypes.c_void_p)


def _resolved(t: Tensor) -> Tensor:
    """t without torch's lazy conjugate and negative bits (``x.conj()``, ``x.conj().imag``, and
    gradients autograd hands back as such views), which numpy cannot read: a copy with the
    values applied where a bit is set, t itself otherwise (outputs the kernels write into
    never carry one)."""
    return t.detach().resolve_conj().resolve_neg()


class _Memory:
    """A tensor's memory described to numpy (``__array_interface__``, writable): the array's
    ``base``, so the tensor lives as long as the array."""

    __slots__ = ("tensor", "__array_interface__")

    def __init__(self, t: Tensor) -> None:
        size = t.element_size()
        self.tensor = t
        self.__array_interface__ = {
            "version": 3,
            "data": (t.data_ptr(), False),
            "shape": tuple(t.shape),
            "strides": tuple(stride * size for stride in t.stride()),
            "typestr": _TYPESTR[t.dtype],
        }


#: numpy's names of the dtypes the kernels take
_TYPESTR = {
    torch.float32: "<f4",
    torch.float64: "<f8",
    torch.complex64: "<c8",
    torch.complex128: "<c16",
    torch.int64: "<i8",
    torch.int32: "<i4",
}


def shared_array(t: Tensor, source: Optional[Tensor] = None):
    """``t`` as a writable numpy array over its memory.  ``Tensor.numpy()`` marks a storage as
    never to be resized again; where the memory belongs to a leaf tensor that requires grad
    (``source``, default ``t``, or the tensor it views: a parameter, which FSDP2 frees by
    resizing its storage to 0 after use, or such an input) the array is made from the memory's
    address instead (:class:`_Memory`), which leaves the storage as it was.  Not through DLPack:
    numpy makes such arrays read-only where the exporter predates DLPack 1.0 (torch before 2.9,
    or numpy 1.x), and numba then refuses to compile a kernel writing one (the backward of the
    general selective-scan kernels with a leaf delta failed so with torch 2.4 and numpy 1.26).
    Other tensors (activations, lrnnx's own buffers) take ``numpy()``, cheaper by ~1.5 us a
    call."""
    source = t if source is None else source
    owner = source if source._base is None else source._base
    if owner.is_leaf and owner.requires_grad and t.untyped_storage().resizable():
        import numpy

        if t.dtype not in _TYPESTR:  # no kernel takes it (and none writes it)
            return numpy.from_dlpack(t)
        if t.numel() == 0:  # no memory to share (its address may be 0)
            return numpy.empty(t.shape, _TYPESTR[t.dtype])
        return numpy.asarray(_Memory(t))
    return t.numpy()


def as_array(t: Tensor):
    """A CPU tensor as a contiguous numpy array (sharing its memory when it is contiguous and
    carries no conjugate or negative bit; see :func:`shared_array`)."""
    return shared_array(_resolved(t).contiguous(), t)


def flat_view(X: Tensor) -> tuple:
    """X's elements as a flat 1-D numpy view starting at its first element, and its strides
    (elements): kernels index it themselves, so any memory order (a transposed view, a slice of
    a wider tensor, a stride-0 expansion) is read where it lies."""
    source, X = X, _resolved(X)
    span = 1 + sum((size - 1) * stride for size, stride in zip(X.shape, X.stride(), strict=True))
    flat = torch.as_strided(X, (span,), (1,), X.storage_offset())
    return shared_array(flat, source), X.stride()


def as_planes(t: Tensor) -> tuple:
    """A complex CPU tensor's real and imaginary planes as contiguous numpy arrays."""
    return as_array(t.real), as_array(t.imag)


def compile_mode() -> str:
    """``LRNNX_NUMBA_COMPILE``: "background" (default) or "wait" (see the module docstring).

    Raises:
        ValueError: the variable holds anything else.
    """
    return _env_choice(COMPILE_ENV, COMPILE_MODES)


# ------------------------------------------------------------------------------ the notice


def _say(message: str) -> None:
    """INFO on the ``lrnnx.ops`` logger; one stderr line when logging is not configured."""
    if logger.hasHandlers():
        logger.info(message)
    else:
        print(message, file=sys.stderr, flush=True)


def announce_compilation(where: str, background: bool = False) -> None:
    """Say once per process that the fused CPU kernels are being compiled into ``where`` (the
    first call would otherwise stall, or run slower, for seconds without a word)."""
    global _ANNOUNCED
    if _ANNOUNCED:
        return
    _ANNOUNCED = True
    if background:
        _say(
            "lrnnx: compiling the fused CPU kernels in a background process (first use; cached "
            f"in {where}, later runs load them); calls run on the pure-torch backend until they "
            f"are ready ({COMPILE_ENV}=wait compiles them in this process instead)"
        )
    else:
        _say(
            f"lrnnx: compiling the fused CPU kernels (first use; cached in {where}, later runs "
            "load them)"
        )


def _cache_dir(dispatcher) -> str:
    try:
        return str(dispatcher._cache.cache_path)
    except AttributeError:  # a numba version without this attribute, or caching off
        return "numba's cache directory"


if HAVE_NUMBA:
    from numba.core import event as _event

    class _CompileListener(_event.Listener):
        """Fires when numba compiles (not when it loads from its cache) an lrnnx kernel."""

        def on_start(self, event) -> None:
            dispatcher = (event.data or {}).get("dispatcher")
            module = getattr(getattr(dispatcher, "py_func", None), "__module__", "") or ""
            if not module.startswith(KERNEL_PACKAGE):
                return
            if _IN_WORKER:  # tell the parent process, which says it (see _Job._read)
                print(f"compiling\t{_cache_dir(dispatcher)}", flush=True)
            else:
                announce_compilation(_cache_dir(dispatcher))

        def on_end(self, event) -> None:
            pass

    _event.register("numba:compile", _CompileListener())


# ------------------------------------------------------------------- background compilation


def variant_key(args: tuple, kwargs: dict) -> tuple[str, ...]:
    """What selects a call's kernels: the distinct floating and complex dtypes of its tensors,
    e.g. ("complex64", "float32"), sorted."""
    names = {
        str(a.dtype).removeprefix("torch.")
        for a in (*args, *kwargs.values())
        if isinstance(a, Tensor) and (a.is_floating_point() or a.is_complex())
    }
    return tuple(sorted(names))


def _kernel_cache_dir(module) -> Optional[Path]:
    """numba's cache directory for ``module``'s kernels (honours NUMBA_CACHE_DIR and numba's
    fallback for a read-only install), or None when it has none."""
    for f in vars(module).values():
        if hasattr(f, "py_func") and getattr(f, "_cache", None) is not None:
            try:
                return Path(f._cache.cache_path)
            except AttributeError:
                return None
    return None


def _host_cpu() -> tuple:
    """The CPU numba compiles for (its cache keys on it too)."""
    import llvmlite.binding as ll

    name = numba.config.CPU_NAME or ll.get_host_cpu_name()
    return name, numba.config.CPU_FEATURES or ll.get_host_cpu_features().flatten()


def _marker(module, key: tuple[str, ...]) -> Optional[Path]:
    """The file the compile process leaves in the cache directory once every kernel a call of
    variant ``key`` needs is cached.  Its name changes with whatever invalidates numba's cache
    (the source file, numba, Python, the CPU), so an old marker never claims new kernels."""
    folder = _kernel_cache_dir(module)
    # the module's own source and those of the kernels it calls from other modules
    files = [module.__file__, *(m.__file__ for m in getattr(module, "KERNEL_MODULES", ()))]
    try:
        sources = [(st.st_mtime_ns, st.st_size) for st in map(os.stat, files)]
    except (OSError, TypeError):  # no source file (a frozen app): numba caches nothing either
        return None
    if folder is None:
        return None
    stamp = repr((sources, numba.__version__, sys.version, _host_cpu()))
    digest = hashlib.sha256(stamp.encode()).hexdigest()[:16]
    return folder / f"lrnnx-ready-{module.__name__}-{'-'.join(key)}-{digest}"


class _Job:
    """One background compile process for (module, key), started by this process."""

    def __init__(self, module, key: tuple[str, ...], replay: Optional[str] = None):
        """``replay``: a file holding a call (see :func:`_save_call`) for the child to run, for
        a module without ``warm_up``."""
        self.pid = os.getpid()  # a forked child of this process must not poll it
        self.failed = False
        self.replay = replay
        self.stderr = tempfile.TemporaryFile()
        env = dict(os.environ, **{COMPILE_ENV: "wait", "OMP_NUM_THREADS": "1"})
        # the child imports lrnnx from where this process did (a source checkout included)
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        code = "from lrnnx.ops._numba import _worker_main; _worker_main()"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, module.__name__, replay or "-", *key],
            stdin=subprocess.PIPE,  # the child exits when this pipe closes (we exited)
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            env=env,
        )
        _JOBS.append(self)
        threading.Thread(target=self._read, daemon=True, name="lrnnx-compile-notice").start()

    def _read(self) -> None:
        """The child's notices: it says when it compiles (not when it only loads)."""
        for line in self.proc.stdout:
            kind, _, where = line.decode(errors="replace").rstrip("\n").partition("\t")
            if kind == "compiling":
                announce_compilation(where, background=True)

    def done(self) -> bool:
        """Whether the kernels are cached now; warns once if the process failed."""
        rc = self.proc.poll()
        if rc is None or self.failed:
            return False
        self.stop()  # removes the replay file
        if rc == 0:
            return True
        self.failed = True
        self.stderr.seek(0)
        tail = self.stderr.read().decode(errors="replace").strip().splitlines()[-5:]
        warnings.warn(
            f"lrnnx: compiling the fused CPU kernels in a background process failed (exit code "
            f"{rc}: {' | '.join(tail) or 'no message'}); calls stay on the pure-torch backend. "
            f"{COMPILE_ENV}=wait compiles them in this process instead",
            RuntimeWarning,
            stacklevel=user_stacklevel(),
        )
        return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.replay:
            Path(self.replay).unlink(missing_ok=True)


_JOBS: list = []
_READY: Dict[tuple, object] = {}  # (module name, key) -> True, or the _Job compiling it
_STATE_LOCK = threading.Lock()


@atexit.register
def _stop_jobs() -> None:
    """No compile process outlives this one (what it compiled so far stays cached)."""
    for job in _own_jobs():
        job.stop()


def _own_jobs() -> list:
    return [job for job in _JOBS if job.pid == os.getpid()]


def compiling() -> bool:
    """Whether a background process started by this one is still compiling kernels."""
    return any(job.proc.poll() is None for job in _own_jobs())


def wait_for_background(timeout: Optional[float] = None) -> bool:
    """Wait until the background compile processes started by this one have finished (at most
    ``timeout`` seconds); True when all of them succeeded, so later calls run the fused kernels.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        for job in _own_jobs():
            job.proc.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        return False
    return all(job.proc.returncode == 0 for job in _own_jobs())


#: a call without a ``warm_up`` recipe is replayed only up to this size (its tensors are
#: written to a file); a larger one compiles in this process
REPLAY_MAX_BYTES = 1 << 28


def _save_call(fn: Callable, args: tuple, kwargs: dict) -> Optional[str]:
    """Write ``fn``'s name and a copy of its arguments (same strides and ``requires_grad``, so
    numba sees the same types) to a temporary file; None when they are too large."""
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
    if sum(t.numel() * t.element_size() for t in tensors) > REPLAY_MAX_BYTES:
        return None

    def copy(a):
        if not isinstance(a, Tensor):
            return a
        return a.detach().clone().requires_grad_(a.requires_grad)

    fd, path = tempfile.mkstemp(prefix="lrnnx-replay-", suffix=".pt")
    with os.fdopen(fd, "wb") as f:
        torch.save(
            (fn.__name__, [copy(a) for a in args], {k: copy(v) for k, v in kwargs.items()}), f
        )
    return path


def _replay(module, path: str) -> None:
    """Run the call :func:`_save_call` wrote, forward and backward (gradients as in training:
    dense, one per output that needs one)."""
    name, args, kwargs = torch.load(path, weights_only=True)
    out = getattr(module, name)(*args, **kwargs)
    outs = [o for o in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(o, Tensor)]
    outs = [o for o in outs if o.requires_grad]
    if outs:
        torch.autograd.backward(outs, [torch.randn_like(o) for o in outs])


def kernels_ready(module, key: tuple[str, ...], call: Optional[tuple] = None) -> bool:
    """Whether a call of variant ``key`` can run ``module``'s kernels without compiling here;
    if not, makes sure a background process is compiling them: by ``module.warm_up``, else by
    replaying ``call`` = (function, args, kwargs) there."""
    state = _READY.get((module.__name__, key))
    if state is True:
        return True
    with _STATE_LOCK:
        state = _READY.get((module.__name__, key))
        if isinstance(state, _Job) and state.pid == os.getpid():
            ready = state.done()
        else:
            marker = _marker(module, key)
            ready = marker is None or marker.exists()  # no cache at all: nothing to wait for
            if not ready and compiling():  # one compile process at a time: each takes a core
                return False
            if not ready:
                replay = None if hasattr(module, "warm_up") or call is None else _save_call(*call)
                if replay is None and not hasattr(module, "warm_up"):
                    return True  # too large to hand over: compile here, at this call
                _READY[(module.__name__, key)] = _Job(module, key, replay)
        if ready:
            _READY[(module.__name__, key)] = True
        return ready


#: whether "wait" mode compiles a variant's whole kernel set and marks it ready (see
#: :func:`compile_here`); off by default: a process that only runs some kernels (a test suite)
#: then compiles only those
MARK_WAIT_COMPILES = False


def compile_here(module, key: tuple[str, ...]) -> None:
    """ "wait" mode, at a variant's first call in this process: compile (or load) its kernels
    here as the background process would (``module.warm_up``) and leave the same marker, so
    that a later process in "background" mode finds them ready instead of starting a compile
    process, which a machine kept busy by training can starve for minutes (``lrnnx train``
    compiles this way).  Modules without ``warm_up`` compile at the call itself, unmarked."""
    if not MARK_WAIT_COMPILES or _READY.get((module.__name__, key)) is True:
        return
    _READY[(module.__name__, key)] = True  # once per process; warm_up's own calls run as is
    if not hasattr(module, "warm_up") or torch.compiler.is_compiling():
        return
    marker = _marker(module, key)
    if marker is None or marker.exists():
        return
    # tiny inputs, forward and backward, whatever context the first call came in
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast("cpu", enabled=False):
        _warm_up(module, key)
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        _write_marker(marker)
    except OSError:  # a read-only cache folder: numba's own cache still holds the kernels
        pass


def _warm_up(module, key: tuple[str, ...]) -> None:
    """Compile (or load) the kernels of variant ``key`` (dtype names) by ``module.warm_up``."""
    module.warm_up(tuple(getattr(torch, name) for name in key))


def _write_marker(marker: Path) -> None:
    """Leave ``marker`` atomically: a reader sees no marker or a whole one."""
    tmp = marker.parent / f"{marker.name}.{os.getpid()}.tmp"
    tmp.write_bytes(b"")
    os.replace(tmp, marker)


def deferred(module, fused: Callable, fallback: Callable) -> Callable:
    """``fused`` (a numba backend's function) that, in "background" mode, runs ``fallback`` (the
    pure-torch backend, same arguments) while the kernels the call needs compile elsewhere.

    The background process runs ``module.warm_up(dtypes)`` when the module defines it (every
    kernel a call with tensors of those dtypes runs, forward and backward, on tiny inputs);
    otherwise it replays the first call of each variant on a copy of its arguments."""

    def call(*args, **kwargs):
        mode = compile_mode()
        if mode == "background" and not kernels_ready(
            module, variant_key(args, kwargs), (fused, args, kwargs)
        ):
            return fallback(*args, **kwargs)
        if mode == "wait":
            compile_here(module, variant_key(args, kwargs))
        return fused(*args, **kwargs)

    call.__wrapped__ = fused  # inspect.unwrap finds the backend's own function
    call.__name__ = getattr(fused, "__name__", "call")
    call.__doc__ = fused.__doc__
    return call


def _watch_parent() -> None:
    """End this process when the pipe from its parent closes: the parent has exited."""
    while os.read(0, 4096):  # unbuffered: no lock left held at interpreter shutdown
        pass
    os._exit(3)


def _yield_cpu() -> None:
    """Run only on CPU time the user's processes leave idle (Linux SCHED_IDLE, else the lowest
    nice): at any higher share, a torch process using every core waits for its preempted thread
    at each parallel region, and its steps took several times longer."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        if hasattr(os, "nice"):
            os.nice(19)


def _worker_main() -> None:
    """The background compile process: ``<module> <replay file or -> <dtype>...`` on the
    command line.

    Takes the cache directory's lock, then runs the module's ``warm_up`` or replays the call
    (numba compiles what is missing and loads the rest) and leaves the marker
    :func:`kernels_ready` looks for."""
    global _IN_WORKER
    _IN_WORKER = True
    threading.Thread(target=_watch_parent, daemon=True).start()
    _yield_cpu()
    torch.set_num_threads(1)
    import importlib

    module = importlib.import_module(sys.argv[1])
    replay = None if sys.argv[2] == "-" else sys.argv[2]
    key = tuple(sys.argv[3:])
    marker = _marker(module, key)
    if marker is None:  # no cache directory: nothing would outlive this process
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    with open(marker.parent / "lrnnx-compile.lock", "a+b") as lock:
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)  # one compiler per cache directory at a time
        except ImportError:  # no fcntl (Windows): concurrent compiles only repeat work
            pass
        if marker.exists():  # another process compiled them while this one waited
            return
        if replay is not None:
            _replay(module, replay)
        else:
            _warm_up(module, key)
        _write_marker(marker)

"""Small work without overhead (issue #11): which path a call of a given size takes (serial or
parallel, fused kernel or torch), thread counts (numba's never above torch's, restored after),
single-token steps that never reach the ops' dispatch, results against independent references,
and the structure of :mod:`lrnnx.bench_small`'s rows."""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager

import pytest
import torch

from _tol import assert_close_rel
from lrnnx.ops import _dispatch, _numba, linear_scan
from lrnnx.ops.causal_conv1d import causal_conv1d

CPU = torch.device("cpu")
needs_numba = pytest.mark.skipif(not _numba.HAVE_NUMBA, reason="numba is not installed")


@contextmanager
def torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------ thread counts


def test_small_work_is_serial_and_large_work_follows_torch():
    with torch_threads(2):
        assert _numba.threads_for(_numba.SERIAL_WORK - 1) == 1
        assert _numba.threads_for(_numba.SERIAL_WORK) == 2
    with torch_threads(1):
        assert _numba.threads_for(1 << 30) == 1


@pytest.fixture(params=["openmp", "pool"])
def kernel_threads_from(request, monkeypatch):
    """run_on_threads on torch's OpenMP threads (where this build has them) or on lrnnx's
    Python thread pool (LRNNX_KERNEL_THREADS=pool, and every platform without the former)."""
    _numba._find_openmp.cache_clear()  # (a test run before may have cached the pool's None)
    if request.param == "pool":
        monkeypatch.setenv(_numba.THREADS_ENV, "pool")
    elif _numba._find_openmp(os.getpid()) is None:
        pytest.skip("torch does not run on an OpenMP runtime with the GNU entry points here")
    _numba._find_openmp.cache_clear()
    yield request.param
    _numba._find_openmp.cache_clear()


def test_kernel_threads_variable_is_checked(monkeypatch):
    monkeypatch.setenv(_numba.THREADS_ENV, " Pool ")
    assert _numba.kernel_threads_mode() == "pool"
    monkeypatch.setenv(_numba.THREADS_ENV, "")
    assert _numba.kernel_threads_mode() == "openmp"
    monkeypatch.setenv(_numba.THREADS_ENV, "gomp")
    with pytest.raises(ValueError, match=r"LRNNX_KERNEL_THREADS: expected one of .*'gomp'"):
        _numba.kernel_threads_mode()


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_run_on_threads_runs_every_share_once_at_the_same_time(kernel_threads_from, threads):
    """Shares 0..n-1 each run once, on n distinct threads that are all inside at once (a
    barrier that every share must reach), share 0 on the calling thread."""
    seen: list = []
    barrier = threading.Barrier(threads)
    lock = threading.Lock()

    def fn(i: int, n: int) -> None:
        barrier.wait(timeout=20)  # all n shares run at once
        with lock:
            seen.append((i, n, threading.get_native_id()))

    with torch_threads(max(threads, 1)):
        _numba.run_on_threads(fn, threads)
    assert sorted(i for i, _, _ in seen) == list(range(threads))
    assert {n for _, n, _ in seen} == {threads}
    assert len({tid for _, _, tid in seen}) == threads
    assert dict((i, tid) for i, _, tid in seen)[0] == threading.get_native_id()
    openmp = _numba._find_openmp(os.getpid())
    assert (openmp is not None) == (kernel_threads_from == "openmp")


def test_run_on_threads_raises_a_share_s_error_after_all_finish(kernel_threads_from):
    done = []

    def fn(i: int, n: int) -> None:
        if i == 1:
            raise KeyError("share 1")
        time.sleep(0.05)
        done.append(i)

    with torch_threads(2), pytest.raises(KeyError, match="share 1"):
        _numba.run_on_threads(fn, 2)
    assert done == [0]


def test_run_on_threads_keeps_nothing_alive(kernel_threads_from):
    """What a call's work references is freed when it returns, without the garbage collector
    (a reference cycle per call once kept each call's arrays until the next collection)."""
    import gc
    import weakref

    class Big:
        pass

    gc.disable()
    try:
        big = Big()
        ref = weakref.ref(big)
        with torch_threads(2):
            _numba.run_on_threads(lambda i, n, big=big: None, 2)
        del big
        assert ref() is None
    finally:
        gc.enable()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_forked_child_runs_kernels_on_a_pool():
    """GNU libgomp does not support fork: a child runs its kernels on lrnnx's thread pool,
    with the right results (a linear scan above SERIAL_WORK, on two threads)."""
    import multiprocessing as mp

    a, b = torch.rand(1, 300, 512), torch.randn(1, 300, 512)
    expected = linear_scan(a, b, backend="reference")
    ctx = mp.get_context("fork")
    with ctx.Pool(1) as pool:
        forked, got = pool.apply(_child_scan, (a, b))
    assert forked
    assert_close_rel(torch.from_numpy(got), expected, length=300)


def _child_scan(a, b):
    """In the forked child: no torch op of parallel size (torch's own OpenMP team is not
    there either); the result goes back as a numpy array (a tensor would go through torch's
    shared-memory file descriptors)."""
    with torch_threads(2):
        out = linear_scan(a, b, backend="cpu")
    return _numba._find_openmp(os.getpid()) is None, out.numpy()


@needs_numba
def test_fused_kernels_on_either_threads_agree(kernel_threads_from):
    """The selective scan (forward and backward) and the causal convolution, split over two
    threads, equal the float64 torch backend whichever threads run them."""
    from lrnnx.ops import selective_scan_fn

    gen = torch.Generator().manual_seed(0)
    b, d, n, L = 4, 64, 16, 128  # above SERIAL_WORK: two threads
    u, delta, z = (torch.randn(b, d, L, generator=gen) for _ in range(3))
    A = -torch.rand(d, n, generator=gen) - 0.5
    B, C = (torch.randn(b, 1, n, L, generator=gen) for _ in range(2))
    x, w = torch.randn(b, 2 * d, L, generator=gen), torch.randn(2 * d, 4, generator=gen)
    out = {}
    for backend, cast in (("cpu", lambda t: t), ("torch", lambda t: t.double())):
        leaves = [cast(t).detach().requires_grad_() for t in (u, delta, A, B, C, z)]
        xs = cast(x).detach().requires_grad_()
        with torch_threads(2):
            y = selective_scan_fn(*leaves[:5], z=leaves[5], delta_softplus=True, backend=backend)
            yc = causal_conv1d(xs, cast(w), activation="silu", backend=backend)
            (y.sum() + (yc * yc).sum()).backward()
            assert _numba.threads_for(x.numel()) == 2
        out[backend] = [y, yc, xs.grad] + [t.grad for t in leaves]
    for got, ref in zip(out["cpu"], out["torch"], strict=True):
        assert_close_rel(got, ref, length=L, factor=10.0)


def test_kernel_pool_threads_run_serial():
    """A kernel called from a thread of lrnnx's own pools must not start a nested pool."""
    seen = []
    t = threading.Thread(target=lambda: seen.append(_numba.threads_for(1 << 30)), name="lrnnx-x")
    with torch_threads(2):
        t.start()
        t.join()
    assert seen == [1]


_FIRST_KERNEL = """
import torch
from lrnnx.ops import linear_scan
torch.set_num_threads(1)
torch.get_num_threads()  # torch's lazy thread setup done, as after any first op
linear_scan(torch.rand(1, 8, 4), torch.randn(1, 8, 4))  # the process's first numba kernel
print(torch.get_num_threads())
"""


@needs_numba
def test_first_kernel_keeps_the_torch_thread_count_the_user_set():
    """numba's OpenMP layer, starting, sets the OpenMP thread count to NUMBA_NUM_THREADS (2
    here), which can be torch's (the same libgomp): the user's torch.set_num_threads(1) must
    survive it (it did not: torch ran its ops on 2 threads after lrnnx's first kernel)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, NUMBA_NUM_THREADS="2")
    env.pop("OMP_NUM_THREADS", None)
    out = subprocess.run(
        [sys.executable, "-c", _FIRST_KERNEL], env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "1"


@needs_numba
@pytest.mark.parametrize("L, serial", [(8, True), (1024, False)])
def test_default_linear_scan_runs_numba_serial_for_small_work(monkeypatch, L, serial):
    """The scan kernel's tasks run on one thread (the caller) for small work and split over
    torch's thread count for large work; numba's own threading layer is never started."""
    import importlib

    import numba

    monkeypatch.delenv("LRNNX_BACKEND", raising=False)
    mod = importlib.import_module("lrnnx.ops.linear_scan.cpu")
    _dispatch.resolve("linear_scan", CPU)
    kernel, seen = mod._scan, []

    def spy(first, stride, *args):
        seen.append((first, stride, threading.get_native_id()))
        return kernel(first, stride, *args)

    monkeypatch.setattr(mod, "_scan", spy)
    with torch_threads(2), torch.no_grad():
        linear_scan(torch.rand(1, L, 512), torch.randn(1, L, 512))  # two tasks of 256 channels
    if serial:
        assert seen == [(0, 1, threading.get_native_id())]
    else:
        assert sorted(s[:2] for s in seen) == [(0, 2), (1, 2)]
    assert not numba.np.ufunc.parallel._is_initialized  # no numba thread pool beside torch's


def test_causal_conv1d_runs_small_work_on_the_calling_thread(monkeypatch):
    from lrnnx.ops.causal_conv1d import cpu

    calls = []

    def kernel(r0, r1):
        calls.append((threading.current_thread() is threading.main_thread(), r0, r1))

    with torch_threads(2):
        cpu._run(kernel, 8, 16)  # 128 elements
        assert calls == [(True, 0, 8)]
        calls.clear()
        monkeypatch.setattr(cpu, "SERIAL_WORK", 0)
        cpu._run(kernel, 8, 16)
    assert sorted((r0, r1) for _, r0, r1 in calls)[0][0] == 0 and len(calls) > 1
    assert sum(r1 - r0 for _, r0, r1 in calls) == 8  # every row once
    with torch_threads(1):
        calls.clear()
        cpu._run(kernel, 8, 16)
    assert calls == [(True, 0, 8)]


# ------------------------------------------------------------------------ kernel or torch path


def _scan_args(L: int, C: int = 16):
    return (torch.rand(1, L, C), torch.randn(1, L, C), None, False)


@needs_numba
@pytest.mark.parametrize("L, expected", [(1, "torch"), (2, "torch"), (4, "cpu"), (64, "cpu")])
def test_linear_scan_path_per_size(monkeypatch, L, expected):
    monkeypatch.delenv("LRNNX_BACKEND", raising=False)
    assert _dispatch.call_backend("linear_scan", CPU, _scan_args(L)) == expected


@needs_numba
def test_a_backend_asked_for_by_name_runs_whatever_the_size(monkeypatch):
    monkeypatch.delenv("LRNNX_BACKEND", raising=False)
    assert _dispatch.call_backend("linear_scan", CPU, _scan_args(1), backend="cpu") == "cpu"
    monkeypatch.setenv("LRNNX_BACKEND", "cpu")
    assert _dispatch.call_backend("linear_scan", CPU, _scan_args(1)) == "cpu"


@needs_numba
@pytest.mark.parametrize("op", ["selective_scan", "causal_conv1d"])
def test_other_fused_ops_keep_their_kernels_at_one_step(monkeypatch, op):
    monkeypatch.delenv("LRNNX_BACKEND", raising=False)
    import lrnnx.ops.causal_conv1d  # noqa: F401  (registers the op)
    import lrnnx.ops.selective_scan  # noqa: F401

    x = torch.randn(1, 8, 1)
    assert _dispatch.call_backend(op, CPU, (x, x)) == "cpu"


def _scan_loop(a, b):
    """h_t = a_t h_{t-1} + b_t in float64, step by step (the recurrence as written)."""
    a, b = a.double(), b.double()
    h, out = torch.zeros_like(b[:, 0]), []
    for t in range(b.shape[1]):
        h = a[:, t] * h + b[:, t]
        out.append(h)
    return torch.stack(out, 1)


@pytest.mark.parametrize("L", [1, 2, 4, 64])
def test_small_linear_scan_matches_the_recurrence(monkeypatch, L):
    monkeypatch.delenv("LRNNX_BACKEND", raising=False)
    a = torch.rand(2, L, 16, requires_grad=True)
    b = torch.randn(2, L, 16, requires_grad=True)
    h = linear_scan(a, b)
    assert_close_rel(h, _scan_loop(a, b).float(), length=L, msg="h")
    g = torch.randn_like(h)
    ga, gb = torch.autograd.grad(h, (a, b), g)
    a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    ea, eb = torch.autograd.grad(_scan_loop(a64, b64), (a64, b64), g.double())
    assert_close_rel(ga, ea.float(), length=L, msg="da")
    assert_close_rel(gb, eb.float(), length=L, msg="db")


@pytest.mark.parametrize("L", [1, 4, 64])
def test_small_causal_conv1d_matches_the_reference(monkeypatch, L):
    monkeypatch.delenv("LRNNX_BACKEND", raising=False)
    x, w, bias = torch.randn(1, 8, L), torch.randn(8, 4), torch.randn(8)
    y = causal_conv1d(x, w, bias, activation="silu")
    ref = causal_conv1d(x.double(), w.double(), bias.double(), activation="silu",
                        backend="reference")  # fmt: skip
    assert_close_rel(y, ref.float(), length=4, msg="y")


# ----------------------------------------------------------------------------- decoding steps


@pytest.mark.parametrize("name", ["mamba", "s5", "s4d", "lru"])
def test_a_step_never_reaches_the_ops_dispatch(monkeypatch, name):
    """One token: plain tensor ops, no scan kernel (not even a serial one) and no dispatch."""
    from lrnnx.models.registry import build_mixer

    model = build_mixer(name, 16, 4).eval()
    cache = model.allocate_inference_cache(2, 8)
    x = torch.randn(2, 16)
    model.step(x, cache)  # first step: lazily prepared buffers

    def forbidden(*args, **kwargs):
        raise AssertionError(f"step dispatched an op: {args[:1]}")

    monkeypatch.setattr(_dispatch, "select", forbidden)
    with torch.no_grad():
        y, _ = model.step(x, cache)
    assert y.shape == (2, 16) and torch.isfinite(y).all()


def _tiny_lm(mixer: str = "s5"):
    from lrnnx.architectures.lm import LRNNLMHeadModel

    return LRNNLMHeadModel(d_model=16, d_state=4, n_layer=2, vocab_size=32, mixer_types=mixer)


def test_decode_threads_per_size():
    from lrnnx.utils import generation

    lm = _tiny_lm()
    with torch_threads(2):
        assert generation.decode_threads(lm, 1, CPU) == 1
        huge = generation.DECODE_SERIAL_WORK  # batch x parameters above the bound
        assert generation.decode_threads(lm, huge, CPU) == 2
        assert generation.decode_threads(lm, 1, torch.device("meta")) == 2


def test_generate_decodes_small_models_on_one_thread_and_restores_torch_threads():
    """The tokens equal a greedy loop of forward passes over the whole sequence (no cache), the
    decoding steps run on one torch thread, and torch's count is as before afterwards."""
    from lrnnx.utils.generation import generate

    lm = _tiny_lm().eval()
    seen = []
    step = lm.step

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return step(*args, **kwargs)

    lm.step = spy
    prompt = torch.randint(0, 32, (1, 5))
    with torch_threads(2):
        out = generate(lm, prompt, 6)
        assert torch.get_num_threads() == 2
    assert seen and set(seen) == {1}
    ids = prompt
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat([ids, lm(ids)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ids)


# -------------------------------------------------------------------------------- bench rows


def test_bench_small_rows():
    from lrnnx import bench_small

    rows = bench_small.bench_small(["s5"], repeats=1, lengths=(1, 2))
    assert [(r.case, r.busy) for r in rows] == [
        ("forward", False), ("forward", False), ("lm step", False), ("generate", False)
    ]  # fmt: skip
    assert "L=1 " in rows[0].shape and "L=2 " in rows[1].shape
    for r in rows:
        assert r.model == "s5" and r.default_us > 0 and r.torch_us > 0
        assert r.ratio == pytest.approx(r.default_us / r.torch_us)
    md = bench_small.markdown(rows, "title")
    assert md.startswith("title") and md.count("\n| ") == len(rows) + 1


def test_train_rows_time_each_mixer_against_s4d():
    from lrnnx import bench_small

    rows = bench_small.train_rows(["lru"], repeats=2, batch=4, seq_len=20)
    assert [r.model for r in rows] == ["lru", "s4d"]
    assert rows[1].ratio == 1.0 and rows[0].step_ms > 0
    assert rows[0].ratio == pytest.approx(rows[0].step_ms / rows[1].step_ms)
    assert "B=4 L=20 d_model=64 layers=2" == rows[0].shape
    assert rows[1].params_ratio == 1.0 and rows[0].params > 0
    assert rows[0].params_ratio == pytest.approx(rows[0].params / rows[1].params)
    md = bench_small.train_markdown(rows)
    assert md.count("\n| ") == len(rows) + 1 and "| lru |" in md


def test_busy_machine_runs_a_process_for_the_block_only():
    from lrnnx import bench_small

    with bench_small.busy_machine(threads=1) as proc:
        assert proc.poll() is None
    assert proc.returncode is not None


@pytest.mark.parametrize("every", [2, 4, 8])
def test_generate_reading_eos_every_few_tokens_gives_the_eager_result(monkeypatch, every):
    """On an accelerator generate reads "all finished?" every few tokens (a host sync): the
    sequences, scores and count equal those of the per-token check on the CPU."""
    from lrnnx.utils import generation

    lm = _tiny_lm("lru").eval()
    prompt = torch.randint(0, 32, (2, 4))
    free = generation.generate(lm, prompt, 10)
    eos = [int(free[0, 6]), int(free[1, 8])]  # each row finishes by its 3rd or 5th new token
    kwargs = dict(eos_token_id=eos, pad_token_id=0, output_scores=True)
    eager = generation.generate(lm, prompt, 10, **kwargs)
    monkeypatch.setattr(generation, "eos_check_every", lambda device: every)
    lazy = generation.generate(lm, prompt, 10, **kwargs)
    assert eager.num_new_tokens <= 5
    assert torch.equal(lazy.sequences, eager.sequences)
    assert lazy.num_new_tokens == eager.num_new_tokens == len(lazy.scores)
    assert torch.equal(lazy.finished, eager.finished)
    for a, e in zip(lazy.scores, eager.scores, strict=True):
        assert torch.equal(a, e)  # the same model on the same inputs in one process


def _cauchy_args(H: int, N: int, K: int):
    """S4's call: stable poles w (negative real parts), points a = 1 - z, b = (1 + z) / 2 at K
    roots of unity z (a kernel of length 2K - 2)."""
    v = torch.randn(2, H, N, dtype=torch.complex64)
    w = torch.complex(-0.5 * torch.rand(H, N) - 0.1, torch.randn(H, N))
    z = torch.polar(torch.ones(K), -torch.pi * torch.arange(K) / max(K - 1, 1))
    return (v, w, 1 - z, (1 + z) / 2, None)


@needs_numba
@pytest.mark.parametrize(
    "H, N, K, expected",
    [(64, 16, 1, "torch"), (64, 16, 33, "torch"), (64, 16, 65, "cpu"), (256, 16, 1025, "cpu")],
)
def test_cauchy_path_per_matrix_size(monkeypatch, H, N, K, expected):
    """S4's small layers (B=1, L <= 64: K = L/2 + 1 points) take the torch backend; from a
    Cauchy matrix of 2**16 entries on, the fused kernels."""
    monkeypatch.delenv("LRNNX_BACKEND", raising=False)
    import lrnnx.ops.cauchy  # noqa: F401  (registers the op)

    assert _dispatch.call_backend("cauchy", CPU, _cauchy_args(H, N, K)) == expected
    by_name = _dispatch.call_backend("cauchy", CPU, _cauchy_args(H, N, K), backend="cpu")
    assert by_name == "cpu"


@needs_numba
@pytest.mark.parametrize("K", [1, 33, 65])
def test_small_cauchy_matches_the_reference(monkeypatch, K):
    """Whichever path a size takes, the product and its gradients are the reference's."""
    monkeypatch.delenv("LRNNX_BACKEND", raising=False)
    from lrnnx.ops import cauchy

    v, w, a, b, _ = _cauchy_args(64, 8, K)
    v.requires_grad_()
    w.requires_grad_()
    out = cauchy(v, w, a, b)
    ref = cauchy(v.detach().cdouble(), w.detach().cdouble(), a.cdouble(), b.cdouble(),
                 backend="reference")  # fmt: skip
    assert_close_rel(out, ref.to(out.dtype), length=16, msg="out")
    g = torch.randn_like(out)
    dv, dw = torch.autograd.grad(out, (v, w), g)
    v64, w64 = v.detach().cdouble().requires_grad_(), w.detach().cdouble().requires_grad_()
    ref = cauchy(v64, w64, a.cdouble(), b.cdouble(), backend="reference")
    ev, ew = torch.autograd.grad(ref, (v64, w64), g.cdouble())
    assert_close_rel(dv, ev.to(dv.dtype), length=16, msg="dv")
    assert_close_rel(dw, ew.to(dw.dtype), length=16, msg="dw")


def test_the_kernel_pool_survives_threads_that_need_more_workers(monkeypatch):
    """Threads with different thread counts sharing lrnnx's pool: one that needs more workers
    replaces the pool, never between another's choice of the pool and its submits (which
    raised "cannot schedule new futures after shutdown")."""
    import sys

    monkeypatch.setenv("LRNNX_KERNEL_THREADS", "pool")
    # read once per process: without this the test ran on the OpenMP runtime an earlier test
    # found (the pool untouched), or later tests ran on the pool it found
    _numba._find_openmp.cache_clear()
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    errors = []

    def user(threads):
        for _ in range(100):
            try:
                _numba.run_on_threads(lambda i, n: None, threads)
            except Exception as e:  # noqa: BLE001 (any failure is the finding)
                errors.append(repr(e))
                return

    try:
        for _ in range(5):
            monkeypatch.setattr(_numba, "_POOL", None)
            workers = [threading.Thread(target=user, args=(2 + k,)) for k in range(6)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
    finally:
        sys.setswitchinterval(interval)
        _numba._find_openmp.cache_clear()
    assert not errors, errors[:1]
    assert _numba._POOL is not None  # the pool ran the calls

"""CUDA paths: the Triton kernels against the reference, and every model on the GPU against the CPU.

Skipped on machines without a GPU (CI); run them where one is present.
"""

import pytest
import torch

from lrnnx.ops import linear_scan

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _pair(shape, dtype, device="cuda"):
    a = torch.rand(shape, dtype=torch.float64) * 1.9 - 0.95
    if dtype.is_complex:
        a = a * torch.exp(1j * torch.rand(shape, dtype=torch.float64) * 6.28)
    return a.to(dtype).to(device), torch.randn(shape, dtype=dtype).to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("L", [1, 63, 64, 1000])
def test_triton_linear_scan_matches_reference(dtype, reverse, L):
    a, b = _pair((3, L, 5, 7), dtype)
    h0 = torch.randn(3, 5, 7, dtype=dtype, device="cuda")
    h, last = linear_scan(a, b, h0, reverse=reverse, return_final_state=True, backend="triton")
    ref = linear_scan(
        a.cpu().to(torch.complex128 if dtype.is_complex else torch.float64),
        b.cpu().to(torch.complex128 if dtype.is_complex else torch.float64),
        h0.cpu().to(torch.complex128 if dtype.is_complex else torch.float64),
        reverse=reverse,
        backend="reference",
    )
    assert torch.allclose(h.cpu().to(ref.dtype), ref, atol=1e-4, rtol=1e-4)
    assert torch.equal(last, h[:, 0] if reverse else h[:, -1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
def test_triton_linear_scan_gradients(dtype):
    a, b = _pair((2, 300, 33), dtype)
    h0 = torch.randn(2, 33, dtype=dtype, device="cuda")
    w = torch.randn(2, 300, 33, dtype=dtype, device="cuda")
    grads = {}
    for backend in ("triton", "reference"):
        args = [t.clone().requires_grad_() for t in (a, b, h0)]
        (linear_scan(*args, backend=backend) * w).real.sum().backward()
        grads[backend] = [t.grad for t in args]
    for x, y in zip(grads["triton"], grads["reference"], strict=True):
        assert torch.allclose(x, y, atol=1e-3, rtol=1e-3)


def test_dispatch_prefers_triton_on_cuda(monkeypatch):
    from lrnnx.ops import _dispatch

    monkeypatch.delenv("LRNNX_BACKEND", raising=False)
    assert _dispatch.select("linear_scan", torch.device("cuda"))[0] == "triton"


def _models():
    from lrnnx.models import lti, ltv

    return {
        "lru": lambda: lti.LRU(16, 16),
        "s5": lambda: lti.S5(16, 16, "zoh", conj_sym=True),
        "centaurus": lambda: lti.Centaurus(16, 16, 4, mode="neck"),
        "mamba": lambda: ltv.Mamba(16, d_state=8),
        "event-s5": lambda: ltv.S5(16, 16, "async"),
        "s7": lambda: ltv.S7(16, 16),
        "rglru": lambda: ltv.RGLRU(16),
    }


@pytest.mark.parametrize("name", list(_models()))
def test_model_on_gpu_matches_cpu(name):
    import copy

    model = _models()[name]()
    gpu = copy.deepcopy(model).cuda()
    x = torch.randn(2, 200, 16)
    y_cpu = model(x)
    y_gpu = gpu(x.cuda())
    y_cpu = y_cpu[0] if isinstance(y_cpu, tuple) else y_cpu
    y_gpu = y_gpu[0] if isinstance(y_gpu, tuple) else y_gpu
    assert torch.allclose(y_gpu.cpu(), y_cpu, atol=1e-4, rtol=1e-3)
    y_gpu.square().sum().backward()
    y_cpu.square().sum().backward()
    for (n, p), q in zip(model.named_parameters(), gpu.parameters(), strict=True):
        assert torch.allclose(q.grad.cpu(), p.grad, atol=1e-3, rtol=1e-2), n
    cache = gpu.allocate_inference_cache(2, 200)
    y_step = gpu.step(x[:, 0].cuda(), cache)[0]
    assert torch.allclose(y_step.reshape(2, 16).cpu(), y_cpu[:, 0], atol=1e-4)

"""lrnnx demo: build every model, check step-by-step == forward, then train a small S5 classifier.

Run with `make demo` (or `python examples/demo.py`). Takes about a minute on 2 CPU cores.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from lrnnx.models.lti import LRU, S5


def zoo(d_model: int = 32, d_state: int = 32) -> dict[str, nn.Module]:
    """Every model lrnnx ships, at a small reference size."""
    return {
        "LRU": LRU(d_model, d_state, r_min=0.5, r_max=0.99),
        "S5 (zoh)": S5(d_model, d_state, "zoh"),
        "S5 (bilinear, conj_sym)": S5(d_model, d_state, "bilinear", conj_sym=True),
        "S5 (dirac)": S5(d_model, d_state, "dirac"),
        "S5 (no_discretization)": S5(d_model, d_state, "no_discretization"),
    }


def check_models(L: int = 256) -> None:
    print(f"{'model':28s} {'params':>8s} {'forward ms':>11s} {'max|step - forward|':>20s}")
    x = torch.randn(2, L, 32)
    for name, model in zoo().items():
        with torch.no_grad():
            model(x)  # warm-up
            t0 = time.perf_counter()
            y = model(x)
            ms = (time.perf_counter() - t0) * 1e3
            cache = model.allocate_inference_cache(2)
            ys = torch.stack([model.step(x[:, t], cache)[0] for t in range(L)], 1)
        n = sum(p.numel() for p in model.parameters())
        print(f"{name:28s} {n:8d} {ms:11.2f} {float((ys - y).abs().max()):20.2e}")


class Classifier(nn.Module):
    """Linear encoder, residual S5 blocks with pre-norm, mean pooling, linear head."""

    def __init__(self, d_in: int, n_classes: int, d_model: int = 32, n_layers: int = 2):
        super().__init__()
        self.encoder = nn.Linear(d_in, d_model)
        self.norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(n_layers))
        self.ssms = nn.ModuleList(S5(d_model, 32, "zoh", conj_sym=True) for _ in range(n_layers))
        self.head = nn.Linear(d_model, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x)
        for norm, ssm in zip(self.norms, self.ssms, strict=True):
            h = h + nn.functional.gelu(ssm(norm(h)))
        return self.head(h.mean(1))


def pattern_task(n: int, L: int = 128, n_classes: int = 4, seed: int = 0):
    """Noise with one of ``n_classes`` fixed 8-step patterns hidden at a random position.

    The label is which pattern was hidden: solving it needs memory over the whole sequence.
    """
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randn(n_classes, 8, 1, generator=torch.Generator().manual_seed(1234)) * 2
    x = torch.randn(n, L, 1, generator=g) * 0.5
    y = torch.randint(0, n_classes, (n,), generator=g)
    pos = torch.randint(0, L - 8, (n,), generator=g)
    for i in range(n):
        x[i, pos[i] : pos[i] + 8] += patterns[y[i]]
    return x, y


def train_classifier(seconds: float = 30.0) -> float:
    torch.manual_seed(0)
    xtr, ytr = pattern_task(4096, seed=0)
    xte, yte = pattern_task(1024, seed=1)
    model = Classifier(1, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    start, step = time.perf_counter(), 0
    print(
        f"\nTraining an S5 classifier on a hidden-pattern task for ~{seconds:.0f} s (chance = 25%)"
    )
    while time.perf_counter() - start < seconds:
        idx = torch.randint(0, len(xtr), (64,))
        loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % 50 == 0:
            with torch.no_grad():
                acc = (model(xte).argmax(-1) == yte).float().mean().item()
            print(f"  step {step:4d}  loss {loss.item():.3f}  test accuracy {acc:6.1%}")
    with torch.no_grad():
        acc = (model(xte).argmax(-1) == yte).float().mean().item()
    print(f"final test accuracy {acc:.1%} after {step} steps")
    return acc


if __name__ == "__main__":
    check_models()
    train_classifier()

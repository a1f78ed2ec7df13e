"""Autoregressive generation for models with ``forward(ids, inference_cache=...)``,
``step(ids, cache)`` and ``allocate_inference_cache(batch_size, max_seqlen)`` (such as
:class:`lrnnx.architectures.LRNNLMHeadModel`).

The prompt is prefilled with ONE parallel forward that fills every layer's cache; decoding then
calls ``step`` once per new token.  On CUDA the decode step can be captured once in a CUDA graph
and replayed (every cache tensor is updated in place, so the graph's fixed addresses stay valid).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import torch
from torch import Tensor, nn


@dataclass
class GenerationOutput:
    """Result of :func:`generate`.

    Attributes:
        sequences: (B, L + n) prompt followed by the n generated tokens; after a sequence's
            ``eos_token_id`` its remaining positions hold ``pad_token_id``.  n is
            ``max_new_tokens`` unless every sequence finished earlier.
        tokens_per_s: generated tokens (B * n) per second of prefill + decode wall time.
        num_new_tokens: n.
        prefill_s, decode_s: wall time of the prompt's forward, and of the decoding loop.
        finished: (B,) bool, whether each sequence produced ``eos_token_id``.
        cuda_graph: whether decoding replayed a CUDA graph.
    """

    sequences: Tensor
    tokens_per_s: float
    num_new_tokens: int
    prefill_s: float
    decode_s: float
    finished: Tensor
    cuda_graph: bool


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Mask (to -inf) the logits outside the top-k and outside the nucleus of mass top_p.

    Args:
        logits: (B, V).
        top_k: keep the k largest logits per row (0: no limit).
        top_p: keep the smallest set of largest-probability tokens whose total probability is
            >= top_p (1.0: no limit); the most likely token is always kept.
    """
    out = logits
    V = logits.shape[-1]
    if 0 < top_k < V:
        idx = logits.topk(top_k, dim=-1).indices
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, idx, True)
        out = out.masked_fill(~keep, float("-inf"))
    if top_p < 1.0:
        probs, order = out.float().softmax(-1).sort(dim=-1, descending=True)
        before = probs.cumsum(-1) - probs  # mass of the strictly more likely tokens
        drop_sorted = before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def sample_logits(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Next tokens (B,) from logits (B, V): argmax if temperature == 0 or top_k == 1, else a
    sample from softmax(filter_logits(logits / temperature))."""
    if temperature == 0 or top_k == 1:
        return logits.argmax(-1)
    scaled = filter_logits(logits.float() / temperature, top_k, top_p)
    return torch.multinomial(scaled.softmax(-1), 1, generator=generator)[:, 0]


def _tensors(tree: Any, prefix: str = ""):
    """(path, tensor) for every tensor in a nested dict/list cache."""
    if isinstance(tree, Tensor):
        yield prefix, tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            yield from _tensors(v, f"{prefix}/{k}")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _tensors(v, f"{prefix}/{i}")


def _offsets(tree: Any, out: Optional[list] = None) -> list:
    """Every dict holding a "seqlen_offset", with its current value."""
    out = [] if out is None else out
    if isinstance(tree, dict):
        if "seqlen_offset" in tree:
            out.append((tree, tree["seqlen_offset"]))
        for v in tree.values():
            _offsets(v, out)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            _offsets(v, out)
    return out


class _GraphStep:
    """model.step captured in a CUDA graph; ``__call__(ids)`` replays it.

    Capture touches the cache only through warm-up runs, whose effects are undone (tensors
    restored in place, Python offsets reset).  Replays update the cache tensors in place but not
    the Python ``seqlen_offset`` counters: :meth:`finish` advances those afterwards.
    """

    def __init__(
        self, model: nn.Module, cache: Dict[Any, Any], batch_size: int, device: torch.device
    ) -> None:
        self.cache = cache
        self.offsets = _offsets(cache)
        saved = {p: t.clone() for p, t in _tensors(cache)}
        self.ids = torch.zeros(batch_size, dtype=torch.long, device=device)
        stream = torch.cuda.Stream(device=device)
        stream.wait_stream(torch.cuda.current_stream(device))
        try:
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up: lazy initialisations happen outside the graph
                    model.step(self.ids, cache)
            torch.cuda.current_stream(device).wait_stream(stream)
            self._restore(saved)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits, _ = model.step(self.ids, cache)
        finally:
            self._restore(saved)
        self.n = 0

    def _restore(self, saved: Dict[str, Tensor]) -> None:
        for p, t in _tensors(self.cache):
            t.copy_(saved[p])
        for d, v in self.offsets:
            d["seqlen_offset"] = v

    def __call__(self, ids: Tensor) -> Tensor:
        self.ids.copy_(ids)
        self.graph.replay()
        self.n += 1
        return self.logits

    def finish(self) -> None:
        for d, v in self.offsets:
            d["seqlen_offset"] = v + self.n


def _check_args(
    model, input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id, pad_token_id
) -> None:
    for method in ("allocate_inference_cache", "step"):
        if not callable(getattr(model, method, None)):
            raise TypeError(f"model: expected a model with {method}(), got {type(model).__name__}")
    if (
        not isinstance(input_ids, Tensor)
        or input_ids.is_floating_point()
        or input_ids.dtype == torch.bool
    ):
        got = input_ids.dtype if isinstance(input_ids, Tensor) else type(input_ids).__name__
        raise TypeError(f"input_ids: expected an integer tensor, got {got}")
    if input_ids.dim() != 2 or input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
        raise ValueError(
            f"input_ids: expected shape (B, L) with B, L >= 1, got {tuple(input_ids.shape)}"
        )
    if (
        not isinstance(max_new_tokens, int)
        or isinstance(max_new_tokens, bool)
        or max_new_tokens < 0
    ):
        raise ValueError(f"max_new_tokens: expected an int >= 0, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature: expected a float >= 0, got {temperature!r}")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
        raise ValueError(f"top_k: expected an int >= 0, got {top_k!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p: expected a float in (0, 1], got {top_p!r}")
    for name, v in (("eos_token_id", eos_token_id), ("pad_token_id", pad_token_id)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
            raise ValueError(f"{name}: expected None or a token id >= 0, got {v!r}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    cuda_graph: Optional[bool] = None,
    pad_token_id: Optional[int] = None,
) -> GenerationOutput:
    """Generate up to ``max_new_tokens`` tokens after each prompt.

    Example:
        >>> out = generate(lm, prompt_ids, max_new_tokens=64, temperature=0.8, top_p=0.9)
        >>> out.sequences.shape, out.tokens_per_s

    Args:
        model: e.g. :class:`lrnnx.architectures.LRNNLMHeadModel` (set to eval mode for the
            call and restored after).
        input_ids: (B, L) prompts, all of length L.
        max_new_tokens: tokens to add per sequence.
        temperature: softmax temperature; 0 means greedy (argmax).
        top_k: sample among the k most likely tokens (0: all; 1: greedy).
        top_p: nucleus sampling mass (1.0: all).
        eos_token_id: a sequence stops at this token; later positions get ``pad_token_id``
            (default: ``eos_token_id``) and generation ends when every sequence stopped.
        generator: random generator for sampling (reproducibility).
        cuda_graph: capture the decode step in a CUDA graph: None = when the model is on CUDA
            (falling back to eager decoding with a warning if capture fails), True = required
            (ValueError off CUDA), False = never.
        pad_token_id: filler after eos.

    Returns:
        :class:`GenerationOutput`.
    """
    _check_args(
        model, input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id, pad_token_id
    )
    device = input_ids.device
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph: CUDA graphs need input_ids on a CUDA device, got {device}")
    use_graph = device.type == "cuda" if cuda_graph is None else bool(cuda_graph)
    pad = eos_token_id if pad_token_id is None else pad_token_id
    B, L = input_ids.shape
    was_training = model.training
    model.eval()
    try:
        _sync(device)
        t0 = time.perf_counter()
        cache = model.allocate_inference_cache(B, L + max(max_new_tokens, 1))
        logits = model(input_ids, inference_cache=cache)[:, -1]  # ONE parallel prefill
        _sync(device)
        t1 = time.perf_counter()
        step: Callable[[Tensor], Tensor] = lambda ids: model.step(ids, cache)[0]  # noqa: E731
        graph = None
        if use_graph and max_new_tokens > 1:
            try:
                graph = _GraphStep(model, cache, B, device)
                step = graph
            except Exception as e:  # an uncapturable step: decode eagerly instead
                if cuda_graph:
                    raise
                warnings.warn(
                    f"generate: CUDA graph capture failed ({e}); decoding eagerly", stacklevel=2
                )
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        new = []
        for i in range(max_new_tokens):
            tok = sample_logits(logits, temperature, top_k, top_p, generator)
            if eos_token_id is not None:
                tok = torch.where(finished, torch.full_like(tok, pad), tok)
                finished |= tok == eos_token_id
            new.append(tok)
            if i == max_new_tokens - 1 or (eos_token_id is not None and bool(finished.all())):
                break
            logits = step(tok)
        if graph is not None:
            graph.finish()
        _sync(device)
        t2 = time.perf_counter()
    finally:
        model.train(was_training)
    n = len(new)
    seq = (
        torch.cat([input_ids, torch.stack(new, 1).to(input_ids.dtype)], 1)
        if n
        else input_ids.clone()
    )
    total = max(t2 - t0, 1e-9)
    return GenerationOutput(
        sequences=seq,
        tokens_per_s=B * n / total,
        num_new_tokens=n,
        prefill_s=t1 - t0,
        decode_s=t2 - t1,
        finished=finished,
        cuda_graph=graph is not None,
    )

"""Autoregressive generation for models with ``forward(ids, inference_cache=...)``,
``step(ids, cache)`` and ``allocate_inference_cache(batch_size, max_seqlen)`` (such as
:class:`lrnnx.architectures.LRNNLMHeadModel`), with the keywords of transformers'
``GenerationMixin.generate`` (``max_new_tokens`` / ``max_length``, ``do_sample``, ``temperature``,
``top_k``, ``top_p``, ``repetition_penalty``, ``eos_token_id``, ``pad_token_id``,
``attention_mask``, ``return_dict_in_generate``, ``output_scores``): greedy by default, and a
tensor of token ids as the result.

The prompt is prefilled with ONE parallel forward that fills every layer's cache (padded prompts
each at their own length); decoding then calls ``step`` once per new token.  On CUDA the decode
step can be captured once in a CUDA graph and replayed (every cache tensor is updated in place,
so the graph's fixed addresses stay valid).  On the CPU a small model's decoding loop runs torch
on one thread (:func:`decode_threads`; the count is restored after).
"""

from __future__ import annotations

import numbers
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from lrnnx.core.checks import check_positive_float, user_stacklevel


@dataclass
class GenerationOutput:
    """What :func:`generate` returns with ``return_dict_in_generate=True`` (or ``output_scores``
    / ``output_logits``), like transformers' ``GenerateDecoderOnlyOutput``.

    Attributes:
        sequences: (B, L + n) prompt followed by the n generated tokens; after a sequence's
            ``eos_token_id`` its remaining positions hold ``pad_token_id``.  n is
            ``max_new_tokens`` unless every sequence finished earlier.
        scores: with ``output_scores``, n tensors (B, vocab): the processed next-token scores
            each token was chosen from (after the repetition penalty and, when sampling,
            temperature and top-k/top-p, -inf where filtered); else None.
        logits: with ``output_logits``, n tensors (B, vocab): the model's raw next-token
            logits; else None.
        tokens_per_s: generated tokens (B * n) per second of prefill + decode wall time.
        num_new_tokens: n.
        prefill_s, decode_s: wall time of the prompt's forward, and of the decoding loop.
        finished: (B,) bool, whether each sequence produced an ``eos_token_id``.
        cuda_graph: whether decoding replayed a CUDA graph.

    ``out["sequences"]`` works too, as on transformers' outputs.
    """

    sequences: Tensor
    scores: Optional[Tuple[Tensor, ...]] = None
    logits: Optional[Tuple[Tensor, ...]] = None
    tokens_per_s: float = 0.0
    num_new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    finished: Optional[Tensor] = None
    cuda_graph: bool = False

    def __getitem__(self, key: str) -> Any:
        if not isinstance(key, str) or key not in self.__dataclass_fields__:
            raise KeyError(key)
        return getattr(self, key)


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Mask (to -inf) the logits outside the top-k and outside the nucleus of mass top_p.

    Args:
        logits: (B, V).
        top_k: keep the k largest logits per row and any tied with the k-th (0: no limit).
        top_p: keep the smallest set of largest-probability tokens whose total probability is
            >= top_p (1.0: no limit); the most likely token is always kept.
    """
    out = logits
    V = logits.shape[-1]
    if 0 < top_k < V:
        # every logit tied with the k-th largest stays (transformers' TopKLogitsWarper): which
        # of equal logits topk returns is arbitrary, and the sampler must not depend on it
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        probs, order = out.float().softmax(-1).sort(dim=-1, descending=True)
        before = probs.cumsum(-1) - probs  # mass of the strictly more likely tokens
        drop_sorted = before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def apply_temperature(logits: Tensor, temperature: float) -> Tensor:
    """logits / temperature (B, V).  A row that this would overflow to inf (a temperature so
    small that the sample is all but greedy, e.g. 1e-45) is shifted by its maximum first, which
    leaves its distribution unchanged and its values finite; other rows are exactly
    logits / temperature (transformers' ``TemperatureLogitsWarper``)."""
    if temperature == 1:
        return logits
    scaled = logits / temperature
    overflow = (torch.isinf(scaled) & torch.isfinite(logits)).any(-1, keepdim=True)
    shifted = (logits - logits.amax(-1, keepdim=True)) / temperature
    return torch.where(overflow, shifted, scaled)


def _check_sampling(temperature: Any, top_k: Any, top_p: Any) -> None:
    """temperature: a finite real >= 0; top_k: an int >= 0; top_p: a real in (0, 1]."""
    check_positive_float("temperature", temperature, allow_zero=True)
    if not isinstance(top_k, numbers.Integral) or isinstance(top_k, bool) or top_k < 0:
        raise ValueError(f"top_k: expected an int >= 0, got {top_k!r}")
    if check_positive_float("top_p", top_p) > 1:
        raise ValueError(f"top_p: expected a float in (0, 1], got {top_p!r}")


def sample_logits(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Next tokens (B,) from logits (B, V): argmax if temperature == 0 or top_k == 1, else a
    sample from softmax(filter_logits(logits / temperature)) (see :func:`apply_temperature`).

    Raises:
        ValueError: a temperature that is negative, NaN or inf, a top_k that is not an int
            >= 0, or a top_p outside (0, 1].
        TypeError: a temperature or top_p that is not a real number.
    """
    _check_sampling(temperature, top_k, top_p)
    if temperature == 0 or top_k == 1:
        return logits.argmax(-1)
    scaled = filter_logits(apply_temperature(logits.float(), temperature), top_k, top_p)
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


def _token_ids(name: str, value: Any) -> Optional[List[int]]:
    """None, an int, or a list/tuple/1-D tensor of ints (>= 0) -> None or a non-empty list."""
    if value is None:
        return None
    if isinstance(value, Tensor):
        if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise ValueError(f"{name}: expected integer token ids, got dtype {value.dtype}")
        value = value.flatten().tolist()
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not items or any(
        not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 0 for v in items
    ):
        raise ValueError(f"{name}: expected None, a token id >= 0 or a list of them, got {value!r}")
    return [int(v) for v in items]


def _check_args(
    model: nn.Module,
    input_ids: Any,
    max_new_tokens: Any,
    max_length: Any,
    do_sample: Any,
    temperature: float,
    top_k: int,
    top_p: float,
    repetition_penalty: float,
    pad_token_id: Any,
) -> int:
    """Validate the arguments; return the number of tokens to generate."""
    for method in ("allocate_inference_cache", "step"):
        if not callable(getattr(model, method, None)):
            raise TypeError(f"model: expected a model with {method}(), got {type(model).__name__}")
    if (
        not isinstance(input_ids, Tensor)
        or input_ids.is_floating_point()
        or input_ids.is_complex()
        or input_ids.dtype == torch.bool
    ):
        got = input_ids.dtype if isinstance(input_ids, Tensor) else type(input_ids).__name__
        raise TypeError(f"input_ids: expected an integer tensor, got {got}")
    if input_ids.dim() != 2 or input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
        raise ValueError(
            f"input_ids: expected shape (B, L) with B, L >= 1, got {tuple(input_ids.shape)}"
        )
    L = input_ids.shape[1]
    for name, v in (("max_new_tokens", max_new_tokens), ("max_length", max_length)):
        if v is not None and (not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 0):
            raise ValueError(f"{name}: expected None or an int >= 0, got {v!r}")
    if max_new_tokens is None and max_length is None:
        raise ValueError(
            "max_new_tokens / max_length: pass one of them (max_new_tokens: tokens to add; "
            "max_length: prompt length + tokens to add)"
        )
    if max_length is not None and max_length < L:
        raise ValueError(
            f"max_length: counts the prompt (input_ids.shape[1] = {L}) and the new tokens, so it "
            f"must be >= {L}, got {max_length}"
        )
    if max_new_tokens is not None and max_length is not None and max_length != L + max_new_tokens:
        raise ValueError(
            f"max_new_tokens = {max_new_tokens} and max_length = {max_length} disagree (the "
            f"prompt has {L} tokens: max_length = {L} + max_new_tokens); pass only one of them"
        )
    if not isinstance(do_sample, bool):
        raise TypeError(f"do_sample: expected a bool, got {do_sample!r}")
    _check_sampling(temperature, top_k, top_p)
    check_positive_float("repetition_penalty", repetition_penalty)
    if pad_token_id is not None and (
        not isinstance(pad_token_id, numbers.Integral)
        or isinstance(pad_token_id, bool)
        or pad_token_id < 0
    ):
        raise ValueError(f"pad_token_id: expected None or a token id >= 0, got {pad_token_id!r}")
    return int(max_new_tokens) if max_new_tokens is not None else int(max_length) - L


def _prompt_layout(input_ids: Tensor, attention_mask: Any) -> Tuple[Tensor, Optional[Tensor]]:
    """The prompts with their tokens moved to the front of each row, and their lengths.

    Returns ``(ids, lengths)``: ``lengths`` is None when no row is padded (``ids`` is then
    ``input_ids``); otherwise row b of ``ids`` holds its ``lengths[b]`` valid tokens first, then
    zeros — the right-padded layout that ``model(ids, lengths=...)`` takes, whichever side the
    prompt was padded on.
    """
    if attention_mask is None:
        return input_ids, None
    B, L = input_ids.shape
    if not isinstance(attention_mask, Tensor) or tuple(attention_mask.shape) != (B, L):
        got = (
            tuple(attention_mask.shape)
            if isinstance(attention_mask, Tensor)
            else type(attention_mask).__name__
        )
        raise ValueError(f"attention_mask: expected a tensor of shape ({B}, {L}), got {got}")
    mask = attention_mask.to(input_ids.device)
    if mask.dtype != torch.bool:
        if bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError("attention_mask: expected 0/1 (or boolean) entries")
        mask = mask != 0
    n = mask.sum(1)
    if bool((n == 0).any()):
        rows = (n == 0).nonzero()[:, 0].tolist()
        raise ValueError(f"attention_mask: rows {rows} have no token to continue")
    if bool((n == L).all()):
        return input_ids, None
    pos = torch.arange(L, device=mask.device)
    start = (mask.cumsum(1) == 0).sum(1)  # leading padding of each row
    block = (pos >= start[:, None]) & (pos < (start + n)[:, None])
    if not torch.equal(block, mask):
        raise ValueError(
            "attention_mask: each row's 1s must be one contiguous block (a left- or "
            "right-padded prompt); transformers' generate builds the mask as input_ids != "
            "pad_token_id when none is passed, so a prompt holding pad_token_id inside a row "
            "needs an explicit attention_mask"
        )
    moved = input_ids.gather(1, (start[:, None] + pos) % L)  # valid tokens first
    return torch.where(pos < n[:, None], moved, torch.zeros_like(moved)), n


def _penalize(scores: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """transformers' repetition penalty: logits of tokens already in the sequence are divided
    by ``penalty`` where positive and multiplied by it where negative."""
    penalized = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen, penalized, scores)


def _sampling_args_unused(temperature: float, top_k: int, top_p: float) -> List[str]:
    unused = []
    if temperature not in (0, 1):
        unused.append(f"temperature={temperature}")
    if top_k not in (0, 1):
        unused.append(f"top_k={top_k}")
    if top_p != 1:
        unused.append(f"top_p={top_p}")
    return unused


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: a CPU decoding step whose work (batch size x parameters, about its multiply-adds) is below
#: this runs torch on one thread: each of its ops is too small to split, yet the ones torch
#: parallelises regardless of size (oneDNN's gelu, log_sigmoid) then wait on a second thread,
#: and on a busy 2-core machine such a wait cost a scheduler tick (4-8 ms) against a step of
#: 0.5-1 ms for a 2-layer, d_model 64 LM
DECODE_SERIAL_WORK = 1 << 20


def decode_threads(model: nn.Module, batch_size: int, device: torch.device) -> int:
    """torch threads for :func:`generate`'s decoding loop: 1 for a small step on the CPU
    (:data:`DECODE_SERIAL_WORK`), else ``torch.get_num_threads()`` (unchanged).  torch's count
    is process-wide: torch ops other Python threads run during the loop get it too."""
    threads = torch.get_num_threads()
    if device.type != "cpu":
        return threads
    work = batch_size * sum(p.numel() for p in model.parameters())
    return 1 if work < DECODE_SERIAL_WORK else threads


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` for the block, restored after."""
    before = torch.get_num_threads()
    if n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


#: on CUDA, generate asks whether every sequence has finished once per this many tokens: the
#: answer is a device-to-host copy that waits for the GPU, which would otherwise stall the
#: launch queue at every token; the few extra steps' tokens are dropped afterwards
EOS_CHECK_TOKENS = 8


def eos_check_every(device: torch.device) -> int:
    """How often (in tokens) :func:`generate` reads whether every sequence has finished: every
    token on the CPU (free there), every :data:`EOS_CHECK_TOKENS` on an accelerator."""
    return 1 if device.type == "cpu" else EOS_CHECK_TOKENS


def _stop(i: int, all_done: List[Tensor], every: int) -> bool:
    """Whether decoding stops after token ``i``: every sequence finished, read every ``every``
    tokens (the one host synchronisation of the check)."""
    return (i + 1) % every == 0 and bool(all_done[-1])


def _first_done(all_done: List[Tensor]) -> int:
    """The number of tokens up to and including the first at which every sequence had
    finished (all of them if none), as an eager check after each token would have stopped."""
    done = torch.stack(all_done).nonzero()
    return int(done[0, 0]) + 1 if done.numel() else len(all_done)


@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: Tensor,
    max_new_tokens: Optional[int] = None,
    *,
    max_length: Optional[int] = None,
    do_sample: bool = False,
    temperature: Optional[float] = 1.0,
    top_k: Optional[int] = 0,
    top_p: Optional[float] = 1.0,
    repetition_penalty: Optional[float] = 1.0,
    eos_token_id: Union[int, Sequence[int], None] = None,
    pad_token_id: Optional[int] = None,
    attention_mask: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    return_dict_in_generate: bool = False,
    output_scores: bool = False,
    output_logits: bool = False,
    cuda_graph: Optional[bool] = None,
) -> Union[Tensor, GenerationOutput]:
    """Continue each prompt by up to ``max_new_tokens`` tokens (transformers' ``generate``
    keywords; greedy unless ``do_sample=True``).

    Example:
        >>> ids = generate(lm, prompt_ids, max_new_tokens=64)                  # greedy, (B, L + 64)
        >>> ids = generate(lm, prompt_ids, max_new_tokens=64, do_sample=True,
        ...                temperature=0.8, top_p=0.9)
        >>> out = generate(lm, padded_ids, max_length=100, attention_mask=mask,
        ...                eos_token_id=2, return_dict_in_generate=True, output_scores=True)
        >>> out.sequences, out.scores                                    # (B, L + n), n x (B, V)

    Args:
        model: e.g. :class:`lrnnx.architectures.LRNNLMHeadModel`: anything with
            ``forward(ids, inference_cache=..., [lengths=...])``, ``step(ids, cache)`` and
            ``allocate_inference_cache(batch_size, max_seqlen)``.  Put in eval mode for the call
            and restored after.
        input_ids: (B, L) integer prompts.
        max_new_tokens: tokens to add per sequence.  Pass it or ``max_length``.
        max_length: prompt length L (padding included) + tokens to add.  Passing both is an
            error unless they agree.
        do_sample: sample the next token; False (the default) takes the most likely one
            (greedy decoding, deterministic).  ``temperature``, ``top_k`` and ``top_p`` only act
            when sampling (a warning says so otherwise).
        temperature: sampling from ``softmax(logits / temperature)``; 0 means greedy.
        top_k: sample among the k most likely tokens (0: all; 1: greedy).
        top_p: sample from the smallest set of most likely tokens whose probability reaches
            ``top_p`` (nucleus sampling; 1.0: all; a tiny value: greedy).
        repetition_penalty: divide the positive logits and multiply the negative ones of every
            token already in the sequence (prompt included) by this (1.0: off; transformers'
            and CTRL's penalty).  Applies to greedy decoding and sampling alike.
        eos_token_id: a token id or a list of them; a sequence that produces one is finished:
            its later positions get ``pad_token_id`` and generation stops once every sequence
            is finished.
        pad_token_id: filler after a sequence's end (default: the first ``eos_token_id``).
        attention_mask: (B, L) 1 for prompt tokens, 0 for padding, to batch prompts of
            different lengths; each row's 1s must be contiguous (left or right padding).  Each
            row is continued as if it were generated alone (at its own length, positions
            starting at its first token).  The new tokens are appended after column L whatever
            the padding side: ``sequences[:, L:]`` are always the new tokens.
        generator: random generator for sampling (default: torch's global one, so
            ``torch.manual_seed`` also makes sampling reproducible).
        return_dict_in_generate: return a :class:`GenerationOutput` rather than the tensor
            of token ids.
        output_scores: also return the processed scores (``.scores``: one (B, vocab) tensor
            per new token, after the repetition penalty and, when sampling, temperature and
            top-k/top-p filtering, -inf where filtered); implies the object return.
        output_logits: also return the raw next-token logits (``.logits``, one (B, vocab) per
            new token); implies the object return.
        cuda_graph: capture the decode step in a CUDA graph: None = when the model is on CUDA
            (falling back to eager decoding with a warning if capture fails), True = required
            (ValueError off CUDA), False = never.

    Returns:
        (B, L + n) LongTensor (input dtype): ``input_ids`` followed by the n new tokens, n =
        ``max_new_tokens`` unless every sequence finished earlier; or, with
        ``return_dict_in_generate`` / ``output_scores`` / ``output_logits``, a
        :class:`GenerationOutput` holding it as ``.sequences``.
    """
    temperature = 1.0 if temperature is None else temperature
    top_k = 0 if top_k is None else top_k
    top_p = 1.0 if top_p is None else top_p
    repetition_penalty = 1.0 if repetition_penalty is None else repetition_penalty
    n_new = _check_args(
        model,
        input_ids,
        max_new_tokens,
        max_length,
        do_sample,
        temperature,
        top_k,
        top_p,
        repetition_penalty,
        pad_token_id,
    )
    eos = _token_ids("eos_token_id", eos_token_id)
    device = input_ids.device
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph: CUDA graphs need input_ids on a CUDA device, got {device}")
    if not do_sample:
        unused = _sampling_args_unused(temperature, top_k, top_p)
        if unused:
            warnings.warn(
                f"generate: do_sample=False decodes greedily, so {', '.join(unused)} has no "
                "effect; pass do_sample=True to sample",
                UserWarning,
                stacklevel=user_stacklevel(),
            )
    sample = do_sample and temperature != 0 and top_k != 1
    use_graph = device.type == "cuda" if cuda_graph is None else bool(cuda_graph)
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos is not None else None)
    eos_ids = None if eos is None else torch.tensor(eos, device=device)
    prompt, lengths = _prompt_layout(input_ids, attention_mask)
    B, L = input_ids.shape
    V = None
    seen = None
    scores: List[Tensor] = []
    raw_logits: List[Tensor] = []
    was_training = model.training
    model.eval()
    try:
        _sync(device)
        t0 = time.perf_counter()
        cache = model.allocate_inference_cache(B, L + max(n_new, 1))
        if lengths is None:  # ONE parallel prefill
            out = model(prompt, inference_cache=cache)
        else:  # every sequence's cache stops at its own length
            out = model(prompt, lengths=lengths, inference_cache=cache)
        out = getattr(out, "logits", out)
        if lengths is None:
            logits = out[:, -1]
        else:
            logits = out[torch.arange(B, device=device), lengths.to(device) - 1]
        _sync(device)
        t1 = time.perf_counter()
        step: Callable[[Tensor], Tensor] = lambda ids: model.step(ids, cache)[0]  # noqa: E731
        graph = None
        if use_graph and n_new > 1:
            try:
                graph = _GraphStep(model, cache, B, device)
                step = graph
            except Exception as e:  # an uncapturable step: decode eagerly instead
                if cuda_graph:
                    raise
                warnings.warn(
                    f"generate: CUDA graph capture failed ({e}); decoding eagerly",
                    stacklevel=user_stacklevel(),
                )
        if repetition_penalty != 1.0:
            V = logits.shape[-1]
            valid = (
                torch.ones_like(prompt, dtype=torch.long)
                if lengths is None
                else (torch.arange(L, device=device) < lengths[:, None]).long()
            )
            counts = torch.zeros(B, V, dtype=torch.long, device=device)
            seen = counts.scatter_add_(1, prompt.clamp(0, V - 1), valid) > 0
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        new: List[Tensor] = []
        all_done: List[Tensor] = []  # per new token: whether every sequence had finished
        every = eos_check_every(device)
        # the loop's torch threads: one for a small step (see decode_threads)
        with _torch_threads(decode_threads(model, B, device)):
            for i in range(n_new):
                if output_logits:
                    raw_logits.append(logits.clone())
                x = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
                if seen is not None:
                    x = _penalize(x, seen, repetition_penalty)
                if sample:
                    x = filter_logits(apply_temperature(x, temperature), top_k, top_p)
                    tok = torch.multinomial(x.softmax(-1), 1, generator=generator)[:, 0]
                else:
                    tok = x.argmax(-1)
                if output_scores:
                    scores.append(x if x is not logits else x.clone())
                if seen is not None:
                    seen.scatter_(1, tok[:, None], True)
                out_tok = tok
                if eos_ids is not None:
                    out_tok = torch.where(finished, torch.full_like(tok, pad), tok)
                    finished |= torch.isin(tok, eos_ids)
                    all_done.append(finished.all())  # a device tensor: no sync here
                new.append(out_tok)
                if i == n_new - 1 or (eos_ids is not None and _stop(i, all_done, every)):
                    break
                logits = step(tok)  # a finished sequence is fed its (discarded) own token
        if eos_ids is not None and every > 1:  # drop the steps past the last sequence's end
            n_keep = _first_done(all_done)
            del new[n_keep:], scores[n_keep:], raw_logits[n_keep:]
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
    if not (return_dict_in_generate or output_scores or output_logits):
        return seq
    total = max(t2 - t0, 1e-9)
    return GenerationOutput(
        sequences=seq,
        scores=tuple(scores) if output_scores else None,
        logits=tuple(raw_logits) if output_logits else None,
        tokens_per_s=B * n / total,
        num_new_tokens=n,
        prefill_s=t1 - t0,
        decode_s=t2 - t1,
        finished=finished,
        cuda_graph=graph is not None,
    )

"""Inference caches under autograd."""

from __future__ import annotations

from typing import Any

from torch import Tensor

__all__ = ["detach_cache"]


def detach_cache(cache: Any) -> Any:
    """Cut autograd's graph at a cache, in place, and return it: truncated backpropagation
    through time over chunks of a stream, the cache's states then being constants for the
    next chunk (as ``h = h.detach()`` for an RNN's hidden state).

    While autograd records, a forward that fills a cache stores its final state with its graph
    and every ``step`` carries it on, so that prefills and steps have the parallel forward's
    gradients; a second ``backward`` through a cache whose graph a first one freed raises
    torch's "Trying to backward through the graph a second time".  Works on a model's cache
    (``allocate_inference_cache``) and on an architecture's (an LM's dict of layer caches):
    every tensor with a graph is detached in place (the cache keeps its tensors, whose
    addresses steps and CUDA graphs rely on), and attention's record of the keys and values of
    recorded calls is dropped (its buffers hold them detached).

    Example:
        >>> cache = model.allocate_inference_cache(batch_size=B)
        >>> for chunk in stream.split(64, dim=1):  # x (B, L, H) in chunks of 64 steps
        ...     loss(model(chunk, inference_cache=cache)).backward()
        ...     opt.step(); opt.zero_grad()
        ...     detach_cache(cache)
    """
    if isinstance(cache, dict):
        cache.pop("kv_graph", None)
        values = cache.values()
    elif isinstance(cache, (list, tuple)):
        values = cache
    else:
        return cache
    for value in values:
        if isinstance(value, Tensor):
            if value.grad_fn is not None:
                value.detach_()
        else:
            detach_cache(value)
    return cache

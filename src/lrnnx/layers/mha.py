"""Causal multi-head self-attention (Vaswani et al., "Attention Is All You Need",
arXiv 1706.03762) with rotary position embeddings (Su et al., "RoFormer: Enhanced Transformer
with Rotary Position Embedding", arXiv 2104.09864) and a key/value cache for decoding.

    [q, k, v] = W_qkv x                     (per head h: q_h, k_h, v_h of width d = dim / heads)
    q_t <- R(t) q_t,   k_s <- R(s) k_s       (RoPE: rotate pair i of each vector by the angle
                                              pos * base^(-2i/d), pairs (2i, 2i+1) as in the paper)
    o_t = sum_{s <= t} softmax_s(q_t . k_s / sqrt(d)) v_s
    y   = W_o [o^1, ..., o^H]

Since R(t)^T R(s) = R(s - t), scores only see relative positions.  Positions are absolute
token indices: in ``forward`` with a cache and in ``step`` they continue from each sequence's
cached length (``"cache_seqlens"``), so prefill + steps rotate exactly as one long forward.

Packed sequences (``cu_seqlens``, flash-attn's varlen convention): x (1, T, D) holds S
sequences back to back; a token attends only within its own sequence and its rotary position
restarts at 0 at the sequence start, so each sequence's output equals running it alone.  The
attention runs as one ``scaled_dot_product_attention`` call with a block-diagonal (T, T)
boolean mask: O(T^2) memory for the mask (and for the scores on backends that materialise
them), as for an unpacked sequence of length T; flash-attn's varlen kernels avoid it but are
not a dependency.

Non-finite input stays where causality and packing put it: padding (``lengths``) is zeroed
before the projections, and a NaN or inf key or value reaches only the queries allowed to see
it (:func:`attention`; plain SDPA spread it to every query through 0 * NaN).
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lrnnx.core.base import with_factory_arguments
from lrnnx.core.checks import (
    as_lengths,
    check_batch_size,
    check_inference_cache,
    check_input_dtype,
    check_sequence,
    check_step_input,
    check_timesteps,
    lengths_mask,
    packed_offsets,
    step_output,
    zero_where_not,
)
from lrnnx.layers.linear import Linear
from lrnnx.ops._dispatch import env_backend
from lrnnx.ops.linear_scan.packing import step_layout


def _positive_int(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


def _sdpa(q: Tensor, k: Tensor, v: Tensor, **kwargs: Any) -> Tensor:
    """``F.scaled_dot_product_attention``; on the reference backend (``LRNNX_BACKEND=reference``)
    its math kernel, whose backward is differentiable again: torch's fused CPU kernel has no
    second derivative ("derivative for ..._flash_attention_for_cpu_backward is not
    implemented"), and second derivatives are exact on the reference backend for every model."""
    if env_backend() == "reference":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, **kwargs)
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


def attention(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False
) -> Tensor:
    """``F.scaled_dot_product_attention`` in which a non-finite key or value reaches only the
    queries allowed to attend to it.

    SDPA weighs every (query, key) pair and multiplies the masked ones by 0, so a NaN or inf
    key or value at a position a query must not see (a later token, another packed sequence)
    still made that query's output NaN (0 * NaN).  Here such keys and values enter as 0 and
    every query allowed to see one gets NaN, as its own attention would give.

    Args:
        q: (B, H, Lq, d); k, v: (B, H, S, d).
        attn_mask: boolean, broadcastable to (B, H, Lq, S): True where a query may attend.
        is_causal: query i attends to keys 0..i (Lq == S).

    Returns:
        (B, H, Lq, d).
    """
    bad = ~(torch.isfinite(k).all(-1) & torch.isfinite(v).all(-1))  # (B, H, S)
    k = k.masked_fill(bad[..., None], 0.0)
    v = v.masked_fill(bad[..., None], 0.0)
    out = _sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
    if is_causal:
        sees_bad = torch.cumsum(bad, dim=-1) > 0  # a bad key at or before the query
    elif attn_mask is not None:
        sees_bad = (attn_mask & bad[..., None, :]).any(-1)
    else:
        sees_bad = bad.any(-1, keepdim=True)
    return out.masked_fill(sees_bad[..., None], float("nan"))


def check_kv_room(cache: Dict[str, Any], new_tokens: int, name: str = "inference_cache") -> None:
    """Room for ``new_tokens`` more positions in a KV cache (``"k_cache"`` (B, heads,
    max_seqlen, head_dim) and its ``"seqlen_offset"``), checked before anything is written.

    Raises:
        ValueError: the cache is too small; the message names ``name``.
    """
    size = cache["k_cache"].shape[2]
    offset = int(cache.get("seqlen_offset", 0))
    if offset + new_tokens > size:
        raise ValueError(
            f"{name}: holds max_seqlen = {size} positions, got {offset} cached + {new_tokens} "
            "new; allocate a larger cache"
        )


class MHA(nn.Module):
    """Multi-head attention that follows the lrnnx mixer protocol.

    Example:
        >>> attn = MHA(64, num_heads=4)
        >>> y = attn(torch.randn(2, 128, 64))                    # (B, L, D) -> (B, L, D)
        >>> cache = attn.allocate_inference_cache(2, max_seqlen=256)
        >>> y_prompt = attn(torch.randn(2, 10, 64), inference_cache=cache)  # prefill
        >>> y_t, cache = attn.step(torch.randn(2, 64), cache)             # one more token

    Args:
        dim: model width D; must be divisible by ``num_heads``.
        num_heads: number of heads (head width D / num_heads, even when ``rotary``).
        rotary: apply rotary position embeddings to queries and keys.
        causal: position t attends to positions <= t only.  Non-causal attention cannot run
            :meth:`step` (it would need future tokens).
        rotary_base: the base of the RoPE frequencies (10000 in the paper).
        bias: biases in the qkv and output projections.
    """

    @with_factory_arguments
    def __init__(
        self,
        dim: int,
        num_heads: int,
        rotary: bool = True,
        causal: bool = True,
        rotary_base: float = 10000.0,
        bias: bool = False,
    ) -> None:
        super().__init__()
        _positive_int("dim", dim)
        _positive_int("num_heads", num_heads)
        if dim % num_heads:
            raise ValueError(f"num_heads: must divide dim = {dim}, got {num_heads}")
        head_dim = dim // num_heads
        if rotary and head_dim % 2:
            raise ValueError(
                f"num_heads: rotary embeddings need an even head width dim / num_heads, got "
                f"{dim} / {num_heads} = {head_dim}"
            )
        if not rotary_base > 1:
            raise ValueError(f"rotary_base: expected a float > 1, got {rotary_base!r}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, head_dim
        self.rotary, self.causal, self.rotary_base = bool(rotary), bool(causal), float(rotary_base)
        self.qkv = Linear(dim, 3 * dim, bias=bias)
        self.out_proj = Linear(dim, dim, bias=bias)

    # ------------------------------------------------------------------------------- helpers
    def _split(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """(B, L, D) -> q, k, v, each (B, heads, L, head_dim)."""
        check_input_dtype(x, self.qkv.weight.dtype)
        B, L, _ = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    def rotate(self, t: Tensor, pos: Tensor) -> Tensor:
        """Rotary embedding of t (B, heads, L, head_dim) at integer positions pos (L,) or (B, L).

        Pair i = (t[2i], t[2i+1]) is rotated by pos * rotary_base^(-2i / head_dim).  Identity
        when ``rotary`` is False.
        """
        if not self.rotary:
            return t
        # angles of large positions need more than bf16; float64 models keep float64
        dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
        half = self.head_dim // 2
        exponent = torch.arange(half, device=t.device, dtype=dtype) * (2.0 / self.head_dim)
        # base^(-2i/d) built on the device (no host tensor: capturable in a CUDA graph)
        inv_freq = torch.exp(exponent * -math.log(self.rotary_base))
        ang = pos.to(dtype)[..., None] * inv_freq  # (L, half) or (B, L, half)
        if ang.dim() == 3:
            ang = ang[:, None]  # broadcast over heads
        cos, sin = ang.cos(), ang.sin()
        pairs = t.to(dtype).unflatten(-1, (half, 2))
        even, odd = pairs[..., 0], pairs[..., 1]
        out = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
        return out.flatten(-2).to(t.dtype)

    def _check_cache(self, cache: Any, batch: int) -> Tuple[Tensor, Tensor, Tensor]:
        keys = ("k_cache", "v_cache", "cache_seqlens")
        # a float64 model computes in float64 end to end: a KV cache allocated before
        # model.double() is refused, never rounded.  Other models take any floating dtype (a
        # narrower one, e.g. dtype=torch.bfloat16 for a float32 model, is a memory choice)
        w = self.qkv.weight.dtype
        wide = {"k_cache": w, "v_cache": w} if w == torch.float64 else None
        check_inference_cache(cache, batch, keys, "MHA", batch_keys=keys, precision=wide)
        kc, vc, lens = cache.get("k_cache"), cache.get("v_cache"), cache.get("cache_seqlens")
        H, hd = self.num_heads, self.head_dim
        for name, t in (("k_cache", kc), ("v_cache", vc)):
            if (
                not isinstance(t, Tensor)
                or t.dim() != 4
                or t.shape[0] != batch
                or t.shape[1] != H
                or t.shape[3] != hd
            ):
                got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(
                    f"inference_cache['{name}']: expected shape ({batch}, {H}, max_seqlen, {hd}), "
                    f"got {got}"
                )
        if not isinstance(lens, Tensor) or tuple(lens.shape) != (batch,):
            got = tuple(lens.shape) if isinstance(lens, Tensor) else type(lens).__name__
            raise ValueError(
                f"inference_cache['cache_seqlens']: expected shape ({batch},), got {got}"
            )
        return kc, vc, lens

    # ------------------------------------------------------------------------------- protocol
    def forward(
        self,
        x: Tensor,
        integration_timesteps: Optional[Tensor] = None,
        lengths: Optional[Tensor] = None,
        inference_cache: Optional[Dict[str, Any]] = None,
        *,
        cu_seqlens: Optional[Tensor] = None,
    ) -> Tensor:
        """(B, L, D) -> (B, L, D).

        Args:
            x: input sequence; (1, T, D) holding S sequences with ``cu_seqlens``.
            integration_timesteps: (B, L), validated and unused: attention positions are token
                indices, so it is accepted only to keep the mixer interface uniform in mixed
                stacks with event-driven models.
            lengths: (B,) valid lengths; padded outputs are zero and padded keys are never
                attended to by valid positions.
            inference_cache: from :meth:`allocate_inference_cache`; keys/values are appended at
                each sequence's cached length, queries attend to the cached prefix too, and
                ``cache_seqlens`` advances by ``lengths`` (or L), ``seqlen_offset`` by L.
            cu_seqlens: int32/int64 offsets (S + 1,) of S packed sequences (0 first, T last, repeats
                are empty sequences): attention stays within each sequence (causal within it,
                or full within it when ``causal=False``) and rotary positions restart at 0 at
                each sequence start, so the output equals running each sequence alone.  Builds
                a (T, T) boolean mask (O(T^2) memory).

        Raises:
            ValueError: ``cu_seqlens`` malformed, with a batch other than 1, or together with
                ``lengths`` or ``inference_cache``.
        """
        check_sequence(x, self.dim)
        B, L, _ = x.shape
        check_timesteps(integration_timesteps, B, L)
        mask = lengths_mask(lengths, B, L, x.device)
        lengths = as_lengths(lengths, B, L, x.device)  # (B,) (a list, an int)
        if mask is not None:  # a select: padding may hold NaN, and padded keys are cached
            x = zero_where_not(x, mask[..., None])
        q, k, v = self._split(x)
        if cu_seqlens is not None:
            out = self._attend_packed(q, k, v, cu_seqlens, lengths, inference_cache)
        elif inference_cache is not None:
            out = self._attend_cached(q, k, v, lengths, inference_cache)
        else:
            pos = torch.arange(L, device=x.device)
            q, k = self.rotate(q, pos), self.rotate(k, pos)
            if self.causal:
                # padding sits after the valid tokens, so causality already hides it
                out = attention(q, k, v, is_causal=True)
            else:
                attn_mask = None
                if mask is not None:
                    # key 0 stays visible so an all-padding row has no empty softmax (no NaN);
                    # for any valid query key 0 is valid anyway
                    keep = mask.clone()
                    keep[:, 0] = True
                    attn_mask = keep[:, None, None, :]
                out = attention(q, k, v, attn_mask=attn_mask)
        y = self.out_proj(out.transpose(1, 2).reshape(B, L, self.dim))
        if mask is not None:
            y = zero_where_not(y, mask[..., None])
        return y

    def _attend_packed(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        cu_seqlens: Tensor,
        lengths: Optional[Tensor],
        cache: Optional[Dict[str, Any]],
    ) -> Tensor:
        """Attention of packed sequences, q, k, v (1, heads, T, head_dim): a block-diagonal
        mask keeps every token within its sequence, positions count from each sequence start."""
        if cache is not None:
            raise ValueError(
                "inference_cache: MHA has no packed prefill; pass cu_seqlens=None with a cache "
                "(prefill a padded batch with lengths instead)"
            )
        B, _, T, _ = q.shape
        cu = packed_offsets(cu_seqlens, lengths, B, T, f"x ({B}, {T}, {self.dim}) (1, T, D)")
        seq = step_layout(cu.to(q.device), False)[0]  # (T,) the sequence of every token
        pos = torch.arange(T, device=q.device) - cu.to(q.device)[seq]  # restarts at 0
        q, k = self.rotate(q, pos), self.rotate(k, pos)
        # every token sees itself, so no softmax row is empty
        allowed = seq[:, None] == seq[None, :]  # (T, T) block diagonal
        if self.causal:
            allowed = allowed.tril()
        return attention(q, k, v, attn_mask=allowed)

    @staticmethod
    def _cached_kv(
        cache: Dict[str, Any],
        kc: Tensor,
        vc: Tensor,
        idx: Tensor,
        k: Tensor,
        v: Tensor,
        offset: int,
        S: int,
    ) -> Tuple[Tensor, Tensor]:
        """Store this call's k, v (B, H, L, hd) in the cache's buffers at ``idx`` and return
        the keys and values (B, H, S, hd) to attend to, in k's dtype.

        The buffers hold detached values.  Where autograd records, the keys and values are
        built out of place instead, on those the cache's earlier calls recorded (kept in
        ``cache["kv_graph"]`` while every call since records; cached tokens from a call that
        did not record are constants), so gradients reach the inputs of earlier steps, as they
        do through a recurrent model's state, and saved tensors are never overwritten by the
        next step."""
        kc.scatter_(2, idx, k.detach().to(kc.dtype))
        vc.scatter_(2, idx, v.detach().to(vc.dtype))
        if not (torch.is_grad_enabled() and (k.requires_grad or v.requires_grad)):
            cache.pop("kv_graph", None)  # a call without a graph: the recorded prefix ends
            return kc[:, :, :S].to(k.dtype), vc[:, :, :S].to(v.dtype)
        prev = cache.get("kv_graph")
        if prev is None or prev[0].shape[2] != offset or prev[0].dtype != k.dtype:
            prev = (kc[:, :, :offset].to(k.dtype), vc[:, :, :offset].to(v.dtype))
        keys = F.pad(prev[0], (0, 0, 0, S - offset)).scatter(2, idx, k)
        vals = F.pad(prev[1], (0, 0, 0, S - offset)).scatter(2, idx, v)
        cache["kv_graph"] = (keys, vals)
        return keys, vals

    def _attend_cached(
        self, q: Tensor, k: Tensor, v: Tensor, lengths: Optional[Tensor], cache: Dict[str, Any]
    ) -> Tensor:
        B, H, L, hd = q.shape
        kc, vc, seqlens = self._check_cache(cache, B)
        check_kv_room(cache, L)
        offset = int(cache.get("seqlen_offset", 0))
        ar = torch.arange(L, device=q.device)
        pos = seqlens[:, None] + ar  # (B, L): positions continue each sequence's cached length
        q, k = self.rotate(q, pos), self.rotate(k, pos)
        S = offset + L  # every slot in use lies below this (seqlens <= seqlen_offset)
        idx = pos[:, None, :, None].expand(B, H, L, hd)
        keys, vals = self._cached_kv(cache, kc, vc, idx, k, v, offset, S)
        n_new = L if lengths is None else lengths.to(seqlens.device)
        new_len = seqlens + n_new
        j = torch.arange(S, device=q.device)
        allowed = j[None, None, :] < new_len[:, None, None]  # (B, 1, S)
        if self.causal:
            allowed = allowed & (j[None, None, :] <= pos[:, :, None])  # (B, L, S)
        allowed = allowed | (j == 0)  # never an empty softmax row (padded queries are zeroed)
        out = attention(q, keys, vals, attn_mask=allowed[:, None])
        seqlens.copy_(new_len)
        cache["seqlen_offset"] = offset + L
        return out

    def step(
        self,
        x: Tensor,
        inference_cache: Dict[str, Any],
        integration_timesteps: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Dict[str, Any]]:
        """One token: x (B, D) (or (B, 1, D)) -> y (B, D); k, v are appended to the cache.

        The token sits at position ``cache_seqlens`` of each sequence.  ``integration_timesteps``
        is accepted for interface uniformity and unused.  Capturable in a CUDA graph: no
        host synchronisation, fixed shapes.
        """
        if not self.causal:
            raise ValueError(
                "step: a non-causal MHA attends to future tokens and cannot decode step by step"
            )
        layout, x = x, check_step_input(x, self.dim)
        B = x.shape[0]
        kc, vc, seqlens = self._check_cache(inference_cache, B)
        check_kv_room(inference_cache, 1)
        offset = int(inference_cache.get("seqlen_offset", 0))
        q, k, v = self._split(x[:, None])  # (B, H, 1, hd)
        pos = seqlens[:, None].clone()  # (a copy: seqlens advances in place below)
        q, k = self.rotate(q, pos), self.rotate(k, pos)
        idx = pos[:, None, :, None].expand(B, self.num_heads, 1, self.head_dim)
        # eager: only the used prefix; under CUDA-graph capture the whole buffer (fixed shape,
        # the mask hides unused slots), so a replay stays valid as the cache fills
        capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
        S = kc.shape[2] if capturing else offset + 1
        keys, vals = self._cached_kv(inference_cache, kc, vc, idx, k, v, offset, S)
        j = torch.arange(S, device=x.device)
        allowed = (j[None, :] <= seqlens[:, None])[:, None, None, :]  # (B, 1, 1, S)
        out = _sdpa(q, keys, vals, attn_mask=allowed)
        seqlens.add_(1)
        inference_cache["seqlen_offset"] = offset + 1
        return step_output(self.out_proj(out.reshape(B, self.dim)), layout), inference_cache

    def allocate_inference_cache(
        self, batch_size: int, max_seqlen: int = 1, dtype: Optional[torch.dtype] = None
    ) -> Dict[str, Any]:
        """Empty KV cache.

        Returns:
            ``"k_cache"``, ``"v_cache"``: zeros (B, heads, max_seqlen, head_dim) in ``dtype``
            (default: the projection weights' dtype; a float64 model needs float64, any other
            takes any floating dtype); ``"cache_seqlens"``: (B,) int64 tokens
            cached per sequence; ``"seqlen_offset"``: 0 (tokens consumed, a Python int).
        """
        check_batch_size(batch_size)  # 0: an empty cache, as the recurrent mixers allocate
        _positive_int("max_seqlen", max_seqlen)
        w = self.qkv.weight
        dtype = w.dtype if dtype is None else dtype
        shape = (batch_size, self.num_heads, max_seqlen, self.head_dim)
        return {
            "k_cache": torch.zeros(shape, dtype=dtype, device=w.device),
            "v_cache": torch.zeros(shape, dtype=dtype, device=w.device),
            "cache_seqlens": torch.zeros(batch_size, dtype=torch.long, device=w.device),
            "seqlen_offset": 0,
        }

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, rotary={self.rotary}, "
            f"causal={self.causal}"
        )

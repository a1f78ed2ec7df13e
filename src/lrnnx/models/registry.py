"""Registry of the lrnnx sequence mixers: names, papers, lazy imports and one uniform interface.

Every model is listed by module path and imported only when asked for, so a model whose module
is missing (or fails to import) is simply *unavailable*: :func:`available_models` lists the
importable ones and :func:`model_status` says why the others are not.

:func:`build_mixer` turns a name (or a class) plus ``d_model``/``d_state`` into a module that
follows the MIXER PROTOCOL used by :class:`lrnnx.layers.Block` and the architectures:

    forward(x (B, L, D), integration_timesteps=None, lengths=None, inference_cache=None,
            *, cu_seqlens=None) -> (B, L, D)
    allocate_inference_cache(batch_size, max_seqlen, dtype=None) -> dict
    step(x (B, D), cache, integration_timesteps=None) -> (y (B, D), cache)

Recurrent models are wrapped in :class:`MixerAdapter` (one generic adapter): it passes only the
arguments a model's methods accept, transposes (B, H, L) models, keeps the first element of
tuple outputs, feeds (B, 1, H) steps to time-varying models, and gives clear errors.

Packed sequences: ``cu_seqlens`` (S + 1,) int64 offsets (fla's convention: x (1, T, D) holds S
sequences back to back, 0 first, T last, repeats are empty sequences) reach every model whose
forward takes them; the output equals running each sequence alone.  A model that does not
take them yet raises a ValueError naming it (see :attr:`MixerAdapter.supports_cu_seqlens`).
Attention (``"attn"``) is :class:`lrnnx.layers.MHA`, which follows the protocol natively.

``build_mixer(..., bidirectional=True)`` gives :class:`lrnnx.layers.Bidirectional` around two
independently built mixers (a non-causal mixer: forward and time-reversed directions summed).

``"stream"`` (STREAM) is the Mamba class used for irregularly sampled or event data: its event
mode runs whenever ``integration_timesteps`` are given (with none it is plain Mamba).  RG-LRU
(one state per channel) and attention ignore ``d_state``.  ``"s7-lowrank"`` is S7 with
``bc_rank="auto"``: rank-r input-dependent B_k and C_k, lrnnx's cheaper option beside the
paper's full bilinear maps (see :class:`lrnnx.models.ltv.S7`).
"""

from __future__ import annotations

import importlib
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from lrnnx.core.base import reset_submodules
from lrnnx.core.checks import (
    check_batch_size,
    check_sequence,
    check_step_input,
    lengths_mask,
    step_output,
    zero_where_not,
)

#: builds the raw model: (cls, d_model, d_state or None, kwargs) -> nn.Module
_Make = Callable[[type, int, Optional[int], Dict[str, Any]], nn.Module]

#: d_state used when a model needs one and none is given
DEFAULT_D_STATE = 64


def _positive_int(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


def _import_target(target: str) -> type:
    """Import ``"package.module:Class"``."""
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise ValueError(f"model path: expected 'package.module:Class', got {target!r}")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def class_path(cls: type) -> str:
    """``"module:QualName"`` of a class, the form stored in configs and accepted by the registry."""
    return f"{cls.__module__}:{cls.__qualname__}"


def _signature_params(fn: Callable) -> Tuple[Dict[str, inspect.Parameter], bool]:
    params = dict(inspect.signature(fn).parameters)
    varkw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return params, varkw


def _check_kwargs(cls: type, kwargs: Dict[str, Any], name: str) -> None:
    """Unknown constructor arguments -> ValueError listing the accepted ones."""
    params, varkw = _signature_params(cls)
    if varkw:
        return
    accepted = [p for p, v in params.items() if v.kind is not inspect.Parameter.VAR_POSITIONAL]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(
            f"mixer_kwargs: {name} ({class_path(cls)}) does not accept {unknown}; its arguments "
            f"are {accepted}"
        )


def _make_with_state(defaults: Dict[str, Any], uses_d_state: bool = True) -> _Make:
    """Builder for ``cls(d_model, d_state=..., **defaults, **kwargs)``.

    A d_state of None keeps the class default (or :data:`DEFAULT_D_STATE` if it has none);
    models with ``uses_d_state=False`` (no state size to choose) ignore d_state.
    """

    def make(cls: type, d_model: int, d_state: Optional[int], kwargs: Dict[str, Any]) -> nn.Module:
        kw = {**defaults, **kwargs}
        if uses_d_state:
            params, _ = _signature_params(cls)
            p = params.get("d_state")
            if d_state is not None:
                kw["d_state"] = d_state
            elif p is not None and p.default is inspect.Parameter.empty:
                kw["d_state"] = DEFAULT_D_STATE
        _check_kwargs(cls, {"d_model": d_model, **kw}, cls.__name__)
        return cls(d_model, **kw)

    return make


def _make_attention(
    cls: type, d_model: int, d_state: Optional[int], kwargs: Dict[str, Any]
) -> nn.Module:
    kw = {"num_heads": 4, **kwargs}
    _check_kwargs(cls, {"dim": d_model, **kw}, cls.__name__)
    return cls(d_model, **kw)


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry.

    Attributes:
        name: canonical name (lower case).
        target: ``"package.module:Class"``, imported lazily.
        family: ``"LTI"``, ``"LTV"`` or ``"attention"``.
        paper: paper title.  arxiv: arXiv identifier (see :attr:`url`).
        supports_timesteps: whether ``integration_timesteps`` (event-driven, irregular sampling)
            is accepted.
        aliases: further names users may type (case-insensitive, ``_`` = ``-``).
        uses_d_state: False for models without a state size to choose (RG-LRU: one state per
            channel; attention), which ignore ``d_state``.
        defaults: constructor arguments applied before the user's ``mixer_kwargs``.
    """

    name: str
    target: str
    family: str
    paper: str
    arxiv: str
    supports_timesteps: bool
    aliases: Tuple[str, ...] = ()
    uses_d_state: bool = True
    defaults: Dict[str, Any] = field(default_factory=dict)
    make: Optional[_Make] = field(default=None, repr=False, compare=False)

    @property
    def url(self) -> str:
        return f"https://arxiv.org/abs/{self.arxiv}"

    def load(self) -> type:
        """Import and return the class (raises ImportError / AttributeError if it is missing)."""
        return _import_target(self.target)

    @property
    def available(self) -> bool:
        try:
            self.load()
        except Exception:  # a missing or half-written module: unavailable, whatever the error
            return False
        return True

    def builder(self, d_model: int, d_state: Optional[int] = None, **kwargs: Any) -> nn.Module:
        """The raw model: maps (d_model, d_state, **kwargs) to the class's own constructor."""
        return self._make(self.load(), d_model, d_state, kwargs)

    def _make(
        self, cls: type, d_model: int, d_state: Optional[int], kwargs: Dict[str, Any]
    ) -> nn.Module:
        make = self.make or _make_with_state(self.defaults, self.uses_d_state)
        return make(cls, d_model, d_state, kwargs)


def _spec(name, target, family, paper, arxiv, timesteps, aliases=(), **kw) -> ModelSpec:
    return ModelSpec(name, target, family, paper, arxiv, timesteps, tuple(aliases), **kw)


#: canonical name -> spec
MODEL_REGISTRY: Dict[str, ModelSpec] = {
    s.name: s
    for s in [
        _spec(
            "s4",
            "lrnnx.models.lti.s4:S4",
            "LTI",
            "Efficiently Modeling Long Sequences with Structured State Spaces",
            "2111.00396",
            False,
            defaults={"transposed": False},
        ),
        _spec(
            "s4d",
            "lrnnx.models.lti.s4d:S4D",
            "LTI",
            "On the Parameterization and Initialization of Diagonal State Space Models",
            "2206.11893",
            False,
            defaults={"transposed": False},
        ),
        _spec(
            "s5",
            "lrnnx.models.lti.s5:S5",
            "LTI",
            "Simplified State Space Layers for Sequence Modeling",
            "2208.04933",
            False,
            defaults={"discretization": "zoh"},
        ),
        _spec(
            "event-s5",
            "lrnnx.models.ltv.s5:S5",
            "LTV",
            "Scalable Event-by-event Processing of Neuromorphic Sensory Signals With Deep "
            "State-Space Models",
            "2404.18508",
            True,
            aliases=("s5-event",),
            defaults={"discretization": "async"},
        ),
        _spec(
            "lru",
            "lrnnx.models.lti.lru:LRU",
            "LTI",
            "Resurrecting Recurrent Neural Networks for Long Sequences",
            "2303.06349",
            False,
            # the paper's initialisation for long-range tasks: eigenvalues near the unit circle
            # with small phases.  The class's own defaults (the whole disk, phases up to 2 pi)
            # forget within a few steps and oscillate fast: a stacked LM built with them stayed
            # at chance on selective copying, with these it learns like S5
            defaults={"r_min": 0.9, "r_max": 0.999, "max_phase": math.pi / 10},
        ),
        _spec(
            "centaurus",
            "lrnnx.models.lti.centaurus:Centaurus",
            "LTI",
            "Let SSMs be ConvNets: State-space Modeling with Optimal Tensor Contractions",
            "2501.13230",
            False,
            defaults={"sub_state_dim": 4},
        ),
        _spec(
            "mamba",
            "lrnnx.models.ltv.mamba:Mamba",
            "LTV",
            "Mamba: Linear-Time Sequence Modeling with Selective State Spaces",
            "2312.00752",
            True,
            aliases=("s6",),
        ),
        _spec(
            "stream",
            "lrnnx.models.ltv.mamba:Mamba",
            "LTV",
            "STREAM: A Universal State-Space Model for Sparse Geometric Data",
            "2411.12603",
            True,
        ),
        _spec(
            "s7",
            "lrnnx.models.ltv.s7:S7",
            "LTV",
            "S7: Selective and Simplified State Space Layers for Sequence Modeling",
            "2410.03464",
            True,
        ),
        _spec(  # lrnnx's option beside the paper's version: rank-r input-dependent B_k, C_k
            "s7-lowrank",
            "lrnnx.models.ltv.s7:S7",
            "LTV",
            "S7 with rank-r input-dependent B and C (lrnnx's option beside the paper's S7)",
            "2410.03464",
            True,
            aliases=("s7-lr",),
            defaults={"bc_rank": "auto"},  # ceil(d_model / 16)
        ),
        _spec(
            "rglru",
            "lrnnx.models.ltv.rglru:RGLRU",
            "LTV",
            "Griffin: Mixing Gated Linear Recurrences with Local Attention for Efficient "
            "Language Models",
            "2402.19427",
            False,
            aliases=("rg-lru",),
            uses_d_state=False,
        ),
        _spec(
            "attn",
            "lrnnx.layers.mha:MHA",
            "attention",
            "Attention Is All You Need",
            "1706.03762",
            False,
            aliases=("mha",),
            uses_d_state=False,
            make=_make_attention,
        ),
    ]
}

#: every accepted spelling (lower case) -> canonical name
MODEL_ALIASES: Dict[str, str] = {
    **{n: n for n in MODEL_REGISTRY},
    **{a: s.name for s in MODEL_REGISTRY.values() for a in s.aliases},
}


def _normalise(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def resolve_name(name: str) -> str:
    """Canonical registry name for ``name`` (case-insensitive, ``_`` = ``-``).

    Raises:
        TypeError: name is not a string.  ValueError: unknown name (lists the valid ones).
    """
    if not isinstance(name, str):
        raise TypeError(f"name: expected a mixer name (str), got {type(name).__name__}")
    key = _normalise(name)
    if key not in MODEL_ALIASES:
        raise ValueError(f"mixer: unknown name {name!r}; expected one of {sorted(MODEL_ALIASES)}")
    return MODEL_ALIASES[key]


def get_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` of a name or alias (ValueError listing valid names if unknown)."""
    return MODEL_REGISTRY[resolve_name(name)]


def get_model_class(name: str) -> type:
    """The class behind a registry name/alias, or a ``"package.module:Class"`` path.

    Raises:
        ValueError: unknown name (the message lists the valid ones).
        ImportError: a known model whose module is not importable (yet).
    """
    if isinstance(name, str) and ":" in name:
        try:
            return _import_target(name)
        except (ImportError, AttributeError) as e:
            raise ImportError(f"mixer: cannot import {name!r}: {e}") from e
    spec = get_spec(name)
    try:
        return spec.load()
    except Exception as e:
        raise ImportError(
            f"mixer: {spec.name!r} ({spec.target}) is not available: {type(e).__name__}: {e}; "
            f"available: {available_models(include_attention=True)}"
        ) from e


def model_status() -> Dict[str, str]:
    """Canonical name -> ``"available"`` or ``"unavailable: <reason>"`` for every entry."""
    status = {}
    for name, spec in MODEL_REGISTRY.items():
        try:
            spec.load()
            status[name] = "available"
        except Exception as e:
            status[name] = f"unavailable: {type(e).__name__}: {e}"
    return status


def available_models(include_attention: bool = False) -> List[str]:
    """Canonical names of the recurrent models whose modules import (``"attn"`` too if asked)."""
    return [
        name
        for name, spec in MODEL_REGISTRY.items()
        if (include_attention or spec.family != "attention") and spec.available
    ]


def _spec_for_class(cls: type) -> Optional[ModelSpec]:
    path = class_path(cls)
    for spec in MODEL_REGISTRY.values():
        if spec.target == path:
            return spec
    return None


def _as_timesteps(ts: Any, batch: int, name: str = "integration_timesteps") -> Tensor:
    """A step's elapsed time as a (B,) tensor (accepts a number, (B,) or (B, 1))."""
    if isinstance(ts, (int, float)) and not isinstance(ts, bool):
        return torch.full((batch,), float(ts))
    if not isinstance(ts, Tensor) or not ts.is_floating_point():
        got = ts.dtype if isinstance(ts, Tensor) else type(ts).__name__
        raise TypeError(f"{name}: expected a number or a floating-point tensor, got {got}")
    if ts.shape not in ((batch,), (batch, 1)):
        raise ValueError(
            f"{name}: expected shape ({batch},) or ({batch}, 1), got {tuple(ts.shape)}"
        )
    return ts.reshape(batch)


class MixerAdapter(nn.Module):
    """Gives any lrnnx recurrent model the mixer protocol (see the module docstring).

    Args:
        model: the wrapped model (kept as ``.model``).
        d_model: its input/output width.
        name: registry name (for messages).
        family: ``"LTI"`` or ``"LTV"``; LTV models get (B, 1, H) inputs in ``step``.
        supports_timesteps: whether ``integration_timesteps`` may be passed on.
    """

    def __init__(
        self,
        model: nn.Module,
        d_model: int,
        name: str,
        family: str,
        supports_timesteps: bool,
    ) -> None:
        super().__init__()
        self.model = model
        self.d_model, self.name, self.family = d_model, name, family
        self.supports_timesteps = supports_timesteps
        fwd, fwd_varkw = _signature_params(model.forward)
        self._fwd_accepts = {
            k
            for k in ("integration_timesteps", "lengths", "inference_cache")
            if fwd_varkw or k in fwd
        }
        # packing must be explicit: a **kwargs forward could drop cu_seqlens and silently mix
        # the packed sequences
        if "cu_seqlens" in fwd:
            self._fwd_accepts.add("cu_seqlens")
        step, step_varkw = _signature_params(model.step)
        self._step_accepts_ts = "integration_timesteps" in step or step_varkw
        alloc, alloc_varkw = _signature_params(model.allocate_inference_cache)
        self._alloc_accepts = {k for k in ("max_seqlen", "dtype") if alloc_varkw or k in alloc}
        # models with a (B, H, L) layout (S4/S4D with transposed=True) are transposed around
        self._transposed = bool(getattr(model, "transposed", False))

    def extra_repr(self) -> str:
        return f"name={self.name!r}, family={self.family!r}"

    def reset_parameters(self) -> None:
        """Initialise the wrapped model again, as its construction does (see
        :meth:`lrnnx.core.base.LRNN.reset_parameters`)."""
        reset_submodules(self)

    @property
    def supports_cu_seqlens(self) -> bool:
        """Whether the wrapped model's forward takes packed sequences (``cu_seqlens``)."""
        return "cu_seqlens" in self._fwd_accepts

    def _check_packed(
        self, cu_seqlens: Optional[Tensor], lengths: Optional[Tensor], cache: Any
    ) -> None:
        """Errors for ``cu_seqlens`` the wrapped model cannot take (or with ``lengths``)."""
        if cu_seqlens is None:
            return
        if not self.supports_cu_seqlens:
            target = class_path(type(self.model))
            raise ValueError(
                f"cu_seqlens: the mixer {self.name!r} ({target}) does not take packed sequences "
                f"(its forward has no cu_seqlens); pad the batch and pass lengths instead"
            )
        if lengths is not None:
            raise ValueError(
                "lengths, cu_seqlens: pass one of them: packed sequences (cu_seqlens) have no "
                "padding, lengths marks the padding of a padded batch"
            )
        if cache is not None and "inference_cache" not in self._fwd_accepts:
            raise ValueError(
                f"inference_cache: the mixer {self.name!r} prefills a cache step by step, which "
                "has no packed form; pass cu_seqlens=None with a cache (a padded batch with "
                "lengths)"
            )

    def _timesteps_error(self) -> ValueError:
        event = [n for n, s in MODEL_REGISTRY.items() if s.supports_timesteps]
        return ValueError(
            f"integration_timesteps: {self.name} has no event-driven mode; pass None, or use "
            f"one of {event}"
        )

    def forward(
        self,
        x: Tensor,
        integration_timesteps: Optional[Tensor] = None,
        lengths: Optional[Tensor] = None,
        inference_cache: Optional[Dict[str, Any]] = None,
        *,
        cu_seqlens: Optional[Tensor] = None,
    ) -> Tensor:
        """(B, L, D) -> (B, L, D); see the mixer protocol.

        ``cu_seqlens`` (S + 1,): x is (1, T, D) holding S packed sequences; passed on to the
        model (ValueError naming the mixer if its forward does not take it, or with
        ``lengths``).  For (B, H, L) models the packed row is transposed like any other.
        """
        check_sequence(x, self.d_model)
        B, L, _ = x.shape
        ts = integration_timesteps
        if ts is not None and not self.supports_timesteps:
            raise self._timesteps_error()
        self._check_packed(cu_seqlens, lengths, inference_cache)
        if inference_cache is not None and "inference_cache" not in self._fwd_accepts:
            return self._prefill_by_steps(x, ts, lengths, inference_cache)
        kwargs: Dict[str, Any] = {}
        if ts is not None:
            kwargs["integration_timesteps"] = ts
        mask = None
        if lengths is not None:
            if "lengths" in self._fwd_accepts:
                kwargs["lengths"] = lengths
            else:
                # a causal model without lengths: zero the padding and the padded outputs
                mask = lengths_mask(lengths, B, L, x.device)
                x = zero_where_not(x, mask[..., None])
        if inference_cache is not None:
            kwargs["inference_cache"] = inference_cache
        if cu_seqlens is not None:
            kwargs["cu_seqlens"] = cu_seqlens
        y = self.model(x.transpose(1, 2) if self._transposed else x, **kwargs)
        if isinstance(y, (tuple, list)):
            y = y[0]  # (y, state) outputs
        if self._transposed:
            y = y.transpose(1, 2)
        if mask is not None:
            y = zero_where_not(y, mask[..., None])
        return y

    def _prefill_by_steps(
        self, x: Tensor, ts: Optional[Tensor], lengths: Optional[Tensor], cache: Dict[str, Any]
    ) -> Tensor:
        """Prefill for models whose forward takes no cache: run ``step`` over the sequence.

        With ``lengths``, each sequence's state is frozen past its own length (every cache
        tensor with a leading batch dimension is restored where the position is padding).
        """
        B, L, _ = x.shape
        mask = lengths_mask(lengths, B, L, x.device)
        ys = []
        for t in range(L):
            saved = None
            if mask is not None:
                saved = {
                    k: v.clone()
                    for k, v in cache.items()
                    if isinstance(v, Tensor) and v.dim() and v.shape[0] == B
                }
            y_t, _ = self.step(x[:, t], cache, None if ts is None else ts[:, t])
            if saved:
                for k, old in saved.items():
                    keep = mask[:, t].view(B, *([1] * (old.dim() - 1)))
                    cache[k].copy_(torch.where(keep, cache[k], old))
            ys.append(y_t)
        y = torch.stack(ys, dim=1) if ys else x.new_zeros(B, 0, self.d_model)
        if mask is not None:
            y = zero_where_not(y, mask[..., None])
        return y

    def step(
        self,
        x: Tensor,
        inference_cache: Dict[str, Any],
        integration_timesteps: Optional[Union[Tensor, float]] = None,
    ) -> Tuple[Tensor, Dict[str, Any]]:
        """x (B, D) (or (B, 1, D)) -> (y (B, D) (or (B, 1, D)), cache); the cache is updated
        in place."""
        x2 = check_step_input(x, self.d_model)
        B = x2.shape[0]
        ts = integration_timesteps
        if ts is not None and not self.supports_timesteps:
            raise self._timesteps_error()
        xin = x2[:, None] if self.family == "LTV" else x2
        if ts is not None:
            if not self._step_accepts_ts:
                raise self._timesteps_error()
            out = self.model.step(
                xin, inference_cache, integration_timesteps=_as_timesteps(ts, B).to(x2.device)
            )
        else:
            out = self.model.step(xin, inference_cache)
        y = out[0] if isinstance(out, (tuple, list)) else out
        return step_output(y.reshape(B, self.d_model), x), inference_cache

    def allocate_inference_cache(
        self, batch_size: int, max_seqlen: int = 1, dtype: Optional[torch.dtype] = None
    ) -> Dict[str, Any]:
        """The wrapped model's cache (``max_seqlen``/``dtype`` passed where it takes them)."""
        check_batch_size(batch_size)  # 0: an empty cache, as every model allocates
        kwargs: Dict[str, Any] = {}
        if "max_seqlen" in self._alloc_accepts:
            kwargs["max_seqlen"] = max_seqlen
        if "dtype" in self._alloc_accepts:
            kwargs["dtype"] = dtype
        return self.model.allocate_inference_cache(batch_size, **kwargs)


def build_mixer(
    name_or_class: Union[str, type],
    d_model: int,
    d_state: Optional[int] = None,
    bidirectional: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Build a sequence mixer that follows the mixer protocol.

    Example:
        >>> mixer = build_mixer("s5", d_model=64, d_state=64, conj_sym=True)
        >>> y = mixer(torch.randn(2, 128, 64))
        >>> attn = build_mixer("attn", 64, num_heads=8)
        >>> bi = build_mixer("mamba", 64, 16, bidirectional=True)  # non-causal, no step()

    Args:
        name_or_class: a registry name/alias (case-insensitive), a ``"package.module:Class"``
            path, or a class.
        d_model: input/output width.
        d_state: state size (None: the model's default; ignored by RG-LRU and attention).
        bidirectional: build two independent mixers (same arguments, own parameters) and wrap
            them in :class:`lrnnx.layers.Bidirectional`: y = fwd(x) + R(bwd(R(x))), R reversing
            each sequence within its length.  Non-causal; it has no ``step``/cache.  For
            attention that is two causal MHAs unless ``causal=False`` is passed (a single
            ``build_mixer("attn", d, causal=False)`` is the usual bidirectional attention).
        **kwargs: further constructor arguments of the model (``d_model``/``d_state`` must not
            be repeated here).

    Returns:
        :class:`lrnnx.layers.MHA` for attention, else the model wrapped in :class:`MixerAdapter`;
        with ``bidirectional``, two of those in :class:`lrnnx.layers.Bidirectional`.
    """
    if not isinstance(bidirectional, bool):
        raise TypeError(f"bidirectional: expected a bool, got {bidirectional!r}")
    if bidirectional:
        from lrnnx.layers.bidirectional import Bidirectional

        return Bidirectional(
            build_mixer(name_or_class, d_model, d_state, **kwargs),
            build_mixer(name_or_class, d_model, d_state, **kwargs),
        )
    _positive_int("d_model", d_model)
    if d_state is not None:
        _positive_int("d_state", d_state)
    for key in ("dim",):  # d_model / d_state cannot reach kwargs (they are named parameters)
        if key in kwargs:
            raise ValueError(
                f"mixer_kwargs: {key!r} is given twice; pass d_model/d_state once, as the "
                f"arguments of build_mixer (or of the architecture)"
            )
    if isinstance(name_or_class, str) and ":" not in name_or_class:
        spec = get_spec(name_or_class)
        cls = get_model_class(spec.name)
    else:
        cls = get_model_class(name_or_class) if isinstance(name_or_class, str) else name_or_class
        if not isinstance(cls, type):  # a class (or a factory class such as Centaurus)
            raise TypeError(f"name_or_class: expected a mixer name or a class, got {cls!r}")
        spec = _spec_for_class(cls)
        mha_cls = get_model_class("attn")
        if spec is None and issubclass(cls, mha_cls):
            spec = MODEL_REGISTRY["attn"]
    if spec is not None:
        model = spec._make(cls, d_model, d_state, kwargs)
        name, family = spec.name, spec.family
        supports_ts = spec.supports_timesteps
    else:
        from lrnnx.models.ltv.base import LTV_LRNN

        model = _make_with_state({})(cls, d_model, d_state, kwargs)
        name = cls.__name__
        family = "LTV" if isinstance(model, LTV_LRNN) else "LTI"
        fwd, varkw = _signature_params(model.forward)
        supports_ts = family == "LTV" and ("integration_timesteps" in fwd or varkw)
    if family == "attention":
        return model
    for method in ("forward", "step", "allocate_inference_cache"):
        if not callable(getattr(model, method, None)):
            raise TypeError(f"name_or_class: {name} has no {method}() and cannot be a mixer")
    d_out = getattr(model, "d_output", d_model)
    if d_out != d_model:
        raise ValueError(
            f"mixer_kwargs: {name} built with these arguments outputs {d_out} features, but a "
            f"mixer must map d_model = {d_model} to {d_model} (e.g. Centaurus mode='full' "
            f"outputs d_state features: use d_state = d_model or another mode)"
        )
    return MixerAdapter(model, d_model, name, family, supports_ts)


__all__ = [
    "DEFAULT_D_STATE",
    "MODEL_ALIASES",
    "MODEL_REGISTRY",
    "MixerAdapter",
    "ModelSpec",
    "available_models",
    "build_mixer",
    "class_path",
    "get_model_class",
    "get_spec",
    "model_status",
    "resolve_name",
]

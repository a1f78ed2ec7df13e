"""The root class of every lrnnx model."""

from __future__ import annotations

import contextlib
import functools
import inspect
from abc import abstractmethod
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from lrnnx.core.checks import check_factory_arguments
from lrnnx.core.discretization import DISCRETIZATIONS, get_discretization


@functools.cache
def _abstract_methods(cls: type) -> Tuple[str, ...]:
    """The methods ``cls`` leaves abstract (marked ``@abstractmethod`` and not overridden)."""
    names = {n for c in cls.__mro__ for n, v in vars(c).items() if callable(v)}
    return tuple(sorted(n for n in names if getattr(getattr(cls, n), "__isabstractmethod__", 0)))


def not_implemented(model: nn.Module, method: str) -> NotImplementedError:
    """The error an interface class's abstract method raises when called on the class itself."""
    return NotImplementedError(
        f"{type(model).__name__}.{method} is abstract: implement it in a subclass"
    )


@contextlib.contextmanager
def _initial_value_dtype(dtype: Optional[torch.dtype] = None) -> Iterator[None]:
    """Draw initial values in ``dtype`` (a reset: the model's own precision, float32 or
    float64), else in float32 while torch's default dtype is 16-bit (as the float32 model
    draws them; a 16-bit draw would round them before any cast), else in the default."""
    default = torch.get_default_dtype()
    if dtype is None:
        dtype = torch.float32 if default in (torch.float16, torch.bfloat16) else default
    if dtype != default:
        torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        if dtype != default:
            torch.set_default_dtype(default)


def assign_(target: Tensor, value: Tensor) -> None:
    """``target.copy_(value)`` (under no_grad) for initial values computed as a plain tensor,
    also where ``target`` is a DTensor (a parameter sharded by FSDP2 or tensor parallelism,
    materialised from the meta device): ``value`` is then distributed like ``target``, from
    process 0's draw, so every process holds shards of one tensor."""
    with torch.no_grad():
        if _is_dtensor(target):
            from torch.distributed.tensor import distribute_tensor

            mesh = target.device_mesh
            value = value.to(device=mesh.device_type, dtype=target.dtype)
            value = distribute_tensor(value, mesh, target.placements)
        target.copy_(value)


def _is_dtensor(t: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without distributed support
        return False
    return isinstance(t, DTensor)


def reset_module_tree(module: nn.Module) -> None:
    """Initialise ``module`` and everything under it again, as its construction does: an
    lrnnx model's :meth:`LRNN.reset_parameters` covers its subtree; any other module with a
    ``reset_parameters`` resets itself, and its children are visited in turn."""
    if isinstance(module, LRNN):
        module.reset_parameters()
        return
    reset = getattr(module, "reset_parameters", None)
    if callable(reset):
        reset()
    for child in module.children():
        reset_module_tree(child)


def reset_submodules(module: nn.Module) -> None:
    """:func:`reset_module_tree` of each of ``module``'s children (under no_grad): the
    ``reset_parameters`` of a module that holds no tensor of its own (a wrapper, an
    architecture) or that draws its own after its children's."""
    with torch.no_grad():
        for child in module.children():
            reset_module_tree(child)


def _settling(init: Callable[..., None]) -> Callable[..., None]:
    """``init`` (a model class's own ``__init__``) followed, once the outermost wrapped
    ``__init__`` of a construction returns, by :meth:`LRNN._settle`.  Every wrapped ``__init__``
    of the chain notes whether it was given a ``dtype`` or ``device`` (by keyword or position, by
    the user or by a subclass's ``super().__init__``): those win over torch's defaults.  Under a
    16-bit default dtype the model is built in float32 (its initial values drawn as the float32
    model's, not rounded to 16 bits) and then cast.  Wrapped with functools.wraps, so
    ``inspect.signature`` of the class still shows its arguments.

    An ``__init__`` without ``device``/``dtype`` arguments (nor ``**kwargs``) gets them as
    keyword-only ones, torch's factory arguments as every layer takes them (see
    :func:`factory_construction`), whoever passes them (the user, or a subclass's
    ``super().__init__``)."""
    signature = inspect.signature(init)
    params = signature.parameters
    adds_factory = not ({"device", "dtype"} & set(params)) and not any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()
    )

    @functools.wraps(init)
    def __init__(self: LRNN, *args: Any, **kwargs: Any) -> None:
        # (the instance's __dict__: nn.Module's attribute machinery is not set up yet)
        outermost = "_building" not in self.__dict__
        building = self.__dict__.setdefault(
            "_building", {"depth": 0, "given": set(), "factory": {}}
        )
        factory: Dict[str, Any] = {}
        if adds_factory:
            factory = check_factory_arguments(
                type(self).__name__, kwargs.pop("device", None), kwargs.pop("dtype", None)
            )
            building["factory"].update(factory)
        building["depth"] += 1
        passed = _factory_arguments(signature, self, args, kwargs)
        building["given"] |= set(passed)
        default = torch.get_default_dtype()
        # a device the __init__ takes itself: its tensors made without one go there too (built
        # under that device, whatever the default: torch.device("meta") around device="cpu")
        device = None if "device" not in passed else _device_of(passed["device"])
        try:
            with contextlib.ExitStack() as stack:
                if outermost:
                    stack.enter_context(_initial_value_dtype())
                stack.enter_context(factory_construction(factory))
                if device is not None:
                    stack.enter_context(device)
                init(self, *args, **kwargs)
        finally:
            building["depth"] -= 1
            if building["depth"] == 0:
                del self.__dict__["_building"]
        if building["depth"] == 0:
            given = building["given"] | set(building["factory"])
            self._settle(None if "dtype" in given else default, "device" not in given)
            if building["factory"]:
                self.to(**building["factory"])

    if adds_factory:
        __init__.__signature__ = _with_factory_parameters(signature)  # type: ignore[attr-defined]
    __init__._settles = True  # type: ignore[attr-defined]
    return __init__


def _with_factory_parameters(signature: inspect.Signature) -> inspect.Signature:
    """``signature`` with keyword-only ``device=None, dtype=None`` appended."""
    factory = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None)
        for name in ("device", "dtype")
    ]
    return signature.replace(parameters=[*signature.parameters.values(), *factory])


@contextlib.contextmanager
def factory_construction(factory: Dict[str, Any]) -> Iterator[None]:
    """Build under checked factory arguments (:func:`lrnnx.core.checks.check_factory_arguments`):
    tensors are created on ``device`` (whatever the default device, e.g. inside
    ``with torch.device("meta")``) and initial values drawn in float64 for ``dtype`` float64,
    else in float32; the caller then moves and casts the model with ``.to(**factory)``, which
    applies the precision policy."""
    with contextlib.ExitStack() as stack:
        if factory.get("dtype") is not None:
            wide = factory["dtype"] == torch.float64
            stack.enter_context(_initial_value_dtype(torch.float64 if wide else torch.float32))
        if factory.get("device") is not None:
            stack.enter_context(factory["device"])
        yield


def with_factory_arguments(init: Callable[..., None]) -> Callable[..., None]:
    """An ``__init__`` (of a module that is not an :class:`LRNN`, e.g. an architecture or
    attention) taking torch's factory arguments ``device`` and ``dtype`` as keyword-only ones:
    built as :func:`factory_construction` says, then ``.to(device, dtype)``.

    Raises:
        TypeError: ``dtype`` not a floating-point torch.dtype.
        ValueError: ``device`` not a device.
    """

    @functools.wraps(init)
    def __init__(self: nn.Module, *args: Any, device: Any = None, dtype: Any = None, **kwargs):
        factory = check_factory_arguments(type(self).__name__, device, dtype)
        with factory_construction(factory):
            init(self, *args, **kwargs)
        if factory:
            self.to(**factory)

    __init__.__signature__ = _with_factory_parameters(inspect.signature(init))  # type: ignore
    return __init__


def _factory_arguments(
    signature: inspect.Signature, self: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]
) -> Dict[str, Any]:
    """The ``dtype``/``device`` a call of an ``__init__`` with ``signature`` passes (not None),
    by position, keyword or through its ``**kwargs``: name -> value."""
    try:
        bound = signature.bind(self, *args, **kwargs)
    except TypeError:  # the call itself will say what is wrong
        return {}
    given = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        pairs = value.items() if kind is inspect.Parameter.VAR_KEYWORD else [(name, value)]
        given.update({n: v for n, v in pairs if n in ("dtype", "device") and v is not None})
    return given


def _device_of(value: Any) -> Optional[torch.device]:
    """``value`` as a torch.device, or None where torch does not take it as one (the model's
    own check then names it)."""
    try:
        return torch.device(value)
    except (RuntimeError, TypeError):
        return None


def _default_device() -> torch.device:
    """The device a factory call without ``device=`` uses now: ``torch.set_default_device``'s or
    an enclosing ``with torch.device(...)``'s.  ``torch.get_default_device()`` saw the latter
    only from torch 2.8 on (before, it said "cpu" inside ``with torch.device("meta")``); an
    empty tensor's device is right in every version."""
    return torch.empty(0).device


class LRNN(nn.Module):
    """Base class of all linear RNNs.

    Holds the discretization rule, chosen by name from
    :data:`lrnnx.core.discretization.DISCRETIZATIONS` (``None`` for models that discretize
    internally).  Subclasses implement ``forward`` (parallel, over a whole sequence),
    ``step`` (one timestep, for inference) and ``allocate_inference_cache``.

    Precision policy for whole-model casts: the parameters and buffers a model holds itself
    (eigenvalues, steps, input/output matrices of the recurrence: the spectral parameters) stay
    float32 (complex64) under ``model.half()``, ``model.bfloat16()`` or ``model.to(dtype)`` with a
    16-bit dtype, while its projection layers (``nn.Linear``, convolutions, norms: submodules)
    take the new dtype; the model then returns outputs in its input's dtype and keeps its state
    in float32.  ``model.double()`` / ``model.to(torch.float64)`` makes every tensor float64
    (complex128), so the whole computation runs in float64.

    Interface classes (this one, :class:`lrnnx.models.lti.LTI_LRNN` and
    :class:`lrnnx.models.ltv.LTV_LRNN`, marked by ``_interface = True`` in their own body) can be
    instantiated, as in the original lrnnx (``LTI_LRNN("zoh")``); their abstract methods raise
    NotImplementedError.  Any other class must implement every abstract method: instantiating
    one that does not raises TypeError naming them, as :mod:`abc` does.
    """

    _interface = True
    #: discretizations this class accepts; subclasses narrow it
    allowed_discretizations: Tuple[str, ...] = tuple(DISCRETIZATIONS)
    #: submodules that belong to the recurrence itself (e.g. S7's step projections): their
    #: tensors follow the precision policy of the model's own tensors (see the class docstring)
    _spectral_submodules: Tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = vars(cls).get("__init__")
        if init is not None and not getattr(init, "_settles", False):
            cls.__init__ = _settling(init)  # type: ignore[method-assign]

    def __new__(cls, *args: Any, **kwargs: Any):
        if not vars(cls).get("_interface", False):
            missing = _abstract_methods(cls)
            if missing:
                raise TypeError(
                    f"Can't instantiate {cls.__name__}: it leaves the abstract method(s) "
                    f"{', '.join(missing)} unimplemented"
                )
        return super().__new__(cls)

    def __init__(self, discretization: Optional[str]):
        super().__init__()
        self.discretization = discretization
        self.discretize_fn = (
            None
            if discretization is None
            else get_discretization(discretization, self.allowed_discretizations)
        )

    def extra_repr(self) -> str:
        """The sizes and rules that tell one model from another in ``print(model)``."""
        parts = [
            f"{name}={value}"
            for name in ("d_model", "d_state", "sub_state_dim", "expand")
            if isinstance(value := getattr(self, name, None), int) and not isinstance(value, bool)
        ]
        if self.discretization is not None:
            parts.append(f"discretization={self.discretization!r}")
        mode = getattr(self, "_mode", None)
        if mode is not None:
            parts.append(f"mode={mode!r}")
        return ", ".join(parts)

    def _step_records_graph(self) -> bool:
        """Whether ``step`` runs on the parameters as they are now, in autograd's graph: grad
        mode is on and a parameter of the model requires grad.  Without autograd the models
        whose caches hold derived constants step on those (cheaper: nothing is re-derived)."""
        return torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())

    # ---- initialisation ----------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """Initialise the model again, as its construction does: every parameter and buffer,
        its submodules' included, is drawn anew from its paper's scheme (HiPPO or ring
        spectra, step sizes log-uniform in [dt_min, dt_max], ...), in place: each tensor keeps
        its identity, dtype and device (an optimizer, a state_dict or a sharding holding it
        stays valid), and what the model derived from the old values (S4's attuned C, cached
        step constants) is discarded.

        This is torch's convention for materialising a model built on the meta device
        (``model.to_empty(device=...)`` then ``reset_parameters``), and a submodule that
        initialises differently from its torch class (Mamba's dt projection, RG-LRU's
        LeCun-normal projections) resets itself the same way, so calling ``reset_parameters``
        on every module (FSDP's materialisation, ``for m in model.modules(): ...``) gives the
        same distributions.  Values are drawn in the model's precision (float64 for a float64
        model, else float32, whatever torch's default dtype).

        Raises:
            NotImplementedError: a subclass that holds tensors itself but draws them in its
                ``__init__`` only (implement :meth:`_init_parameters` for them, or
                ``reset_parameters``).
        """
        with _initial_value_dtype(self._precision), torch.no_grad():
            self._reset_parameters()

    def _reset_parameters(self) -> None:
        """The submodules' initialisation, then the model's own tensors'
        (:meth:`_init_parameters`).  Runs under no_grad."""
        # (own buffers alone, constants a subclass derives from its sizes, need no reset)
        own = list(self.parameters(recurse=False))
        if own and type(self)._init_parameters is LRNN._init_parameters:
            raise NotImplementedError(
                f"{type(self).__name__}.reset_parameters: the model holds tensors of its own "
                f"({', '.join(n for n, _ in self.named_parameters(recurse=False))}) that only "
                "its __init__ draws; implement _init_parameters (creating them with "
                "self._set_parameter, called from __init__ too) or reset_parameters"
            )
        reset_submodules(self)
        self._init_parameters()

    def _init_parameters(self) -> None:
        """Create (at construction) or draw again (at a reset) the tensors the model holds
        itself, through :meth:`_set_parameter`; a model without any leaves this as is."""

    def _set_parameter(self, name: str, value: Tensor) -> None:
        """Register ``value`` as the parameter ``name`` at construction; at a reset, copy it
        into the existing parameter or buffer of that name (its dtype, device, identity and
        attributes such as optimizer hints stay)."""
        existing = self._parameters.get(name, self._buffers.get(name))
        if existing is None:
            self.register_parameter(name, nn.Parameter(value))
        else:
            assign_(existing, value)

    def _settle(self, dtype: Optional[torch.dtype], by_default_device: bool) -> None:
        """Put a newly built model where torch's factory defaults say, as a torch layer would be:
        built under ``torch.set_default_dtype(dt)`` it is the model ``.to(dt)`` gives (float64
        end to end; under a 16-bit default its own tensors stay float32, the precision policy
        above), and built under a default device (``with torch.device("meta")``,
        ``torch.set_default_device``) every tensor is there, those initialised off-device (the
        HiPPO matrices, computed on the CPU) included.  An explicit ``dtype``/``device`` argument
        of the model's constructor wins over the default (``dtype`` None: one was given;
        otherwise the default dtype at construction)."""
        if dtype is not None and dtype != torch.float32:
            self.to(dtype)
        if by_default_device:
            # only what was built on the CPU against a default elsewhere moves: tensors a
            # framework put on the meta device itself (accelerate's init_empty_weights keeps
            # torch's default device) stay there
            device = _default_device()
            if device.type != "cpu":
                tensors = [*self.parameters(), *self.buffers()]
                if any(t.device.type == "cpu" for t in tensors):
                    self._apply(lambda t: t.to(device) if t.device.type == "cpu" else t)

    def _own_tensors(self) -> Tuple[list, list]:
        """The parameters and buffers the precision policy keeps in float32 under 16-bit
        casts: the model's own and those of its :attr:`_spectral_submodules`."""
        params = [t for t in self._parameters.values() if t is not None]
        buffers = [t for t in self._buffers.values() if t is not None]
        for name in self._spectral_submodules:
            params += list(getattr(self, name).parameters())
            buffers += list(getattr(self, name).buffers())
        return params, buffers

    @property
    def _precision(self) -> torch.dtype:
        """The real dtype the recurrence computes in: float64 for a float64 model (its own
        tensors float64 / complex128), else float32 (16-bit casts keep them float32).  Read off
        the first own parameter (the policy casts them together): step calls this."""
        for t in self._parameters.values():
            if t is not None and (t.is_floating_point() or t.is_complex()):
                wide = t.dtype in (torch.float64, torch.complex128)
                return torch.float64 if wide else torch.float32
        params, buffers = self._own_tensors()
        wide = any(t.dtype in (torch.float64, torch.complex128) for t in params + buffers)
        return torch.float64 if wide else torch.float32

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True):
        """``nn.Module._apply`` with the precision policy above for the model's own tensors."""
        params, buffers = self._own_tensors()
        own = {id(t) for t in params + buffers}
        own |= {id(t.grad) for t in params if t.grad is not None}
        if not own:
            return super()._apply(fn, recurse)
        probe: Dict[torch.device, Tensor] = {}

        def target(t: Tensor) -> Tensor:
            """What a float32 tensor on t's device becomes under fn (computed once per device)."""
            if t.device not in probe:
                probe[t.device] = fn(torch.zeros((), dtype=torch.float32, device=t.device))
            return probe[t.device]

        def keep_precision(t: Tensor) -> Tensor:
            if id(t) not in own or not (t.is_floating_point() or t.is_complex()):
                return fn(t)
            p = target(t)
            if not p.is_floating_point():
                return fn(t)
            # a meta tensor has no values to copy: fn places it (``to_empty`` included, which
            # .to() cannot do from meta), then it takes the policy's dtype
            meta = t.device.type == "meta"
            wide = p.dtype == torch.float64
            if t.is_complex():  # torch would drop the imaginary part or keep complex64
                want = torch.complex128 if wide else torch.complex64
                if meta:
                    r = fn(t)
                    return r.to(want) if r.is_complex() else torch.empty_like(r, dtype=want)
                return t.to(device=p.device, dtype=want)
            if p.dtype in (torch.float16, torch.bfloat16):  # move, but stay float32
                return (
                    fn(t).to(torch.float32) if meta else t.to(device=p.device, dtype=torch.float32)
                )
            return fn(t)

        return super()._apply(keep_precision, recurse)

    def _empty_output(self, x: Tensor, d_out: Optional[int] = None) -> Tensor:
        """The output for an empty batch or sequence (B = 0 or L = 0): zeros (B, L, d_out),
        in the graph of x and the parameters (see :func:`empty_in_graph`)."""
        d_out = getattr(self, "d_model", x.shape[-1]) if d_out is None else d_out
        return empty_in_graph(x, (x.shape[0], x.shape[1], d_out), self)

    @abstractmethod
    def forward(self, x: Tensor, *args, **kwargs):
        """Process a whole sequence x of shape (B, L, H)."""
        raise not_implemented(self, "forward")

    @abstractmethod
    def step(self, x: Tensor, inference_cache: Dict[str, Any], **kwargs):
        """Advance the recurrence by one timestep."""
        raise not_implemented(self, "step")

    @abstractmethod
    def allocate_inference_cache(
        self, batch_size: int, max_seqlen: int = 1, dtype=None, **kwargs
    ) -> Dict[str, Any]:
        """Create the state (and precomputed matrices) that ``step`` updates."""
        raise not_implemented(self, "allocate_inference_cache")


def keep_recurrence_precision(module: nn.Module) -> None:
    """Apply the precision policy of :class:`LRNN` to tensors put in place directly (not by a
    cast): every LRNN in ``module`` gets its own 16-bit floating tensors back in float32 (a
    lossless widening), as a cast to that dtype would have left them.  Used after loading a
    checkpoint whose file holds those tensors in 16 bits."""
    for m in module.modules():
        if isinstance(m, LRNN):
            params, buffers = m._own_tensors()
            for t in params + buffers:
                if t.dtype in (torch.float16, torch.bfloat16):
                    t.data = t.data.float()


def empty_in_graph(x: Tensor, shape: Sequence[int], module: nn.Module) -> Tensor:
    """An empty output of ``shape`` (one dimension 0) in x's dtype, attached to the graph of x
    and of ``module``'s trainable parameters when autograd records: a loss over it backpropagates
    (zero gradients), as through any layer on an empty batch, instead of failing with "element 0
    of tensors does not require grad"."""
    y = x.new_zeros(shape)
    if not torch.is_grad_enabled():
        return y
    terms = [t.sum() for t in (x, *module.parameters()) if t.requires_grad]
    if not terms:
        return y
    # the sum is broadcast into no element: its value (even a NaN) never shows
    link = torch.stack([(t.real if t.is_complex() else t).float() for t in terms]).sum() * 0
    return y + link.to(device=y.device, dtype=y.dtype)

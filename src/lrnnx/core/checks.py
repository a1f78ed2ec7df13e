"""Input validation shared by every model: clear errors instead of silent broadcasts."""

from __future__ import annotations

import math
import numbers
import os
import sys
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch
from torch import Tensor


def check_sequence(x: Tensor, d_model: int, name: str = "x") -> None:
    """Require a floating tensor of shape (B, L, d_model)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    if x.dim() != 3 or x.shape[-1] != d_model:
        raise ValueError(
            f"{name}: expected shape (B, L, {d_model}) = (batch, length, d_model), "
            f"got {tuple(x.shape)}"
        )


def check_step_input(x: Tensor, d_model: int, name: str = "x") -> Tensor:
    """Accept (B, H) or (B, 1, H) for one step; return (B, H)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    if x.dim() == 3 and x.shape[1] == 1:
        x = x[:, 0]
    if x.dim() != 2 or x.shape[-1] != d_model:
        raise ValueError(
            f"{name}: expected shape (B, {d_model}) or (B, 1, {d_model}), got {tuple(x.shape)}"
        )
    return x


def check_dtype_argument(dtype: Any, owner: str = "") -> Optional[torch.dtype]:
    """A constructor's ``dtype`` factory argument: None or a floating-point torch.dtype.

    Raises:
        TypeError: anything else (an integer or complex dtype, a string, ...).
    """
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        prefix = f"{owner}: " if owner else ""
        raise TypeError(
            f"{prefix}dtype: expected None or a floating-point torch.dtype, got {dtype!r}"
        )
    return dtype


def check_factory_arguments(owner: str, device: Any = None, dtype: Any = None) -> Dict[str, Any]:
    """torch's factory arguments given to ``owner``'s constructor, checked: the given ones
    ({"device": torch.device, "dtype": a floating-point torch.dtype}).

    Raises:
        TypeError: ``dtype`` not a floating-point torch.dtype.
        ValueError: ``device`` not a device.
    """
    out: Dict[str, Any] = {}
    if check_dtype_argument(dtype, owner) is not None:
        out["dtype"] = dtype
    if device is not None:
        try:
            out["device"] = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(
                f"{owner}: device: expected a torch.device or a name such as 'cpu' or "
                f"'cuda:0', got {device!r}"
            ) from e
    return out


def step_output(y: Tensor, x: Any) -> Tensor:
    """A step's output (B, H_out) in its input's layout: (B, 1, H_out) for an x (B, 1, H), as
    forward keeps (B, L, H), so a loop over ``x[:, t : t + 1]`` gets what it gave."""
    return y.unsqueeze(1) if isinstance(x, Tensor) and x.dim() == 3 else y


def as_lengths(lengths: Any, batch: int, seqlen: int, device=None) -> Optional[Tensor]:
    """Validate ``lengths`` (a (B,) integer tensor, list or array, or one Python int for
    every sequence, as state-spaces/s4 takes it) and return it as a (B,) tensor.

    Raises TypeError for a non-integer dtype and ValueError for a wrong shape or a value
    outside [0, seqlen].  ``device`` moves the result (default: where it is).
    """
    if lengths is None:
        return None
    if isinstance(lengths, numbers.Integral) and not isinstance(lengths, bool):
        lengths = torch.full((batch,), int(lengths), dtype=torch.int64)
    if not isinstance(lengths, Tensor):
        try:
            lengths = torch.as_tensor(lengths)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(
                f"lengths: expected a (B,) integer tensor or list, got {type(lengths).__name__}"
            ) from e
        if lengths.numel() == 0:  # [] (an empty batch) becomes float32: no values, no dtype
            lengths = lengths.long()
    if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
        raise TypeError(f"lengths: expected an integer tensor, got dtype {lengths.dtype}")
    if lengths.shape != (batch,):
        raise ValueError(f"lengths: expected shape ({batch},), got {tuple(lengths.shape)}")
    if batch and not _compiling() and (bool((lengths < 0).any()) or bool((lengths > seqlen).any())):
        raise ValueError(
            f"lengths: expected values in [0, {seqlen}], got min {int(lengths.min())} "
            f"max {int(lengths.max())}"
        )
    return lengths if device is None else lengths.to(device)


def lengths_mask(lengths: Any, batch: int, seqlen: int, device=None) -> Optional[Tensor]:
    """Validate ``lengths`` (B,) and return a (B, L) boolean mask of valid positions (or None)."""
    lengths = as_lengths(lengths, batch, seqlen)
    if lengths is None:
        return None
    pos = torch.arange(seqlen, device=lengths.device)
    return (pos[None, :] < lengths[:, None]).to(device)


def zero_where_not(x: Tensor, keep: Tensor) -> Tensor:
    """x where ``keep`` (a boolean mask broadcastable to x) holds, else 0.

    Padding is removed with a select, never by multiplying with the mask: NaN * 0 is NaN, so a
    multiplied-out NaN or inf in the padding would still reach the outputs.
    """
    return torch.where(keep, x, x.new_zeros(()))


def check_tensor(
    name: str,
    x: object,
    device: Optional[torch.device] = None,
    complex_ok: bool = False,
    device_of: str = "x",
) -> Tensor:
    """Require a real floating-point tensor (or, with ``complex_ok``, a complex one), on
    ``device`` when given: the device of the op's first argument, named ``device_of``.

    Raises:
        TypeError: not a tensor, or another dtype.
        ValueError: on another device.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not (x.is_floating_point() or (complex_ok and x.is_complex())):
        kind = "floating-point or complex" if complex_ok else "real floating-point"
        raise TypeError(f"{name}: expected a {kind} tensor, got dtype {x.dtype}")
    if device is not None and x.device != device:
        raise ValueError(
            f"{name}: expected a tensor on {device_of}'s device {device}, got {x.device}"
        )
    return x


def check_input_dtype(x: Tensor, expected: torch.dtype, name: str = "x") -> None:
    """Require ``x`` in the dtype of the model's projection weights, unless autocast is on.

    ``nn.Linear`` and friends need their input in their own dtype; without this check a
    mismatch surfaces deep inside torch as "expected m1 and m2 to have the same dtype".
    """
    if x.dtype == expected or _autocast_enabled(x.device.type):
        return
    raise TypeError(
        f"{name}: expected dtype {expected} (the dtype of the model's weights), got {x.dtype}; "
        f"cast the input (x.to({expected})) or the model (model.to({x.dtype})), "
        "or run under torch.autocast"
    )


def _compiling() -> bool:
    """Inside torch.compile tracing: value checks that need the host are left to eager runs."""
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


#: the packages whose frames a warning skips to reach the user's line: torch's and lrnnx's
_INTERNAL_DIRS = tuple(
    os.path.dirname(os.path.abspath(path)) + os.sep
    for path in (torch.__file__, os.path.dirname(os.path.abspath(__file__)))
)


def user_stacklevel() -> int:
    """``warnings.warn``'s ``stacklevel`` for the caller of this function that points at the
    first frame outside lrnnx and torch: the user's line that led to the warning (however deep
    in nn.Module's call machinery and lrnnx's helpers the warning is raised)."""
    if _compiling():  # (Dynamo cannot trace frame objects; the warning comes from its trace)
        return 2
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL_DIRS):
        frame, level = frame.f_back, level + 1
    return level


def recording_program() -> bool:
    """Whether this call is being recorded into a program that replays it without Python:
    ``torch.export`` (strict or not) or ``torch.jit.trace``.  Such a program must hold no
    in-place change of the model's own state (it would be replayed on every call) and no
    kernel that reads raw memory (export traces with fake tensors): the ops take their
    pure-torch backends and S4 attunes C~ out of place."""
    if torch.jit.is_tracing():
        return True
    if _IS_EXPORTING is not None:
        return bool(_IS_EXPORTING())
    # torch 2.4 has no is_exporting: there export alone sets is_compiling()'s flag outside
    # Dynamo (a non-strict export, and the export of Dynamo's graph), and Dynamo's own tracer
    # says whether it exports (a strict export, the default there)
    if not _compiling():
        return False
    return not torch.compiler.is_dynamo_compiling() or _dynamo_exports()


#: torch.compiler.is_exporting; None with torch 2.4, which lacks it (recording_program)
_IS_EXPORTING = getattr(getattr(torch, "compiler", None), "is_exporting", None)


def _dynamo_exports() -> bool:
    """Whether Dynamo traces for torch.export (else for torch.compile).  Marked a constant for
    Dynamo (as torch.compiler.assume_constant_result does, without importing Dynamo): it runs
    while Dynamo traces, in plain Python, and reads the flag off the tracer."""
    convert = sys.modules.get("torch._dynamo.symbolic_convert")
    tracer = getattr(convert, "InstructionTranslator", None)
    try:
        return bool(tracer is not None and getattr(tracer.current_tx(), "export", False))
    except AttributeError:  # no trace in progress (a thread-local never set)
        return False


_dynamo_exports._dynamo_marked_constant = True  # type: ignore[attr-defined]


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no device type
        if device_type == "cpu":
            return torch.is_autocast_cpu_enabled()
        return torch.is_autocast_enabled()


def check_batch_size(batch_size: Any, name: str = "batch_size") -> int:
    """A batch size for a cache: an int >= 0 (0 gives an empty cache)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral):
        raise TypeError(f"{name}: expected an int >= 0, got {batch_size!r}")
    if batch_size < 0:
        raise ValueError(f"{name}: expected an int >= 0, got {batch_size}")
    return int(batch_size)


def check_inference_cache(
    cache: Any,
    batch: int,
    keys: Sequence[str],
    owner: str,
    batch_keys: Sequence[str] = ("lrnn_state",),
    shapes: Optional[Dict[str, Sequence[int]]] = None,
    name: str = "inference_cache",
    precision: Optional[Dict[str, torch.dtype]] = None,
) -> Dict[str, Any]:
    """Validate a cache from ``allocate_inference_cache`` before ``step`` or a prefill uses it.

    Args:
        cache: what the caller passed.
        batch: the batch size of the input it is used with.
        keys: the entries the model needs.
        owner: the model's name, for messages.
        batch_keys: the entries whose first dimension is the batch (the states).
        shapes: full expected shapes of some entries (batch dimension included).
        precision: entries that must hold at least the model's precision, a real dtype
            (float32, or float64 for a float64 model); a complex entry counts by its parts.
            A narrower one (allocated before ``model.double()``) would silently round every
            step to it; a wider one is fine.

    Raises:
        TypeError: the cache is not a dict (e.g. None), or an entry is narrower than
            ``precision`` (or not a floating-point or complex tensor).
        ValueError: an entry is missing (e.g. ``{}``) or the cache was allocated for another
            batch size.
    """
    hint = f"allocate one with {owner}.allocate_inference_cache(batch_size={batch})"
    if not isinstance(cache, dict):
        raise TypeError(
            f"{name}: expected the dict from allocate_inference_cache, got "
            f"{type(cache).__name__}; {hint}"
        )
    missing = [k for k in keys if k not in cache]
    if missing:
        raise ValueError(
            f"{name}: missing entries {missing} (got {sorted(map(str, cache))}); {hint}"
        )
    for k in batch_keys:
        v = cache.get(k)
        if isinstance(v, Tensor) and v.dim() and v.shape[0] != batch:
            raise ValueError(
                f"{name}[{k!r}]: allocated for batch size {v.shape[0]}, but the input has batch "
                f"size {batch}; {hint}"
            )
    for k, shape in (shapes or {}).items():
        v = cache.get(k)
        if isinstance(v, Tensor) and tuple(v.shape) != tuple(shape):
            raise ValueError(
                f"{name}[{k!r}]: expected shape {tuple(shape)}, got {tuple(v.shape)}; {hint}"
            )
    for k, real in (precision or {}).items():
        v = cache.get(k)
        if not isinstance(v, Tensor):
            continue
        ok = v.is_floating_point() or v.is_complex()
        if not ok or torch.finfo(v.dtype).bits < torch.finfo(real).bits:
            raise TypeError(
                f"{name}[{k!r}]: expected {real} precision or wider (the model computes in "
                f"{real}), got {v.dtype}; a cache allocated before a cast of the model (e.g. "
                f"model.double()) keeps its old dtype: {hint}"
            )
    return cache


def check_timesteps(
    ts: Optional[Tensor], batch: int, seqlen: int, mask: Optional[Tensor] = None
) -> Optional[Tensor]:
    """Validate ``integration_timesteps`` (B, L): finite and >= 0 (at valid positions: with a
    ``mask`` (B, L) of valid positions, padding may hold anything).  The values are read in
    eager runs only (under torch.compile a host read would break the graph)."""
    if ts is None:
        return None
    if not isinstance(ts, Tensor):
        raise TypeError(f"integration_timesteps: expected a torch.Tensor, got {type(ts).__name__}")
    if not ts.is_floating_point():
        raise TypeError(f"integration_timesteps: expected a floating-point tensor, got {ts.dtype}")
    if ts.shape != (batch, seqlen):
        raise ValueError(
            f"integration_timesteps: expected shape ({batch}, {seqlen}), got {tuple(ts.shape)}"
        )
    if _compiling():
        return ts
    valid = ts if mask is None else ts[mask.to(ts.device)]
    if not bool(torch.isfinite(valid).all()) or bool((valid < 0).any()):
        raise ValueError(
            "integration_timesteps: expected finite values >= 0, got negative or non-finite"
        )
    return ts


def check_step_timesteps(ts: Any, batch: int, dtype: torch.dtype, device) -> Optional[Tensor]:
    """Validate the elapsed time of one step (``integration_timesteps`` of an LTV model's
    ``step``): None, a number, or a floating-point tensor (B,) or (B, 1), finite and >= 0.

    Returns a (B, 1) tensor in ``dtype`` on ``device`` (or None).  The values are not read
    while a CUDA graph is being captured (that would synchronise).

    Raises:
        TypeError: not a number or a floating-point tensor.
        ValueError: another shape, or a negative or non-finite value.
    """
    if ts is None:
        return None
    if isinstance(ts, (int, float)) and not isinstance(ts, bool):
        ts = torch.full((batch, 1), float(ts), dtype=dtype, device=device)
    if not isinstance(ts, Tensor):
        raise TypeError(
            f"integration_timesteps: expected a tensor of shape ({batch},) or ({batch}, 1), "
            f"got {type(ts).__name__}"
        )
    if not ts.is_floating_point():
        raise TypeError(f"integration_timesteps: expected a floating-point tensor, got {ts.dtype}")
    if tuple(ts.shape) not in ((batch,), (batch, 1)):
        raise ValueError(
            f"integration_timesteps: expected shape ({batch},) or ({batch}, 1) for one step, "
            f"got {tuple(ts.shape)}"
        )
    capturing = ts.is_cuda and torch.cuda.is_current_stream_capturing()
    if not capturing and (not bool(torch.isfinite(ts).all()) or bool((ts < 0).any())):
        raise ValueError(
            "integration_timesteps: expected finite values >= 0, got negative or non-finite"
        )
    return ts.reshape(batch, 1).to(device=device, dtype=dtype)


# --------------------------------------------------------------------------------------------
# constructor arguments: the one validator every model constructor uses


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type: a bool or a float (even 16.0) where an int size is
    expected, a string where a number is expected, ...

    A :class:`TypeError`, and also a :class:`ValueError` so that code written when every bad
    constructor argument raised ValueError keeps catching it.
    """


def _got(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def check_positive_int(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as a Python int >= ``minimum`` (default 1: a positive size).

    Any ``numbers.Integral`` is accepted (int, numpy integers); bool, floats (16.0 included),
    strings and tensors are not.

    Raises:
        ArgumentTypeError: (a TypeError) not an integer.
        ValueError: an integer below ``minimum``.
    """
    expected = "a positive int" if minimum == 1 else f"an int >= {minimum}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ArgumentTypeError(f"{name}: expected {expected}, got {_got(value)}")
    if value < minimum:
        raise ValueError(f"{name}: expected {expected}, got {value!r}")
    return int(value)


def check_optional_positive_int(name: str, value: Any) -> Optional[int]:
    """None, or ``value`` checked by :func:`check_positive_int`."""
    return None if value is None else check_positive_int(name, value)


def check_positive_float(name: str, value: Any, allow_zero: bool = False) -> float:
    """``value`` as a finite Python float > 0 (>= 0 with ``allow_zero``).

    Any real number is accepted (int, float, numpy scalars); bool, strings, complex numbers and
    tensors are not.

    Raises:
        ArgumentTypeError: (a TypeError) not a real number.
        ValueError: NaN, infinite, or not > 0 (not >= 0 with ``allow_zero``).
    """
    expected = "a finite number >= 0" if allow_zero else "a finite number > 0"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(f"{name}: expected {expected}, got {_got(value)}")
    v = float(value)
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{name}: expected {expected}, got {value!r}")
    return v


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is a bool (numpy's included): a string such as "no" or a number would
    otherwise be read by its truth value, silently.

    Raises:
        ArgumentTypeError: (a TypeError) anything else.
    """
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise ArgumentTypeError(f"{name}: expected a bool, got {_got(value)}")


def check_dt_range(
    dt_min: Any, dt_max: Any, names: tuple[str, str] = ("dt_min", "dt_max")
) -> tuple[float, float]:
    """The initial step-size range: finite numbers with 0 < dt_min <= dt_max.

    Raises:
        ArgumentTypeError: (a TypeError) a bound is not a real number.
        ValueError: a bound is not finite and > 0, or dt_min > dt_max.
    """
    lo = check_positive_float(names[0], dt_min)
    hi = check_positive_float(names[1], dt_max)
    if lo > hi:
        raise ValueError(
            f"{names[0]}, {names[1]}: expected 0 < {names[0]} <= {names[1]}, got "
            f"{dt_min!r}, {dt_max!r}"
        )
    return lo, hi


def merge_alias(name: str, value: Any, alias: str, alias_value: Any, default: Any = None) -> Any:
    """One argument that may be passed under two names (``name`` or its alias ``alias``).

    Returns the value given (``default`` if neither is given, i.e. both are None).

    Raises:
        ValueError: both names are given with different values.
    """
    if alias_value is None:
        return default if value is None else value
    if value is None or value is alias_value:
        return alias_value
    same = not isinstance(value, Tensor) and not isinstance(alias_value, Tensor)
    if same and value == alias_value:
        return value
    raise ValueError(
        f"{name}, {alias}: two names of the same argument, given different values "
        f"({name}={value!r}, {alias}={alias_value!r}); pass only one of them"
    )


def check_no_kwargs(where: str, kwargs: Dict[str, Any]) -> None:
    """Refuse keyword arguments a method takes in its signature (``**kwargs``, the interface the
    LTV base class documents for ``step`` and ``allocate_inference_cache``) but does not use: a
    misspelt ``integration_timestep=`` would otherwise be dropped without a word.

    Raises:
        ArgumentTypeError: (a TypeError) ``kwargs`` is not empty; the message names ``where``
            (e.g. ``"Mamba.step"``) and the keys.
    """
    if kwargs:
        raise ArgumentTypeError(
            f"{where}() got unexpected keyword argument(s) {sorted(kwargs)}; it takes none "
            "beyond those in its signature"
        )


# ------------------------------------------------------------------ packed sequences (cu_seqlens)


def check_cu_seqlens(cu_seqlens: object, batch: int, length: int, where: str) -> Tensor:
    """Validate ``cu_seqlens`` for an input of ``batch`` rows and ``length`` steps.

    ``where`` names the input's layout for the messages (e.g. "b (1, T, *C)").  Returns the
    offsets as an int64 CPU tensor (S + 1,).  Raises ValueError (naming ``cu_seqlens``) for a
    non-tensor or a non-integer dtype (an ArgumentTypeError: a TypeError too), a shape other than
    (S + 1,) with S >= 1, a batch other than 1, a first offset other than 0, a last other than
    T, or decreasing offsets.
    """
    # a wrong type is an ArgumentTypeError: a TypeError, as for lengths, and still the
    # ValueError this function has always raised
    if not isinstance(cu_seqlens, Tensor):
        raise ArgumentTypeError(
            "cu_seqlens: expected a LongTensor (S + 1,) of offsets, got "
            f"{type(cu_seqlens).__name__}"
        )
    if cu_seqlens.dtype not in (torch.int64, torch.int32):
        raise ArgumentTypeError(
            f"cu_seqlens: expected an integer tensor (int64, or int32 as flash-attn's), got dtype "
            f"{cu_seqlens.dtype}"
        )
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(
            f"cu_seqlens: expected shape (S + 1,) with S >= 1 sequences, got "
            f"{tuple(cu_seqlens.shape)}"
        )
    if batch != 1:
        raise ValueError(
            f"cu_seqlens: packed sequences lie back to back in one batch row, so {where} needs "
            f"batch size 1, got {batch}"
        )
    cu = cu_seqlens.detach().to("cpu", torch.int64)
    if cu[0].item() != 0:
        raise ValueError(f"cu_seqlens: expected cu_seqlens[0] = 0, got {cu[0].item()}")
    if cu[-1].item() != length:
        raise ValueError(
            f"cu_seqlens: expected cu_seqlens[-1] = T = {length} (the number of steps), got "
            f"{cu[-1].item()}"
        )
    if bool((cu[1:] < cu[:-1]).any()):
        s = int((cu[1:] < cu[:-1]).nonzero()[0, 0])
        raise ValueError(
            f"cu_seqlens: offsets must not decrease, got cu_seqlens[{s}] = {cu[s].item()} > "
            f"cu_seqlens[{s + 1}] = {cu[s + 1].item()}"
        )
    return cu


def packed_offsets(
    cu_seqlens: Optional[Tensor], lengths: Any, batch: int, length: int, where: str
) -> Optional[Tensor]:
    """Validate a forward's ``cu_seqlens`` (packed sequences, fla's convention) against its input.

    Args:
        cu_seqlens: None, or int64/int32 offsets (S + 1,): sequence s is steps
            ``cu_seqlens[s]:cu_seqlens[s + 1]`` of the one batch row, ``cu_seqlens[0] = 0``,
            ``cu_seqlens[-1] = T``, no decrease (repeated offsets: zero-length sequences).
        lengths: the forward's ``lengths``; it must be None with ``cu_seqlens``.
        batch, length: the input's batch size (must be 1) and number of steps T.
        where: the input's name and layout for the messages, e.g. "x (1, T, H)".

    Returns:
        None without ``cu_seqlens``, else the offsets as an int64 CPU tensor (S + 1,).

    Raises:
        ValueError: ``lengths`` given too (padding and packing are two ways of batching
            variable-length sequences; pass one), or bad offsets / a batch other than 1
            (:func:`lrnnx.ops.linear_scan.packing.check_cu_seqlens`).
    """
    if cu_seqlens is None:
        return None
    if lengths is not None:
        raise ValueError(
            "lengths, cu_seqlens: pass one of them: cu_seqlens packs the sequences back to back "
            "in one row (each as long as its offsets say), lengths marks the padding of a "
            f"padded batch; got both (lengths={lengths!r})"
        )
    return check_cu_seqlens(cu_seqlens, batch, length, where)


def check_packed_cache(cache: Any, n_seq: int, owner: str) -> None:
    """A cache used with ``cu_seqlens`` holds one state per packed sequence: batch size S.

    Raises ValueError, naming S, when its ``"lrnn_state"`` has another number of rows (e.g. a
    cache allocated for the single packed row); the model's own cache check runs after this.
    """
    state = cache.get("lrnn_state") if isinstance(cache, dict) else None
    if isinstance(state, Tensor) and state.dim() and state.shape[0] != n_seq:
        raise ValueError(
            f"inference_cache: with cu_seqlens the cache holds one state per packed sequence "
            f"(the initial state, then the final one), so it needs batch size S = {n_seq}; "
            f"got a cache of batch size {state.shape[0]}; allocate one with "
            f"{owner}.allocate_inference_cache(batch_size={n_seq})"
        )


def packed_seqlen_offset(cu: Tensor) -> int:
    """How far a packed forward advances a cache's ``seqlen_offset``: the longest sequence,
    as a padded batch of the same sequences (padded to that length) would."""
    return int((cu[1:] - cu[:-1]).max())

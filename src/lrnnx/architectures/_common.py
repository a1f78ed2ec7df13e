"""Helpers shared by the architectures: mixer-argument routing and save/load."""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from lrnnx.core.base import keep_recurrence_precision, reset_submodules
from lrnnx.models.registry import MODEL_ALIASES, build_mixer, class_path, resolve_name

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
#: reserved config.json key: sha256 (hex) of the weights file; never a constructor argument
CHECKSUM_KEY = "_weights_sha256"
#: reserved config.json key: the Hugging Face model type (``AutoConfig`` dispatches on it)
MODEL_TYPE_KEY = "model_type"
#: classes whose directories Hugging Face transformers loads (after ``import lrnnx.hf``):
#: ``"module:Class"`` -> the ``model_type`` that ``save_pretrained`` writes into config.json
HF_MODEL_TYPES = {"lrnnx.architectures.lm:LRNNLMHeadModel": "lrnnx"}
#: reserved config.json key of those classes: the modules' JSON extra states (state_dict key ->
#: value), which transformers reads from the config as it keeps no metadata of weights files
EXTRA_STATE_CONFIG_KEY = "lrnnx_extra_state"
#: safetensors metadata entry holding the modules' extra state (``get_extra_state``), as JSON
EXTRA_STATE_METADATA = "lrnnx_extra_state"
_EXTRA_SUFFIX = "_extra_state"  # torch's state_dict key suffix for a module's extra state


def architecture_of(config: Dict[str, Any]) -> Optional[str]:
    """The lrnnx architecture a ``save_pretrained`` config belongs to, read off its keys
    (None: none of lrnnx's), for messages that name the class to load it with."""
    if "mixer_types" in config:
        return "LRNNLMHeadModel"
    if "n_classes" in config:
        return "Classifier"
    if "d_output" in config and "depth" in config:
        return "UNet"
    return None


def _other_architecture(
    cfg_path: str, cls: type, held: Optional[str], model_type: Any = None
) -> ValueError:
    """The error of ``cls.from_pretrained`` on a directory of another architecture."""
    what = f"a checkpoint of {held}" if held else "another architecture's checkpoint"
    if model_type is not None:
        what += f" (model_type {model_type!r})"
    how = f"load it with {held}.from_pretrained, or " if held else "load it with "
    return ValueError(
        f"{cfg_path}: the directory holds {what}, not of {cls.__name__}; {how}"
        "for an `lrnnx train` run, lrnnx.train.load_pretrained"
    )


class ChecksumError(ValueError):
    """The weights file does not match the sha256 recorded in ``config.json`` (corrupted, or
    changed after :meth:`PretrainedMixin.save_pretrained`).  A subclass of ValueError."""


def positive_int(name: str, value: Any) -> int:
    """``value`` as a positive Python int: :func:`lrnnx.core.checks.check_positive_int`
    (a wrong type raises ArgumentTypeError, both a TypeError and a ValueError)."""
    from lrnnx.core.checks import check_positive_int

    return check_positive_int(name, value)


def mixer_name(mixer: Union[str, type]) -> str:
    """Canonical registry name, or ``"module:Class"`` for a class / import path."""
    if isinstance(mixer, type):
        return class_path(mixer)
    if isinstance(mixer, str) and ":" in mixer:
        return mixer
    return resolve_name(mixer)


def build_layer_mixer(
    mixer: Union[str, type],
    name: str,
    width: int,
    d_state: Optional[int],
    kwargs: Dict[str, Any],
    bidirectional: bool,
    owner: str,
) -> nn.Module:
    """The mixer of one layer of an architecture (Classifier, UNet), causal or bidirectional.

    Bidirectional recurrent mixers are :class:`lrnnx.layers.Bidirectional` around two mixers
    (``build_mixer(..., bidirectional=True)``); bidirectional attention is one unmasked MHA
    (``causal=False``), which sees both directions by itself.  ``name`` is
    :func:`mixer_name` of ``mixer``; ``owner`` names the architecture in messages.
    """
    if "bidirectional" in kwargs:
        raise ValueError(f"mixer_kwargs: pass bidirectional once, as the {owner}'s own argument")
    if name == "attn":
        if bidirectional:
            if kwargs.get("causal", False):
                raise ValueError(
                    f"mixer_kwargs: causal=True contradicts the {owner}'s bidirectional=True"
                )
            return build_mixer("attn", width, **{**kwargs, "causal": False})
        return build_mixer("attn", width, **kwargs)
    return build_mixer(mixer, width, d_state, bidirectional=bidirectional, **kwargs)


def check_no_dims(kwargs: Dict[str, Any], where: str = "mixer_kwargs") -> None:
    """d_model / d_state are architecture arguments: repeating them in mixer kwargs is an error;
    so are torch's factory arguments (device, dtype: the architecture's own, never saved in its
    config, whereas mixer_kwargs are)."""
    for key in ("d_model", "d_state", "dim"):
        if key in kwargs:
            raise ValueError(
                f"{where}: {key!r} is given twice; pass d_model/d_state once, as the "
                f"architecture's own arguments"
            )
    for key in ("device", "dtype"):
        if key in kwargs:
            raise ValueError(
                f"{where}: {key!r} belongs to the whole model: pass it as the architecture's "
                f"own {key}= argument (mixer_kwargs are saved in its config)"
            )


def split_mixer_kwargs(
    mixer_kwargs: Optional[Dict[str, Any]], names: List[str]
) -> Dict[str, Dict[str, Any]]:
    """Route ``mixer_kwargs`` to each mixer type.

    Either a flat dict (the keyword arguments of every recurrent mixer; attention takes none) or
    a dict keyed by mixer name (``{"s5": {...}, "attn": {...}}``, names/aliases case-insensitive).

    Returns:
        canonical name -> kwargs, for each name in ``names``.

    Raises:
        ValueError: among others, a key holding a dict that is close to a mixer name but is not
            one (``{"mamab": {...}}``): "did you mean 'mamba'?".
    """
    import difflib
    import inspect

    from lrnnx.models.registry import get_model_class

    if mixer_kwargs is None:
        return {n: {} for n in names}
    if not isinstance(mixer_kwargs, dict):
        raise TypeError(f"mixer_kwargs: expected None or a dict, got {type(mixer_kwargs).__name__}")
    is_name = {
        k: isinstance(k, str) and (":" in k or k.strip().lower().replace("_", "-") in MODEL_ALIASES)
        for k in mixer_kwargs
    }

    def layer_arguments() -> set:
        """Constructor arguments of the layers' mixers: such a key is no misspelled name."""
        accepted: set = set()
        for n in set(names):
            try:
                accepted |= set(inspect.signature(get_model_class(n)).parameters)
            except Exception:  # noqa: BLE001 - an unimportable mixer fails later, with its reason
                pass
        return accepted

    typos = {}
    for k, v in mixer_kwargs.items():
        if is_name[k] or not isinstance(k, str) or not isinstance(v, dict):
            continue
        close = difflib.get_close_matches(
            k.strip().lower().replace("_", "-"), list(MODEL_ALIASES), n=1, cutoff=0.7
        )
        if close:
            typos[k] = close[0]
    if typos:
        typos = {k: v for k, v in typos.items() if k not in layer_arguments()}
    if typos:
        k, hint = next(iter(typos.items()))
        raise ValueError(
            f"mixer_kwargs: {k!r} is not a mixer name; did you mean {hint!r}? (keys are either "
            f"mixer names or aliases, {sorted(MODEL_ALIASES)}, each with a dict of arguments, "
            "or arguments passed to every mixer)"
        )
    if mixer_kwargs and all(is_name.values()):
        per_type: Dict[str, Dict[str, Any]] = {}
        for k, v in mixer_kwargs.items():
            if not isinstance(v, dict):
                raise TypeError(
                    f"mixer_kwargs[{k!r}]: expected a dict of arguments, got {type(v).__name__}"
                )
            check_no_dims(v, f"mixer_kwargs[{k!r}]")
            per_type[mixer_name(k)] = dict(v)
        unused = sorted(set(per_type) - set(names))
        if unused:
            raise ValueError(
                f"mixer_kwargs: arguments for {unused}, which no layer uses (layers: {sorted(set(names))})"
            )
        return {n: per_type.get(n, {}) for n in names}
    if any(is_name.values()):
        raise ValueError(
            "mixer_kwargs: mixes mixer names "
            f"{[k for k, v in is_name.items() if v]} with plain arguments "
            f"{[k for k, v in is_name.items() if not v]}; use either {{name: kwargs}} or flat kwargs"
        )
    check_no_dims(mixer_kwargs)
    return {n: ({} if n == "attn" else dict(mixer_kwargs)) for n in names}


def _owner(module: nn.Module, key: str) -> Tuple[nn.Module, str]:
    path, _, leaf = key.rpartition(".")
    return (module.get_submodule(path) if path else module), leaf


def _is_extra_key(module: nn.Module, key: str) -> bool:
    """Whether a state_dict key is a module's extra state (``get_extra_state``), not a tensor."""
    mod, leaf = _owner(module, key)
    return (
        leaf == _EXTRA_SUFFIX
        and leaf not in mod._parameters
        and leaf not in mod._buffers
        and type(mod).get_extra_state is not nn.Module.get_extra_state
    )


def _tie_map(module: nn.Module) -> Dict[str, str]:
    """state_dict key -> the first key sharing its storage (itself if not tied).

    Only parameters and buffers: extra-state entries are left out.
    """
    first: Dict[tuple, str] = {}
    out: Dict[str, str] = {}
    for k, v in module.state_dict(keep_vars=True).items():
        if _is_extra_key(module, k):
            continue
        ident = (v.data_ptr(), v.dtype, tuple(v.shape), tuple(v.stride())) if v.numel() else (k,)
        out[k] = first.setdefault(ident, k)
    return out


def _sha256(path: Union[str, os.PathLike]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _encode_extra(
    module: nn.Module, extra: Dict[str, Any]
) -> Tuple[Dict[str, Any], Dict[str, Tensor]]:
    """Split extra states into JSON values (metadata) and tensors (stored in the weights file).

    A value must survive the JSON round trip unchanged (no tuples, NaN, non-string keys, ...),
    so that ``set_extra_state`` gets back exactly what ``get_extra_state`` gave.
    """
    as_json: Dict[str, Any] = {}
    as_tensor: Dict[str, Tensor] = {}
    for key, value in extra.items():
        if isinstance(value, Tensor):
            as_tensor[key] = value.detach().contiguous().clone()
            continue
        cls = type(_owner(module, key)[0]).__name__
        try:
            same = json.loads(json.dumps(value)) == value
        except (TypeError, ValueError) as e:
            raise TypeError(
                f"{key}: the extra state of {cls} is not JSON-serialisable ({e}); "
                f"save_pretrained stores extra state as JSON or as one tensor"
            ) from e
        if not same:
            raise TypeError(
                f"{key}: the extra state of {cls} ({value!r}) does not survive a JSON round trip "
                f"unchanged (tuples, NaN or non-string keys); return lists/dicts of plain values"
            )
        as_json[key] = value
    return as_json, as_tensor


class PretrainedMixin:
    """``save_pretrained(dir)`` / ``from_pretrained(dir)``: config.json + model.safetensors.

    The class keeps its constructor arguments in ``self.config`` (JSON-serialisable).  Tied
    tensors (one storage under several names, e.g. an LM head tied to the embedding) are saved
    once and re-tied by construction on load.

    Checkpoint format:

    * ``model.safetensors``: every parameter and persistent buffer (dtypes as they are); the
      extra state of modules that define ``get_extra_state`` (e.g. S4's kernel length) is kept
      in the file's metadata as JSON (key ``"lrnnx_extra_state"``), a tensor extra state in
      the file itself, and is given back to ``set_extra_state`` on load.
    * ``config.json``: the constructor arguments, plus the reserved key ``"_weights_sha256"``
      (sha256 of ``model.safetensors``, checked on load; never passed to the constructor) and,
      for the classes that Hugging Face transformers can load (:data:`HF_MODEL_TYPES`), the
      reserved key ``"model_type"`` (``"lrnnx"`` for :class:`LRNNLMHeadModel`), with a copy
      of the JSON extra states under ``"lrnnx_extra_state"`` for transformers (lrnnx reads
      that copy only from directories that transformers wrote).  Such a
      directory is also what transformers' ``save_pretrained`` writes for ``lrnnx.hf``'s
      classes: its other keys (``transformers_version``, ``architectures``, ``dtype``,
      ``tie_word_embeddings``, ...) are transformers' own, and on load only the constructor's
      parameters are taken from it.
    """

    config: Dict[str, Any]

    def reset_parameters(self) -> None:
        """Initialise the whole network again, as its construction does, in place (each layer
        by its own scheme: the mixers' papers', the embedding's normal(0, initializer_range),
        torch's for plain layers); tied tensors stay tied.  The step after
        ``model.to_empty(device=...)`` for a model built on the meta device."""
        reset_submodules(self)  # type: ignore[arg-type]

    def save_pretrained(self, save_directory: Union[str, os.PathLike]) -> None:
        """Write ``model.safetensors`` and then ``config.json`` (with the weights' sha256)."""
        from safetensors.torch import save_file

        for key in (CHECKSUM_KEY, MODEL_TYPE_KEY, EXTRA_STATE_CONFIG_KEY):
            if key in self.config:
                raise ValueError(f"config: {key!r} is a reserved config.json key, not an argument")
        try:
            json.dumps(self.config, sort_keys=True)
        except TypeError as e:
            raise TypeError(
                f"config: not JSON-serialisable ({e}); use plain numbers/strings/lists in the arguments"
            ) from e
        ties = _tie_map(self)
        state = self.state_dict()
        extra = {k: v for k, v in state.items() if k not in ties}
        extra_json, extra_tensors = _encode_extra(self, extra)
        # one copy per storage; clone so no two saved tensors share memory
        tensors = {k: v.detach().contiguous().clone() for k, v in state.items() if ties.get(k) == k}
        tensors.update(extra_tensors)
        metadata = {"format": "pt"}
        if extra:
            metadata[EXTRA_STATE_METADATA] = json.dumps(
                {"json": extra_json, "tensors": sorted(extra_tensors)}, sort_keys=True
            )
        os.makedirs(save_directory, exist_ok=True)
        w_path = os.path.join(save_directory, WEIGHTS_NAME)
        save_file(tensors, w_path, metadata=metadata)
        config = {**self.config, CHECKSUM_KEY: _sha256(w_path)}  # of the file as written
        model_type = HF_MODEL_TYPES.get(class_path(type(self)))
        if model_type is not None:
            config[MODEL_TYPE_KEY] = model_type
            if extra_json:
                config[EXTRA_STATE_CONFIG_KEY] = extra_json
        with open(os.path.join(save_directory, CONFIG_NAME), "w") as f:
            f.write(json.dumps(config, indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_pretrained(
        cls,
        load_directory: Union[str, os.PathLike],
        map_location: Union[str, torch.device, None] = None,
        *,
        device: Union[str, torch.device, None] = None,
        dtype: Union[str, torch.dtype, None] = None,
        torch_dtype: Union[str, torch.dtype, None] = None,
    ):
        """Rebuild from ``config.json`` and load ``model.safetensors``; returns the model in
        eval mode (call ``.train()`` to fine-tune).

        The weights file is checked against the sha256 that :meth:`save_pretrained` recorded in
        ``config.json`` (a config without it, from an older version, loads unchecked).  The
        loaded tensors are copied into fresh allocations, like those of a newly built model.

        Args:
            load_directory: a directory written by :meth:`save_pretrained`.
            map_location: device for the weights (default: CPU).
            device: the same as ``map_location`` (give one, or both equal).
            dtype: cast the whole model after loading (``model.to(dtype)``: floating-point
                parameters and buffers); a floating-point ``torch.dtype`` or its name
                (``"float32"``); None or ``"auto"`` keeps the dtypes as saved.
            torch_dtype: alias of ``dtype`` (Hugging Face's name).

        Raises:
            FileNotFoundError: a file is missing.
            ChecksumError (a ValueError): the weights file's sha256 differs from the recorded
                one; the message names the file and both digests.
            ValueError: config.json's ``"model_type"`` is not this class's (e.g. another
                architecture's directory).
            RuntimeError: the weights do not match the config (missing / unexpected / shape).
            ValueError: conflicting ``map_location``/``device`` or ``dtype``/``torch_dtype``.
        """
        from safetensors import safe_open
        from safetensors.torch import load_file

        target = _resolve_device(map_location, device)
        cast = _resolve_dtype(dtype, torch_dtype)
        cfg_path = os.path.join(load_directory, CONFIG_NAME)
        w_path = os.path.join(load_directory, WEIGHTS_NAME)
        for p in (cfg_path, w_path):
            if not os.path.isfile(p):
                runs = [
                    d
                    for d in ("best", "last")
                    if os.path.isfile(os.path.join(load_directory, d, CONFIG_NAME))
                ]
                hint = (
                    "; this looks like an `lrnnx train` --out directory: load "
                    + " or ".join(os.path.join(load_directory, d) for d in runs)
                    + f", or lrnnx.train.load_pretrained({str(load_directory)!r})"
                    if runs
                    else ""
                )
                raise FileNotFoundError(
                    f"load_directory: {p} not found (expected a save_pretrained directory){hint}"
                )
        with open(cfg_path) as f:
            config = json.load(f)
        expected = config.pop(CHECKSUM_KEY, None)
        config_extra = config.pop(EXTRA_STATE_CONFIG_KEY, None) or {}
        by_transformers = "transformers_version" in config  # lrnnx.hf's save_pretrained
        config = _constructor_arguments(cls, config, cfg_path)
        if expected is not None:
            found = _sha256(w_path)
            if found != expected:
                raise ChecksumError(
                    f"{w_path}: sha256 mismatch, expected {expected} (recorded in {cfg_path}), "
                    f"found {found}; the weights file is corrupted or was changed after saving"
                )
        model = cls(**config)
        state = load_file(w_path, device=str(target))
        with safe_open(w_path, framework="pt") as f:
            metadata = f.metadata() or {}
        # fresh (aligned, contiguous) allocations: kernels then take the same paths as on a
        # newly built model, whereas the file's buffers may be unaligned
        state = {
            k: torch.empty_like(v, memory_format=torch.contiguous_format).copy_(v)
            for k, v in state.items()
        }
        extra: Dict[str, Any] = {}
        if EXTRA_STATE_METADATA in metadata:
            stored = json.loads(metadata[EXTRA_STATE_METADATA])
            extra.update(stored.get("json", {}))
            for k in stored.get("tensors", []):
                if k in state:
                    extra[k] = state.pop(k)
        elif by_transformers:  # its weights files keep no metadata: lrnnx.hf uses the config
            extra.update(config_extra)
        # tensor extra states in a file without lrnnx's metadata (transformers writes them
        # among the weights, under their state_dict keys)
        for k in [k for k in state if k not in extra and _is_extra_key(model, k)]:
            extra[k] = state.pop(k)
        model._assign_state(state, extra)
        model.to(target)
        if cast is not None:
            model.to(cast)
        return model.eval()

    def _assign_state(
        self, state: Dict[str, Tensor], extra: Optional[Dict[str, Any]] = None
    ) -> None:
        """Put the loaded tensors in place (keeping their dtype); tied names follow their owner;
        then give each module its extra state (``set_extra_state``), as ``load_state_dict`` does."""
        extra = {} if extra is None else extra
        ties = _tie_map(self)
        expected = {k for k, owner in ties.items() if owner == k}
        expected_extra = {k for k in self.state_dict(keep_vars=True) if k not in ties}
        got = set(state) | set(extra)
        missing = sorted((expected | expected_extra) - got)
        unexpected = sorted(got - (expected | expected_extra))
        misplaced = sorted((set(state) & expected_extra) | (set(extra) & expected))
        if missing or unexpected or misplaced:
            raise RuntimeError(
                f"weights do not match the config: missing {missing}, unexpected {unexpected}"
                + (f", stored in the wrong place {misplaced}" if misplaced else "")
            )
        for key, tensor in state.items():
            mod, leaf = _owner(self, key)
            current = (
                mod._parameters.get(leaf) if leaf in mod._parameters else mod._buffers.get(leaf)
            )
            if current is None or tuple(current.shape) != tuple(tensor.shape):
                got_shape = None if current is None else tuple(current.shape)
                raise RuntimeError(
                    f"{key}: expected shape {got_shape}, got {tuple(tensor.shape)} in the file"
                )
            if _dtype_kind(current) != _dtype_kind(tensor):
                raise TypeError(
                    f"{key}: expected a {_dtype_kind(current)} tensor (the model's is "
                    f"{current.dtype}), got {tensor.dtype} in the file"
                )
            with torch.no_grad():
                if leaf in mod._parameters:
                    current.data = tensor  # same Parameter object: ties survive
                else:
                    mod._buffers[leaf] = tensor
        # a file with the recurrences' own tensors in 16 bits (converted by hand or by another
        # tool): widen them to float32, as the precision policy keeps them under 16-bit casts
        keep_recurrence_precision(self)
        for key, value in extra.items():
            _owner(self, key)[0].set_extra_state(value)


def _dtype_kind(t: Tensor) -> str:
    """ "complex", "floating-point", "boolean" or "integer": what a loaded tensor must share with
    the model's (any width: the file's dtype is kept)."""
    if t.is_complex():
        return "complex"
    if t.is_floating_point():
        return "floating-point"
    return "boolean" if t.dtype == torch.bool else "integer"


def _constructor_arguments(cls: type, config: Dict[str, Any], cfg_path: str) -> Dict[str, Any]:
    """The constructor arguments in a config.json (its checksum already removed).

    A config with a ``"model_type"`` is one Hugging Face transformers can read (written by
    :meth:`PretrainedMixin.save_pretrained` or by ``lrnnx.hf``'s classes): its keys that are
    not constructor parameters are transformers' own (``transformers_version``,
    ``architectures``, ``dtype``, ``tie_word_embeddings``, token ids, ...; the set depends on
    the transformers version) and are left out.  A config without one (lrnnx before the
    Hugging Face integration) holds nothing but the arguments, all passed on.
    """
    if MODEL_TYPE_KEY not in config:
        held = architecture_of(config)
        if held is not None and all(c.__name__ != held for c in cls.__mro__):
            raise _other_architecture(cfg_path, cls, held)
        return config
    model_type = config[MODEL_TYPE_KEY]
    # a subclass reads its base class's directories (it writes none: its arguments may differ)
    own_type = next(
        (HF_MODEL_TYPES[class_path(c)] for c in cls.__mro__ if class_path(c) in HF_MODEL_TYPES),
        None,
    )
    if model_type != own_type:
        raise _other_architecture(cfg_path, cls, architecture_of(config), model_type)
    params = inspect.signature(cls.__init__).parameters
    named = {
        n
        for n, p in params.items()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    named -= {"self", "device", "dtype"}  # (torch's factory arguments: never in a config)
    return {k: v for k, v in config.items() if k in named}


def _resolve_device(
    map_location: Union[str, torch.device, None], device: Union[str, torch.device, None]
) -> torch.device:
    """from_pretrained's map_location / device (aliases) -> the device to load onto (CPU if
    neither is given); ValueError if both are given and disagree."""
    if map_location is not None and device is not None:
        if torch.device(map_location) != torch.device(device):
            raise ValueError(
                f"map_location={map_location!r} and device={device!r} disagree; give one"
            )
    where = device if device is not None else map_location
    return torch.device("cpu") if where is None else torch.device(where)


def _resolve_dtype(
    dtype: Union[str, torch.dtype, None], torch_dtype: Union[str, torch.dtype, None]
) -> Optional[torch.dtype]:
    """from_pretrained's dtype / torch_dtype -> a floating-point dtype, or None (keep as saved)."""

    def one(name: str, value: Union[str, torch.dtype, None]) -> Optional[torch.dtype]:
        if value is None or value == "auto":
            return None
        if isinstance(value, str):
            resolved = getattr(torch, value.removeprefix("torch."), None)
            if not isinstance(resolved, torch.dtype):
                raise ValueError(f"{name}: unknown dtype name {value!r}")
            value = resolved
        if not isinstance(value, torch.dtype):
            raise TypeError(
                f"{name}: expected a torch.dtype or its name, got {type(value).__name__}"
            )
        if not value.is_floating_point:
            raise ValueError(f"{name}: expected a floating-point dtype, got {value}")
        return value

    a, b = one("dtype", dtype), one("torch_dtype", torch_dtype)
    if a is not None and b is not None and a != b:
        raise ValueError(
            f"dtype={a} and torch_dtype={b} disagree; torch_dtype is an alias, give one"
        )
    return a if a is not None else b

"""Base class for LTI models: fixed dynamics, FFT convolution for training, recurrence for inference."""

from __future__ import annotations

import warnings
from abc import abstractmethod
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

from lrnnx.core.base import LRNN, not_implemented
from lrnnx.core.checks import (
    as_lengths,
    check_inference_cache,
    check_packed_cache,
    check_sequence,
    check_step_input,
    check_timesteps,
    lengths_mask,
    packed_offsets,
    packed_seqlen_offset,
    recording_program,
    step_output,
    user_stacklevel,
    zero_where_not,
)
from lrnnx.core.fftconv import causal_conv
from lrnnx.ops import _dispatch, linear_scan

#: how a forward pass evaluates the recurrence
MODES = ("fft", "scan", "auto")
#: linear_scan backends that run the recurrence in one fused, memory-bound pass.  With one of
#: them "auto" always scans: on CPU (numba) the scan beat the FFT convolution at every length
#: measured, 64 to 16384 steps, forward and forward+backward, by 2-5x (``lrnnx bench``, LTI
#: rows); the Triton scan on CUDA runs at ~94% of copy bandwidth, one pass over (B, L, N)
#: against the FFT path's several passes over (B, N, 2L) (inferred, not measured here)
FUSED_SCAN_BACKENDS = ("cpu", "triton")
#: with the pure-torch scan (log-depth doubling passes) "auto" uses the FFT convolution from
#: this length on: the measured crossover on a 2-core CPU lies between 256 and 4096 steps
AUTO_FFT_MIN_LEN = 2048


def diagonal_powers(A_bar: Tensor, L: int) -> Tensor:
    """A_bar^t for t = 0..L-1, shape (..., L) for A_bar of shape (...).

    exp(t log A_bar) costs one complex exp per entry and its backward is a product, several times
    cheaper than complex pow; A^0 = 1 is set apart so that A_bar = 0 stays finite.
    """
    t = torch.arange(1, max(L, 1), device=A_bar.device, dtype=A_bar.real.dtype)
    P = torch.exp(torch.log(A_bar)[..., None] * t)
    return torch.cat([torch.ones_like(A_bar)[..., None], P], dim=-1)[..., :L]


class _StepBuffers:
    """What :meth:`LTI_LRNN._diagonal_step` reuses across calls.

    ``W_in`` (H, 2N) and ``W_out`` (2N, H) are real: x W_in is [Re, Im](B_bar x) interleaved and
    [Re, Im](h) W_out = out_scale Re(C h).  ``u`` is the (B, 2N) buffer for x W_in.  Kept as one
    plain object in the cache, not as tensors in the cache dict: code that walks a cache's
    tensors (e.g. CUDA-graph capture in generation) sees only the model's own entries.
    """

    __slots__ = ("W_in", "W_out", "out_scale", "u")

    def __init__(self, B_bar: Tensor, C: Tensor, out_scale: float, cache: Dict[str, Any]):
        with torch.no_grad():
            dtype = cache["lrnn_state"].dtype  # complex; real B_bar/C get a zero imaginary part
            B_bar, C = B_bar.to(dtype), C.to(dtype)
            self.W_in = torch.view_as_real(B_bar.transpose(0, 1).contiguous()).flatten(1)
            Ct = C.transpose(0, 1)  # (N, H)
            W_out = torch.stack([Ct.real, -Ct.imag], dim=1).flatten(0, 1) * out_scale
            self.W_out = W_out.contiguous()
        self.out_scale = out_scale
        self.u: Optional[Tensor] = None


class LTI_LRNN(LRNN):
    """Base class for all LTI LRNN models.

    LTI models do not support the ``async`` discretization, which needs time-varying dynamics;
    event-driven models live in :mod:`lrnnx.models.ltv`.

    ``mode`` selects how ``forward`` runs the recurrence: ``"fft"`` (causal convolution with the
    kernel A^t, O(L log L)), ``"scan"`` (the recurrence via :func:`lrnnx.ops.linear_scan`) or
    ``"auto"`` (the default, the fastest path measured): the scan whenever the device's
    linear_scan backend is a fused one (:data:`FUSED_SCAN_BACKENDS`), otherwise the FFT from
    :data:`AUTO_FFT_MIN_LEN` steps on.  All give the same result up to floating-point rounding.
    A model lists the modes it implements in :attr:`modes`: S4 and S4D, the S4 code base's
    convolution blocks, take ``"auto"`` and ``"fft"`` only (ValueError for ``"scan"``).

    Packed sequences (``cu_seqlens``, fla's convention: x (1, T, H) holds S sequences back to
    back) always run the scan with resets, in every mode, ``"fft"`` included: a convolution over
    the packed row would carry each sequence's inputs into the next one.  ``mode`` is a speed
    choice, so the packed result is the same either way: each sequence as if run alone.

    The class itself can be instantiated (``LTI_LRNN("zoh")``, as in the original lrnnx); its
    abstract methods then raise NotImplementedError.  A subclass must implement them all.
    """

    _interface = True
    allowed_discretizations = ("zoh", "bilinear", "dirac", "no_discretization")

    def __init__(self, discretization: str, mode: str = "auto"):
        if discretization is None:  # (LRNN takes None from models that discretize inside)
            raise ValueError(
                f"discretization: expected one of {list(self.allowed_discretizations)}, got None"
            )
        if discretization == "async":
            raise ValueError(
                "discretization: 'async' needs time-varying dynamics and is not supported by LTI "
                "models; use a model from lrnnx.models.ltv, or one of "
                f"{list(self.allowed_discretizations)}"
            )
        super().__init__(discretization)
        self.mode = mode

    @property
    def mode(self) -> str:
        return self._mode

    #: the modes the model's forward implements (a subclass narrows it and says why in
    #: :attr:`_modes_note`)
    modes: Tuple[str, ...] = MODES
    _modes_note = ""

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in self.modes:
            raise ValueError(
                f"mode: expected one of {list(self.modes)}, got {value!r}{self._modes_note}"
            )
        self._mode = value

    def _use_fft(self, L: int, device: Optional[torch.device] = None) -> bool:
        """Whether a forward over ``L`` steps runs the FFT convolution (see ``mode``).

        ``device`` (the forwards pass their input's) defaults to the parameters' device;
        "auto" asks the dispatcher which linear_scan backend would run there
        (``LRNNX_BACKEND`` included).  (The default is for eager calls: Dynamo 2.4 cannot trace
        ``next(self.parameters(), None)``, which fullgraph=True and torch.export reject.)"""
        if self.mode != "auto":
            return self.mode == "fft"
        if device is None:
            param = next(self.parameters(), None)
            device = param.device if param is not None else torch.device("cpu")
        # while a program is recorded the scan runs on its torch backend (resolve), and
        # nothing may be imported: Dynamo cannot trace an import (a strict torch.export of a
        # model never run before failed on importing the fused scan)
        asked = "torch" if recording_program() else None
        backend, _ = _dispatch.select("linear_scan", device, asked)
        if backend in FUSED_SCAN_BACKENDS:
            return False
        return L >= AUTO_FFT_MIN_LEN

    @abstractmethod
    def discretize(self) -> Tuple[Tensor, Any, Tensor]:
        """Discrete (A_bar, B_bar or its normaliser, C) from the continuous parameters."""
        raise not_implemented(self, "discretize")

    @abstractmethod
    def compute_kernel(self, *args) -> Tuple[Tensor, Tensor]:
        """What the convolution needs: powers of A_bar (or A_bar itself) and the input matrix."""
        raise not_implemented(self, "compute_kernel")

    @abstractmethod
    def step(self, x: Tensor, inference_cache: Dict[str, Any]) -> Tuple[Tensor, Dict[str, Any]]:
        """One timestep: x (B, H) -> y (B, H); the cache's state is updated in place."""
        raise not_implemented(self, "step")

    @abstractmethod
    def allocate_inference_cache(
        self, batch_size: int, max_seqlen: int = 1, dtype: Optional[torch.dtype] = None
    ) -> Dict[str, Any]:
        """Zero state plus the precomputed discrete matrices."""
        raise not_implemented(self, "allocate_inference_cache")

    def _check_forward_args(
        self, x: Tensor, integration_timesteps: Optional[Tensor], lengths: Any = None
    ) -> None:
        """Validate x (B, L, H) and ``integration_timesteps``.

        ``integration_timesteps`` is accepted for interface compatibility with the LTV models,
        as the original lrnnx documents it ("not used by S5"), and validated like theirs ((B, L),
        finite and >= 0 at valid positions); the fixed kernel cannot stretch per element, so
        it is ignored, with a warning that says so, located at the caller's line (Python's
        default filter shows it once per line).
        """
        check_sequence(x, self.d_model)
        self._ignore_timesteps(x, integration_timesteps, lengths)

    def _ignore_timesteps(
        self, x: Tensor, integration_timesteps: Optional[Tensor], lengths: Any = None
    ) -> None:
        """Check ``integration_timesteps`` against x (B, L, H) and warn that they are ignored
        (see :meth:`_check_forward_args`)."""
        if integration_timesteps is not None:
            B, L = x.shape[:2]
            check_timesteps(integration_timesteps, B, L, lengths_mask(lengths, B, L, x.device))
            warnings.warn(
                f"integration_timesteps: {type(self).__name__} is time-invariant and ignores "
                "them (its kernel is fixed); use an LTV model (lrnnx.models.ltv, e.g. the "
                "event-driven S5) for irregularly sampled inputs",
                UserWarning,
                stacklevel=user_stacklevel(),
            )

    def _diagonal_ssm(
        self,
        x: Tensor,
        A_bar: Tensor,
        B_bar: Tensor,
        C: Tensor,
        D: Optional[Tensor],
        lengths: Optional[Tensor] = None,
        inference_cache: Optional[Dict[str, Any]] = None,
        out_scale: float = 1.0,
        powers: Optional[Tensor] = None,
        cu_seqlens: Optional[Tensor] = None,
    ) -> Tensor:
        """Run the diagonal system h_t = A_bar h_{t-1} + B_bar x_t, y_t = out_scale Re(C h_t) + D x_t.

        Args:
            x: (B, L, H) real input; (1, T, H) with ``cu_seqlens``.
            A_bar: (N,) complex discrete eigenvalues.  B_bar: (N, H).  C: (H, N).  D: (H,) or None.
            lengths: (B,) valid lengths; outputs past them are zero and the state stops there.
            inference_cache: if given, the scan starts from its ``"lrnn_state"`` (B, N) and the
                state at each sequence's end is written back (``seqlen_offset`` advances by L).
                With ``cu_seqlens`` it holds one state per sequence, (S, N).
            out_scale: 2 for conjugate-symmetric models that keep half of each eigenvalue pair.
            powers: A_bar^t (N, L) when the caller already has them.
            cu_seqlens: packed sequences (see :func:`packed_offsets`): the state restarts at
                each sequence's first step, always through the scan with resets (an FFT
                convolution would mix neighbouring sequences), whatever ``mode`` says.

        Returns:
            y (B, L, H) in x's dtype; state arithmetic is float32/complex64 (or wider) always.
        """
        Bsz, L, _ = x.shape
        cu = packed_offsets(cu_seqlens, lengths, Bsz, L, f"x {tuple(x.shape)} = (1, T, H)")
        lengths = as_lengths(lengths, Bsz, L, x.device)
        mask = lengths_mask(lengths, Bsz, L, x.device)
        h0 = None
        if inference_cache is not None:
            # in the model's precision: a wider cache (complex128 for a complex64 model) is
            # accepted, and receives the final state widened
            h0 = self._cached_state(inference_cache, Bsz, cu).to(A_bar.dtype)
        final = None
        with _dispatch.no_autocast(x.device):
            xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
            if mask is not None:  # a select: padding may hold anything, NaN included
                xf = zero_where_not(xf, mask[..., None])
            u = xf.to(B_bar.dtype) @ B_bar.transpose(0, 1)  # (B, L, N)
            if cu is not None:
                h, final = linear_scan(
                    A_bar, u, initial_state=h0, output_final_state=True, cu_seqlens=cu
                )
            elif self._use_fft(L, x.device):
                K = diagonal_powers(A_bar, L) if powers is None else powers
                h = causal_conv(u.transpose(1, 2), K).transpose(1, 2)  # (B, L, N)
                if h0 is not None:
                    h = h + (A_bar * K.transpose(0, 1))[None] * h0[:, None, :]
            else:
                h = linear_scan(A_bar, u, initial_state=h0)
            y = (h @ C.transpose(0, 1)).real * out_scale
            if D is not None:
                y = y + xf * D
            if mask is not None:
                y = zero_where_not(y, mask[..., None])
        if inference_cache is not None and cu is not None:
            inference_cache["lrnn_state"].copy_(final)
            offset = inference_cache.get("seqlen_offset", 0) + packed_seqlen_offset(cu)
            inference_cache["seqlen_offset"] = offset
        elif inference_cache is not None:
            self._store_final_state(inference_cache, h, lengths)
        return y.to(x.dtype)

    def _cached_state(self, cache: Dict[str, Any], batch: int, cu: Optional[Tensor]) -> Tensor:
        """The validated initial state (B, N) of a cache; (S, N), one per sequence, when packed.

        A copy: the forward writes the final state into the cache's tensor in place, which must
        not change a value that the graph of a forward under autograd saved."""
        rows = batch if cu is None else cu.shape[0] - 1
        if cu is not None:
            check_packed_cache(cache, rows, type(self).__name__)
        return self._check_cache(cache, rows)["lrnn_state"].clone()

    def _diagonal_step(
        self, x: Tensor, cache: Dict[str, Any], out_scale: float = 1.0
    ) -> Tuple[Tensor, Dict[str, Any]]:
        """One step of h = A_bar h + B_bar x, y = out_scale Re(C h) + D x with the cached matrices.

        x is (B, H) (or (B, 1, H), giving y (B, 1, H)).  Per call, only the output y is allocated: the state is
        updated in place, B_bar x goes into a buffer kept in the cache (unless x needs a
        gradient), and both products are real matrix products with weights prepared once
        (:class:`_StepBuffers`), so a real x is never cast to complex.
        """
        layout, x = x, check_step_input(x, self.d_model)
        h = self._check_cache(cache, x.shape[0])["lrnn_state"]
        if self._step_records_graph():
            y, cache = self._diagonal_step_in_graph(x, cache, out_scale)
            return step_output(y, layout), cache
        bufs = self._step_buffers(cache, out_scale)
        Bsz, N = h.shape
        # the state and its readout stay in the cache's precision under autocast, as in forward
        with _dispatch.no_autocast(x.device):
            xf = x if x.dtype == bufs.W_in.dtype else x.to(bufs.W_in.dtype)
            if torch.is_grad_enabled() and xf.requires_grad:  # out= cannot carry a graph
                u = xf @ bufs.W_in
            else:
                if bufs.u is None or bufs.u.shape != (Bsz, 2 * N):
                    bufs.u = torch.empty(Bsz, 2 * N, dtype=bufs.W_in.dtype, device=h.device)
                u = torch.matmul(xf, bufs.W_in, out=bufs.u)  # [Re, Im] of B_bar x, interleaved
            h.mul_(cache["A_bar"]).add_(torch.view_as_complex(u.view(Bsz, N, 2)))
            y = torch.view_as_real(h).reshape(Bsz, 2 * N) @ bufs.W_out  # out_scale Re(C h)
            if cache.get("D") is not None:
                y.addcmul_(xf, cache["D"])
        cache["seqlen_offset"] = cache.get("seqlen_offset", 0) + 1
        return step_output(y.to(x.dtype), layout), cache

    def _step_matrices(self) -> Dict[str, Optional[Tensor]]:
        """The discrete diagonal system from the parameters as they are now, differentiable:
        ``A_bar`` (N,), ``B_bar`` (N, H), ``C`` (H, N) (complex) and ``D`` (H,) or None (a
        diagonal model implements it; its cache holds detached copies)."""
        raise not_implemented(self, "_step_matrices")

    def _diagonal_step_in_graph(
        self, x: Tensor, cache: Dict[str, Any], out_scale: float
    ) -> Tuple[Tensor, Dict[str, Any]]:
        """:meth:`_diagonal_step` while autograd records: the system from the parameters
        (:meth:`_step_matrices`) and the state computed out of place, then written back into
        the cache's tensor (copy_ carries the graph), so a stepped sequence has the parallel
        forward's gradients, the parameters' and through the state from step to step."""
        h = cache["lrnn_state"]
        m = self._step_matrices()
        with _dispatch.no_autocast(x.device):
            xf = x.to(self._precision)
            A_bar, B_bar, C = (m[k].to(h.dtype) for k in ("A_bar", "B_bar", "C"))
            h_new = A_bar * h.clone() + xf.to(h.dtype) @ B_bar.transpose(0, 1)
            y = out_scale * (h_new @ C.transpose(0, 1)).real
            if m.get("D") is not None:
                y = y + m["D"].to(y.dtype) * xf
            h.copy_(h_new)
        cache["seqlen_offset"] = cache.get("seqlen_offset", 0) + 1
        return y.to(x.dtype), cache

    #: the entries of a diagonal model's cache that ``step`` and a prefill read
    _cache_keys: Tuple[str, ...] = ("lrnn_state", "A_bar", "B_bar", "C")

    def _check_cache(self, cache: Any, batch: int) -> Dict[str, Any]:
        """The shared cache validation (:func:`lrnnx.core.checks.check_inference_cache`), then
        the state's shape (B, N) and complex dtype against the cached A_bar (N,)."""
        owner = type(self).__name__
        precision = dict.fromkeys(("lrnn_state", "A_bar"), self._precision)
        check_inference_cache(cache, batch, self._cache_keys, owner, precision=precision)
        state, n = cache["lrnn_state"], cache["A_bar"].shape[-1]
        if not isinstance(state, Tensor) or state.shape != (batch, n) or not state.is_complex():
            got = f"{tuple(state.shape)} {state.dtype}" if isinstance(state, Tensor) else state
            raise ValueError(
                f"inference_cache['lrnn_state']: expected a complex tensor of shape ({batch}, {n}), "
                f"got {got}; allocate one with {owner}.allocate_inference_cache(batch_size={batch})"
            )
        return cache

    @staticmethod
    def _step_buffers(cache: Dict[str, Any], out_scale: float) -> _StepBuffers:
        """The step's real weights and input buffer, made at the first step (cache["_step"])."""
        bufs = cache.get("_step")
        if not isinstance(bufs, _StepBuffers) or bufs.out_scale != out_scale:
            bufs = cache["_step"] = _StepBuffers(cache["B_bar"], cache["C"], out_scale, cache)
        return bufs

    @staticmethod
    def _store_final_state(cache: Dict[str, Any], h: Tensor, lengths: Optional[Tensor]) -> None:
        """Write each sequence's state at its own last valid step into the cache."""
        if h.shape[1] == 0:  # nothing was read: the state stays
            return
        if lengths is None:
            final = h[:, -1]
        else:
            # padded inputs were zeroed, so the state past a sequence's end only decays: read the
            # state at length-1 directly (length 0 keeps the incoming state).
            idx = (lengths.to(h.device) - 1).clamp(min=0)
            final = h.gather(1, idx.view(-1, 1, 1).expand(-1, 1, h.shape[-1]))[:, 0]
            final = torch.where((lengths == 0).to(h.device)[:, None], cache["lrnn_state"], final)
        cache["lrnn_state"].copy_(final)
        cache["seqlen_offset"] = cache.get("seqlen_offset", 0) + h.shape[1]


def cache_to_device(cache: Dict[str, Any], device: Any) -> Dict[str, Any]:
    """The tensors of an inference cache moved to ``device`` (None: left where they are)."""
    if device is None:
        return cache
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in cache.items()}

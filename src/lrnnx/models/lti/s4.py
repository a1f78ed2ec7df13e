"""S4: Efficiently Modeling Long Sequences with Structured State Spaces (Gu, Goel, Re, ICLR 2022).

Each of the H features runs a single-input SSM with a diagonal-plus-low-rank (DPLR) state matrix

    A = Lambda - P P^*        (Lambda diagonal with Re < 0; from the NPLR form of a HiPPO matrix)
    x'(t) = A x(t) + B u(t),  y(t) = C x(t) + D u(t)

Only one state of each conjugate pair is stored (the system is real), so the full matrices are
``X_full = [X, conj(X)]`` and ``y = 2 Re(...)`` of the kept half.  Bilinear discretisation with
step Delta (a diagonal matrix when dt is not tied):

    dA = (I - Delta A / 2)^{-1} (I + Delta A / 2),   dB = (I - Delta A / 2)^{-1} Delta B

The length-L kernel K_l = C dA^l dB comes from its truncated generating function at the roots of
unity w_k = exp(-2 pi i k / L) (S4, Algorithm 1):

    K^(w) = sum_{l<L} K_l w^l = C~ (I - w dA)^{-1} dB,      C~ = C (I - dA^L)
          = C~ M(w)^{-1} Delta B,   M(w) = (1 - w) I - (1 + w)/2 Delta A

M(w) is diagonal plus rank r, so with d_n(w) = (1 - w) - (1 + w)/2 Delta_n Lambda_n the Woodbury
identity reduces it to Cauchy sums  k_{XY}(w) = sum_n X_n Delta_n Y_n / d_n(w)  (conjugate pairs
included):

    K^(w) = k_{C B} - b k_{C P} (I + b k_{Q P})^{-1} k_{Q B},   b = (1 + w) / 2,  Q = conj(P)

and K = irfft(K^).  (This is the S4 formula multiplied through by (1 + w)/2, which keeps the node
w = -1 finite.)  As in the paper the trainable C is C~: the parameter holds C~ for the internal
length ``l_kernel`` (set to ``l_max``, or to the first length seen), and longer inputs double that
length with C~_{2L} = C~_L (I + dA^L).  Recurrent mode recovers C = C~ (I - dA^L)^{-1} and runs the
dense recurrence x_t = dA x_t-1 + dB u_t, y_t = Re(C_full x_t) + D u_t.

Attuning rewrites the parameter C in place (once per length, as state-spaces/s4 does), except
where that would be wrong, where it is computed out of place for the call and the module stays as
it was: under torch.func (``functional_call`` passes the caller's tensors), while torch.export
or torch.jit.trace records a program (which would replay the rewrite at every call), in a
torch.distributed job of several processes (DDP's replicas or FSDP's shards would each attune
their own copy at their own lengths and drift apart: there C~ is computed at every forward from
the shared C, l_max avoids the cost; a warning says so once), and while a
gradient
is pending on C or a graph built through it awaits its backward (accumulation over
micro-batches, or two losses of different lengths in one graph: every part of the gradient is then
with respect to the same C~).  What C means thus depends on ``l_kernel``, which ``state_dict``
carries (extra state, a 0-d tensor: the module's own record, shared as C is, so the two stay
matched; an EMA's in-place update of every state_dict tensor updates it with C): parameters
copied into another S4 by other means (``AveragedModel``, weight averaging) need the same
``l_kernel``, and FSDP in a job of a single process loses an in-place write
to its gathered copy.  A frozen C (``requires_grad=False``) is attuned in place too: its values
change, the function it gives does not.  An exported or traced program shares C with the
model and keeps the ``l_kernel`` it was recorded with: an eager forward at a longer length later
re-attunes C under it.  Passing ``l_max`` >= the longest input attunes C~ once, at construction,
and keeps it there: use it with EMA, FSDP, frozen weights or exported programs.

Threads serving one model: forwards, steps, ``allocate_inference_cache`` and ``discretize`` read
C~ together with its length under one lock, and the in-place attuning and ``load_state_dict``
take it too, so each computes the function of one C~.  A state_dict holds references to C~ and
its length; a copy of it made while another thread's forward attunes C~ may pair the old C~
with the new length: pass ``l_max`` (C~ never changes) to checkpoint a model that serves other
threads.
"""

from __future__ import annotations

import math
import os
import threading
import warnings
import weakref
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from lrnnx.core.autograd import transformed
from lrnnx.core.base import _is_dtensor
from lrnnx.core.checks import recording_program, user_stacklevel
from lrnnx.models.lti._s4_block import (
    S4BlockBase,
    check_kernel_name,
    check_original_init_options,
    log,
)
from lrnnx.ops import cauchy


class _GraphToken:
    """Held by a hook on the C~ of one autograd graph: alive while the graph is, ``spent`` once
    the graph's gradient has reached C~."""

    __slots__ = ("spent", "__weakref__")

    def __init__(self) -> None:
        self.spent = False


#: serialises the in-place attuning of C~ (and reading C~ with its length) across threads
_ATTUNE_LOCK = threading.RLock()


def _new_lock_in_child() -> None:
    """In a forked child: a fresh lock (a thread of the parent may have held the old one at the
    fork, and no thread of the child would ever release it)."""
    global _ATTUNE_LOCK
    _ATTUNE_LOCK = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_lock_in_child)

#: the graphs each S4 module has built through its C~ (weakly held: a freed graph drops out)
_GRAPHS: weakref.WeakKeyDictionary[nn.Module, weakref.WeakSet] = weakref.WeakKeyDictionary()


def _replicated() -> bool:
    """Whether this process is one of several of a torch.distributed job (DDP, FSDP)."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


#: said once per process when a distributed S4 attunes C~ out of place
L_MAX_HINT = (
    "S4 under torch.distributed: C~ is attuned out of place at every forward (each process "
    "rewriting its own copy in place would desynchronise the replicas); pass l_max >= the "
    "longest input to attune it once, at construction"
)
_WARNED: set = set()


def _graph_pending(module: nn.Module) -> bool:
    """Whether a live autograd graph through ``module``'s C~ still awaits its backward."""
    return any(not t.spent for t in _GRAPHS.get(module, ()))


class S4(S4BlockBase):
    """S4 block: DPLR state matrix, bilinear discretisation, Cauchy-kernel convolution.

    Note: the second positional argument is ``bottleneck``, not ``d_state`` (the order of the
    original lrnnx and of state-spaces/s4): ``S4(64, 16)`` builds a block whose SSM runs on
    64 // 16 = 4 features, and warns (UserWarning) that ``S4(64, d_state=16)`` was probably
    meant.  Pass the state size by keyword.

    Arguments (see :class:`lrnnx.models.lti._s4_block.S4BlockBase` and the module docstring):
    the block (``bottleneck``, ``gate``, ``final_act``, ``dropout``, ``transposed``, ``channels``,
    ``l_max``), the SSM (``d_state``, ``rank``, ``n_ssm``, ``init``, ``is_real``), dt
    (``dt_min``, ``dt_max``, ``dt_tie``, ``dt_transform``, ``dt_fast``), the transforms of
    Re/Im(Lambda) and the optimizer hints ``lr``/``wd`` (``param._optim``).

    ``l_max``: the convolution kernel's length at most, as in state-spaces/s4's FFTConv: an
    input longer than ``l_max`` is convolved with the kernel cut at ``l_max`` taps, so its
    outputs from step ``l_max`` on forget the inputs more than ``l_max`` steps back, while
    ``step`` runs the recurrence, which never forgets (a UserWarning says so, once per module).
    None (the default): the kernel spans each input, and forward equals stepping.

    ``init``: 'legs' (HiPPO-LegS), 'legt' (needs rank >= 2), 'fout'/'fourier', 'hippo'
    (LegS + FouT), 'diag-lin' / 'diag-inv' / 'diag-legs' / 'diag-real' / ... (P = 0) or
    'dplr-<...>' (random P), 'diag' (Inv + Lin), 'all'.  ``is_real`` makes Lambda, P, B, C real
    (d_state real states, from the real parts of the complex init).

    Keyword arguments of the original lrnnx's S4 (its FFT-convolution options):
    ``kernel``: the kernel algorithm, always the DPLR Cauchy kernel here: None or 's4'
    (ValueError otherwise); ``swap_channels``: order the ``channels * H`` SSM outputs as
    (feature, channel) instead of (channel, feature); ``drop_kernel``: dropout probability on
    the convolution kernel while training.  Its HiPPO/DPLR init options (``B_clip``,
    ``diagonalize_precision``, ``real_random``, ``real_scale``, ``imag_random``,
    ``imag_scale``, ``B_random``, ``B_init``, ``B_scale``, ``P_scale``, ``normalize``) are
    accepted at their defaults only (ValueError otherwise).

    Example:
        >>> model = S4(d_model=64, d_state=64, l_max=1024)
        >>> y, _ = model(torch.randn(2, 64, 1024))  # transposed: (B, H, L) -> (B, H, L)
    """

    _name = "S4"

    def __init__(
        self,
        d_model: int,
        bottleneck: Optional[int] = None,
        gate: Optional[int] = None,
        final_act: Optional[str] = "glu",
        postact: Optional[str] = None,
        dropout: float = 0.0,
        tie_dropout: bool = False,
        transposed: bool = True,
        l_max: Optional[int] = None,
        channels: int = 1,
        d_state: int = 64,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_tie: bool = True,
        dt_transform: str = "exp",
        dt_fast: bool = False,
        rank: int = 1,
        n_ssm: Optional[int] = None,
        init: str = "legs",
        deterministic: bool = False,
        real_transform: str = "exp",
        imag_transform: str = "none",
        is_real: bool = False,
        lr: Union[float, Mapping[str, float], None] = None,
        wd: Union[float, Mapping[str, float], None] = 0.0,
        verbose: bool = True,
        *,
        kernel: Optional[str] = None,
        swap_channels: bool = False,
        drop_kernel: float = 0.0,
        B_clip: float = 2.0,
        diagonalize_precision: bool = True,
        real_random: bool = False,
        real_scale: float = 1.0,
        imag_random: bool = False,
        imag_scale: float = 1.0,
        B_random: bool = False,
        B_init: str = "constant",
        B_scale: float = 1.0,
        P_scale: float = 1.0,
        normalize: bool = False,
    ):
        check_kernel_name("S4", kernel)
        check_original_init_options(
            dict(
                B_clip=B_clip,
                diagonalize_precision=diagonalize_precision,
                real_random=real_random,
                real_scale=real_scale,
                imag_random=imag_random,
                imag_scale=imag_scale,
                B_random=B_random,
                B_init=B_init,
                B_scale=B_scale,
                P_scale=P_scale,
                normalize=normalize,
            )
        )
        super().__init__(
            "bilinear",
            d_model,
            bottleneck=bottleneck,
            gate=gate,
            final_act=final_act,
            postact=postact,
            dropout=dropout,
            tie_dropout=tie_dropout,
            transposed=transposed,
            l_max=l_max,
            channels=channels,
            d_state=d_state,
            dt_min=dt_min,
            dt_max=dt_max,
            dt_tie=dt_tie,
            dt_transform=dt_transform,
            dt_fast=dt_fast,
            rank=rank,
            n_ssm=n_ssm,
            init=init,
            deterministic=deterministic,
            real_transform=real_transform,
            imag_transform=imag_transform,
            is_real=is_real,
            lr=lr,
            wd=wd,
            verbose=verbose,
            swap_channels=swap_channels,
            drop_kernel=drop_kernel,
        )

    # ---- parameters -------------------------------------------------------------------------

    def _init_ssm(self) -> None:
        A, P, B, C = self._init_abc(self.rank)  # 'legt' raises for rank < 2
        self._register_abc(A, B, C)
        dtype = torch.get_default_dtype()
        P = P.real.to(dtype) if self.is_real else torch.view_as_real(P.contiguous()).to(dtype)
        self.register("P", P.contiguous(), "A")
        # length that the parameter C~ = C (I - dA^L) is attuned to (0: C holds C itself): a
        # Python int, which forwards read (no device sync; no tensor for torch.compile to guard
        # on), mirrored in a 0-d int64 CPU tensor, the module's extra state in state_dicts (a
        # tensor, so that they stay dicts of tensors: clone, safetensors, EMA loops); a reset
        # writes 0 into the existing record, which state_dicts taken before share
        if "_kernel_length" in self.__dict__:
            self.l_kernel = 0
        else:
            self._l_kernel = 0
            self._kernel_length = torch.zeros((), dtype=torch.int64, device="cpu")
        # (not on the meta device: no values to attune; a load sets C and its length, and a
        # reset after to_empty attunes the drawn C; not for a sharded C, which each forward
        # attunes out of place, see _rewrite_allowed)
        own = list(self.parameters(recurse=False))
        if self.l_max is not None and not any(p.is_meta or _is_dtensor(p) for p in own):
            self._ensure_length(self.l_max)

    @property
    def l_kernel(self) -> int:
        """The length C~ is attuned to (0: not yet; C then holds C itself)."""
        if not torch.compiler.is_compiling():
            self._sync_length()
        return self._l_kernel

    @l_kernel.setter
    def l_kernel(self, value: int) -> None:
        self._l_kernel = int(value)
        self._kernel_length.fill_(self._l_kernel)  # (a compiled graph replays it too)

    def _sync_length(self) -> None:
        """Outside compiled graphs the record is the truth: a state_dict holds it, and an EMA
        loop's ``copy_`` into it, as into C, sets the length C is now attuned to.  (A compiled
        graph reads the Python int, as it was at compilation, and guards on it.)"""
        self._l_kernel = int(self._kernel_length)

    def __setstate__(self, state: Dict[str, Any]) -> None:
        """Unpickling (``torch.load`` of a whole module): a module pickled while its record was
        the dict ``{"l_kernel": n}`` gets the tensor record."""
        record = state.get("_kernel_length")
        if isinstance(record, Mapping):
            state["_l_kernel"] = int(record["l_kernel"])
            state["_kernel_length"] = torch.tensor(state["_l_kernel"], dtype=torch.int64)
        super().__setstate__(state)

    def _load_from_state_dict(self, state_dict, prefix, *args: Any, **kwargs: Any) -> None:
        """torch's, under the attuning lock in eager mode: C~ and its length are loaded in one
        step, never between another thread's in-place rewrite of C and that of its length."""
        if torch.compiler.is_compiling():
            super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
            return
        with _ATTUNE_LOCK:
            super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def get_extra_state(self) -> Tensor:
        """``l_kernel`` as a 0-d int64 CPU tensor: the module's own record, not a copy.  A
        state_dict shares C with the module (as torch's do, which in-place updates through it
        rely on, e.g. EMA), so it shares the length C is attuned to as well: the two stay
        matched when a forward attunes C in place after the state_dict was taken, and an
        in-place update of both (an EMA's ``copy_``, as timm's ModelEmaV3 does) leaves them
        matched in the module: eager forwards read the record back (a compiled one reads the
        length it was compiled with until an eager call does).  A blend written into it (timm's
        ModelEmaV2, ``copy_(decay * e + (1 - decay) * m)``) is truncated to an integer by the
        copy, which can lose a step (a length one short): EMA loops should copy non-float
        entries, as ModelEmaV3 does.  A copy (``clone``, ``copy.deepcopy``, ``torch.save``,
        safetensors) is a consistent snapshot."""
        self._sync_length()
        return self._kernel_length

    def set_extra_state(self, state: Union[Tensor, Mapping[str, int], int]) -> None:
        """Take ``l_kernel`` from a state_dict: the tensor :meth:`get_extra_state` gives (any
        numeric dtype or device: an averaged state_dict's value is rounded), or the
        ``{"l_kernel": n}`` of checkpoints written before it was a tensor.

        Raises:
            ValueError: not a single finite value >= 0.
        """
        value = state["l_kernel"] if isinstance(state, Mapping) else state
        if isinstance(value, Tensor):
            if value.numel() != 1:
                raise ValueError(
                    f"S4 extra state: expected one value (l_kernel), got shape {tuple(value.shape)}"
                )
            value = value.item()
        value = float(value)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"S4 extra state: expected l_kernel >= 0, got {value}")
        self.l_kernel = round(value)  # the value: never another module's record

    @property
    def state_dim(self) -> int:
        """Full state size: d_state (both halves of each conjugate pair, or real states)."""
        return self.N if self.is_real else 2 * self.N

    def _P(self) -> Tensor:
        P = self.P if self.is_real else torch.view_as_complex(self.P.contiguous())  # (see _C)
        return P.repeat(1, self.H // self.n_ssm, 1)  # (R, H, N)

    def _full(self, x: Tensor) -> Tensor:
        """Append the conjugate half along the last axis (no-op for real SSMs)."""
        # conj_physical here and below, not the lazy conj() view: torch.export 2.4 recursed
        # without end on that view ("maximum recursion depth exceeded", in its functionalized
        # clone); parameter-sized tensors (R, H, N), copied once more at most
        return x if self.is_real else torch.cat([x, x.conj_physical()], dim=-1)

    def _dense(self, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
        """Dense bilinear dA (H, Nf, Nf) and dB (H, Nf) of the full system A = Lambda - P P^*."""
        Lam = self._full(self._A_diag().to(dtype))
        P = self._full(self._P().to(dtype))
        dt = self._full(self._dt().expand(self.H, self.N).to(dtype))
        # (conj_physical: see _full)
        A = torch.diag_embed(Lam) - torch.einsum("rhm,rhn->hmn", P, P.conj_physical())
        half = dt[..., None] / 2 * A  # Delta A / 2 with Delta = diag(dt)
        eye = torch.eye(A.shape[-1], dtype=dtype, device=A.device)
        lhs = eye - half
        dA = torch.linalg.solve(lhs, eye + half)
        dB = torch.linalg.solve(lhs, (dt * self._full(self._B().to(dtype)))[..., None])[..., 0]
        return dA, dB

    @property
    def _wide_dtype(self) -> torch.dtype:
        return torch.float64 if self.is_real else torch.complex128

    @torch.no_grad()
    def _ensure_length(self, L: int) -> None:
        """Attune C~ to a length >= L: set it up at L, or double the current length."""
        if self.l_kernel == 0:
            self._multiply_C(L, sign=-1.0)
            self.l_kernel = int(L)
            if self.verbose:
                log.info("S4: initializing kernel to length %d", L)
        while L > self.l_kernel:
            length = self.l_kernel
            self._multiply_C(length, sign=1.0)
            self.l_kernel = 2 * length
            if self.verbose:
                log.info("S4: doubling kernel length from %d to %d", length, 2 * length)

    def _multiply_C(self, L: int, sign: float) -> None:
        """C <- C (I + sign * dA^L), computed in double precision."""
        C = self._attune(self._C(), [(L, sign)])
        self.C.copy_(C.to(self.C.dtype) if self.is_real else torch.view_as_real(C).to(self.C.dtype))

    def _attune(self, C: Tensor, factors: list) -> Tensor:
        """C (I + sign_1 dA^L_1) (I + sign_2 dA^L_2) ... for ``factors`` [(L_i, sign_i)], in
        double precision, back in C's dtype; differentiable (the out-of-place path of
        :meth:`_kernel_C`) and used under no_grad by :meth:`_multiply_C`."""
        dA, _ = self._dense(self._wide_dtype)
        Cw = self._full(C.to(self._wide_dtype))
        for L, sign in factors:
            Cw = Cw + sign * torch.einsum("chm,hmn->chn", Cw, torch.linalg.matrix_power(dA, L))
        return Cw[..., : self.N].to(C.dtype)

    def _rewrite_allowed(self) -> bool:
        """Whether C~ may be re-attuned in place (:meth:`_ensure_length`): C is the module's own
        nn.Parameter (not a tensor torch.func.functional_call put in its place, which belongs to
        the caller), no gradient is pending on it (the gradients accumulated over several
        backward calls must all be with respect to one C~), no live graph through C~ awaits its
        backward (under torch.compile, which such a graph escapes: no graph records through C
        unless C~ is attuned for the first time), and no torch.func transform runs."""
        C = self.C
        if not isinstance(C, torch.nn.Parameter) or C.grad is not None or transformed(C):
            return False
        if recording_program():  # an exported/traced program would rewrite C at every call
            return False
        if _replicated():
            # each process would attune its own copy at its own lengths: the replicas of DDP
            # (or the shards of FSDP) would drift apart, each gradient taken with respect to
            # another C~
            return False
        if torch.compiler.is_compiling():
            # a compiled graph is not tracked (:meth:`_track_graph`): where it records through
            # C, only the first attuning (nothing can have been built on C~ yet) is in place
            return self.l_kernel == 0 or not (torch.is_grad_enabled() and C.requires_grad)
        return not _graph_pending(self)

    def _kernel_C(self, L: int) -> Tuple[Tensor, int]:
        """C~ attuned to a kernel length M >= L, and M.

        In place where :meth:`_rewrite_allowed` (the parameter is rewritten and ``l_kernel``
        grows, once, as in state-spaces/s4); otherwise computed out of place for this call,
        differentiably from the parameter, leaving the module as it was."""
        if torch.compiler.is_compiling():  # (Dynamo traces no lock)
            C, M, factors = self._choose_C(L)
        else:
            # threads serving one model: the choice, an in-place attuning, the read of C~ with
            # its l_kernel (a copy, safe from a later rewrite) and the note of this call's
            # graph are one step, so no thread rewrites C~ under another's read or graph
            with _ATTUNE_LOCK:
                C, M, factors = self._choose_C(L)
        if factors and _replicated() and L_MAX_HINT not in _WARNED:
            _WARNED.add(L_MAX_HINT)
            warnings.warn(L_MAX_HINT, UserWarning, stacklevel=user_stacklevel())
        return (self._attune(C, factors) if factors else C), M

    def _choose_C(self, L: int) -> Tuple[Tensor, int, list]:
        """For :meth:`_kernel_C` (under the lock, in eager mode): C~ as this call reads it
        (attuned in place first where :meth:`_rewrite_allowed`; its graph noted), its length,
        and the factors that attune it out of place to a length M >= L (none: in place)."""
        factors: list = []
        rewrite = self._rewrite_allowed()
        if rewrite:
            self._ensure_length(L)
        M = self.l_kernel
        if not rewrite:
            if M == 0:
                M, factors = int(L), [(int(L), -1.0)]
            while L > M:
                factors.append((M, 1.0))
                M *= 2
        return self._track_graph(self._read_C()), M, factors

    def _read_C(self) -> Tensor:
        """C~ as a forward reads it: a copy in eager mode (safe from a later in-place attuning
        by another thread; differentiable), the parameter itself in a compiled graph."""
        return self._C() if torch.compiler.is_compiling() else self._C().clone()

    def _C_with_length(self, track: bool = False) -> Tuple[Tensor, int]:
        """C~ (:meth:`_read_C`) and the length it is attuned to, read together (under the lock
        in eager mode: never C~ of one length with another's); ``track``: the read notes its
        graph (:meth:`_track_graph`) in the same step."""
        if torch.compiler.is_compiling():
            return self._track_graph(self._C()) if track else self._C(), self.l_kernel
        with _ATTUNE_LOCK:
            C = self._read_C()
            return self._track_graph(C) if track else C, self.l_kernel

    def _track_graph(self, C: Tensor) -> Tensor:
        """C~ as this call uses it; where autograd records through the parameter C, the graph
        is noted (:func:`_graph_pending`) until its gradient reaches C~ or the graph is freed, so
        that a forward at a longer length meanwhile (a second loss summed into the same graph,
        say) attunes out of place: every part of one gradient is then with respect to one C~."""
        if (
            not (torch.is_grad_enabled() and self.C.requires_grad)
            or transformed(C)
            or torch.compiler.is_compiling()
        ):
            return C
        C = C.view_as(C)  # a node of this graph: the hook lives and dies with the graph
        token = _GraphToken()

        def reached(grad: Tensor) -> None:
            token.spent = True

        C.register_hook(reached)
        _GRAPHS.setdefault(self, weakref.WeakSet()).add(token)
        return C

    # ---- discrete system ----------------------------------------------------------------------

    def discretize(
        self, dtype: Optional[torch.dtype] = None, C_tilde: Optional[Tensor] = None
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """Dense discrete system of the full state: dA (H, Nf, Nf), dB (H, Nf), dC (C, H, Nf).

        dC is the true output matrix C, recovered from the parameter C~ as C~ (I - dA^L)^{-1}
        (``C_tilde``: C~ as the caller reads it, e.g. a view that notes a recorded graph).
        """
        if C_tilde is None:
            C_tilde, L = self._C_with_length()
        else:
            L = self.l_kernel
        return self._discrete_system(dtype, C_tilde, L)

    def _discrete_system(
        self, dtype: Optional[torch.dtype], C_tilde: Tensor, L: int
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """:meth:`discretize` for C~ attuned to length L (0: C~ is C)."""
        dtype = self.state_dtype if dtype is None else dtype
        dA, dB = self._dense(dtype)
        C = self._full(C_tilde.to(dtype))
        if L > 0:
            eye = torch.eye(dA.shape[-1], dtype=dtype, device=dA.device)
            lhs = (eye - torch.linalg.matrix_power(dA, L)).transpose(-1, -2)
            C = torch.linalg.solve(lhs, C.permute(1, 2, 0)).permute(2, 0, 1)
        return dA, dB, C

    def _state_matrices(self) -> Tuple[Tensor, Tensor]:
        return self._dense(self.state_dtype)

    def _step_system(self) -> Dict[str, Tensor]:
        """dA, dB, dC of the dense recurrence (computed in double precision, then cast; copies
        by setup_step: where the casts change nothing, a float64 real S4, dC would otherwise be
        the parameter C itself, which the first forward rewrites in place, C -> C~)."""
        # a recorded step notes its graph through C~, as a recorded forward does: a longer
        # forward meanwhile then attunes out of place (see _track_graph)
        dA, dB, dC = self._discrete_system(self._wide_dtype, *self._C_with_length(track=True))
        mats = (("dA", dA), ("dB", dB), ("dC", dC))
        return {k: t.to(self.state_dtype).contiguous() for k, t in mats}

    def _ssm_step(self, u: Tensor, cache: Dict[str, Any], graph: bool = False) -> Tensor:
        x = cache["lrnn_state"]
        x_new = (cache["dA"] @ (x.clone() if graph else x)[..., None])[..., 0]
        x_new = x_new + cache["dB"] * u[..., None]
        x.copy_(x_new)
        y = (cache["dC"] * x_new[:, None]).sum(-1)  # (B, C, H)
        return y if self.is_real else y.real

    # ---- kernel -------------------------------------------------------------------------------

    def compute_kernel(
        self, L: int, state: Optional[Tensor] = None
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """Kernel K (channels, H, L) and the response to an initial state (B, channels, H, L).

        The state x_{-1} enters as an extra input vector dB_s = dA x_{-1}, i.e.
        Delta B_s = (I + Delta A / 2) x_{-1}, whose kernel is C dA^{l+1} x_{-1}.
        """
        C, M = self._kernel_C(L)
        dt = self._dt().expand(self.H, self.N)
        Lam, B, P = self._A_diag(), self._B(), self._P()
        Q = P if self.is_real else P.conj_physical()  # (see _full)
        rights = [(dt * B)[None]]
        if state is not None:
            s = state if self.is_real else state[..., : self.N]
            s = s.to(Lam.dtype if self.is_real else C.dtype)
            # (A x)_kept = Lambda s - sum_r P_r (P_r^* x_full)
            Px = torch.einsum("rhn,bhn->brh", Q, s)
            Px = Px if self.is_real else 2 * Px.real
            As = Lam * s - torch.einsum("rhn,brh->bhn", P, Px.to(P.dtype))
            rights.append(s + dt * As / 2)
        n_in = sum(r.shape[0] for r in rights)
        rights.append(dt * P)
        lefts = torch.cat([C, Q], dim=0)
        num = lefts[:, None] * torch.cat(rights, dim=0)[None]  # (C+R, n_in+R, H, N)

        cdtype = torch.complex128 if self.A_real.dtype == torch.float64 else torch.complex64
        k = torch.arange(M // 2 + 1, dtype=torch.float64, device=num.device)
        omega = torch.polar(torch.ones_like(k), -2 * math.pi * k / M)
        a, b = (1 - omega).to(cdtype), ((1 + omega) / 2).to(cdtype)
        r = cauchy(
            num, dt * Lam, a, b, conj=not self.is_real, max_elements=self.kernel_max_elements
        )

        Cn, R = self.channels, self.rank
        # split, not sliced: the backward of four slices would zero and add four (C+R, n_in+R,
        # H, M/2+1) tensors, that of a split concatenates the four gradients once
        (k_CB, k_CP), (k_QB, k_QP) = (x.split([n_in, R], dim=1) for x in r.split([Cn, R], dim=0))
        k_CP, k_QP = b * k_CP, b * k_QP
        if R == 1:
            k_f = k_CB - k_CP * k_QB / (1 + k_QP)
        else:
            eye = torch.eye(R, dtype=r.dtype, device=r.device)
            X = torch.linalg.solve(eye + k_QP.permute(2, 3, 0, 1), k_QB.permute(2, 3, 0, 1))
            k_f = k_CB - torch.einsum("cshk,hksj->cjhk", k_CP, X)
        K = torch.fft.irfft(k_f, n=M)[..., :L]  # (C, n_in, H, L)
        k_state = K[:, 1:].transpose(0, 1) if state is not None else None
        return K[:, 0], k_state

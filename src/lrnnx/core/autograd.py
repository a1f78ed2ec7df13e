"""Second derivatives through lrnnx's custom autograd Functions.

A fused backward (a numba, Triton or chunked-recompute kernel) computes first-order gradients
only.  torch's ``once_differentiable`` marks such a backward, but its guard fires only when the
engine runs the marked node: ``torch.autograd.grad(g.sum(), params)`` after
``g = grad(loss, x, create_graph=True)`` never reaches that node, so the kernel's part of the
second derivative was silently dropped (``None`` with ``allow_unused=True``, or only the other
paths' share of a mixed graph: a wrong Hessian-vector product or gradient penalty).

Two remedies, chosen per Function:

* :func:`graph_by_formula`: where a plain torch formula of the same result exists and fits in
  memory at the sizes a second-order user runs (the FFT convolution, the Cauchy product, S7's
  forms), a backward asked for a graph (``create_graph=True``) recomputes the result with that
  formula under autograd and differentiates it (:func:`grads_by_recompute`), so every order is
  exact (the dense layer's backward takes torch's ``mm`` there instead);
* :func:`first_order`: the scan and convolution kernels, whose plain formula is the op's
  ``reference`` backend, raise :class:`SecondOrderError` under ``create_graph=True`` and say
  how to get second derivatives (``backend="reference"`` or ``LRNNX_BACKEND=reference``).

Inside a Function's backward, grad mode is on exactly when the caller asked for a graph of the
gradients (``create_graph=True``); that is the test both use.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor

from lrnnx.core.checks import _compiling


class SecondOrderError(RuntimeError):
    """A fused kernel's backward was asked for a graph of its gradients (second derivatives)."""


def first_order(op: str) -> Callable:
    """Decorator for the ``backward`` of a Function whose kernel gives first-order gradients
    only: runs it without a graph, as ``torch.autograd.function.once_differentiable`` does, and
    raises :class:`SecondOrderError` naming ``op`` when called with ``create_graph=True``
    (instead of returning gradients that second-order autograd would treat as constants)."""

    def decorate(backward: Callable) -> Callable:
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            if torch.is_grad_enabled():
                raise SecondOrderError(
                    f"{op}: the fused backward gives first-order gradients only, and a graph "
                    f"of them was asked for (create_graph=True: second derivatives, gradient "
                    f"penalties, Hessian-vector products).  Run the op on its reference backend "
                    f"for those: backend='reference', or LRNNX_BACKEND=reference for a whole "
                    f"model (slow, exact at every order)"
                )
            with torch.no_grad():
                return backward(ctx, *grads)

        return wrapper

    return decorate


def graph_by_formula(
    formula_of: Callable[[Any], Tuple[Callable[..., Tensor], Sequence[Optional[Tensor]]]],
) -> Callable:
    """Decorator for the ``backward`` of a Function with a plain differentiable formula:
    ``formula_of(ctx)`` gives that formula and the saved tensors it takes (the Function's first
    inputs, in order).  Asked for a graph of the gradients, the wrapper returns their gradients
    by :func:`grads_by_recompute` (None for the other inputs); otherwise it runs ``backward``
    without a graph, as ``torch.autograd.function.once_differentiable`` does."""

    def decorate(backward: Callable) -> Callable:
        @functools.wraps(backward)
        def wrapper(ctx, grad):
            if torch.is_grad_enabled():
                formula, inputs = formula_of(ctx)
                needs = ctx.needs_input_grad
                got = grads_by_recompute(formula, inputs, needs[: len(inputs)], grad)
                return (*got, *(None,) * (len(needs) - len(inputs)))
            with torch.no_grad():
                return backward(ctx, grad)

        return wrapper

    return decorate


def grads_by_recompute(
    formula: Callable[..., Tensor],
    inputs: Sequence[Optional[Tensor]],
    needs: Sequence[bool],
    grad: Tensor,
) -> Tuple[Optional[Tensor], ...]:
    """The gradients of ``formula(*inputs)`` with respect to the inputs marked in ``needs``,
    given the output's gradient ``grad``, as differentiable tensors: for a Function's backward
    called with ``create_graph=True``.

    ``inputs`` are the Function's saved inputs (in such a backward they carry their own history,
    so the result's graph reaches every earlier operation); ``formula`` recomputes the
    Function's output from them with differentiable torch operations.  Inputs not needed get
    None; a needed input the formula does not use gets zeros."""
    wanted = [x for x, need in zip(inputs, needs, strict=True) if need and x is not None]
    with torch.enable_grad():
        out = formula(*inputs)
        got = torch.autograd.grad(out, wanted, grad, create_graph=True, allow_unused=True)
    found = iter(
        g if g is not None else torch.zeros_like(x) for g, x in zip(got, wanted, strict=True)
    )
    return tuple(
        next(found) if need and x is not None else None
        for x, need in zip(inputs, needs, strict=True)
    )


def transformed(*tensors: Optional[Tensor]) -> bool:
    """Whether any of ``tensors`` is under a torch.func transform (a functorch wrapper: ``vmap``,
    ``grad``, ``jvp``, ``functional_call`` with them) or carries a forward-mode tangent
    (``torch.autograd.forward_ad``).

    lrnnx's fused kernels read raw memory, and its custom autograd Functions have no vmap or
    jvp rules: a call with such tensors takes the op's plain differentiable torch formula
    instead (its ``reference`` backend), which every transform handles.  Without this, a numba
    kernel under ``torch.no_grad()`` ran on the primal values and dropped the tangent (a JVP of
    None or a wrong one), and under ``vmap`` it crashed reading a wrapper's memory.  False while
    torch.compile traces (Dynamo handles the Functions as opaque calls).
    """
    # first: Dynamo 2.4 cannot trace peek_interpreter_stack ("Graph break due to unsupported
    # builtin"), which fullgraph=True and torch.export reject
    if _compiling():
        return False
    # a torch.func transform is active exactly when functorch's interpreter stack is not empty
    # (its wrappers never outlive the transform); one call, not one per tensor
    stack = getattr(torch._C._functorch, "peek_interpreter_stack", None)
    if stack is not None and stack() is not None:
        return True
    # tangents exist only inside a dual_level (its counter is -1 outside one): the per-tensor
    # unpack_dual, a Python call, is skipped on the common path
    if getattr(torch.autograd.forward_ad, "_current_level", 0) < 0:
        return False
    unpack = torch.autograd.forward_ad.unpack_dual
    return any(isinstance(t, Tensor) and unpack(t).tangent is not None for t in tensors)

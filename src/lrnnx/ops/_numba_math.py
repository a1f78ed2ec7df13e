"""Elementary functions for the numba kernels (``lrnnx.ops``' CPU backends), and the compile
options those kernels share.

``_exp``, ``_expm1``, ``_softplus``, ``_sigmoid`` and ``_sincos`` are typing stubs that numba
overloads per dtype: float32 gets branch-free polynomials (within 1-2 ulp of libm; see each body)
that LLVM inlines into the kernels' loops and vectorises, since numba has no vector libm without
Intel's SVML; float64 keeps libm, as torch does.  Used by the selective-scan kernels
(:mod:`lrnnx.ops.selective_scan.cpu`, :mod:`lrnnx.ops.selective_scan.cpu_lanes`), the causal
convolution's (:mod:`lrnnx.ops.causal_conv1d.cpu`) and the yardstick of
:mod:`lrnnx.bench_yardstick`.  ``_lane_count`` sizes the blocks of the kernels that put channels
in the vector lanes (the lane scan and the channels-last convolution).
"""

from __future__ import annotations

import math

from lrnnx.ops._numba import HAVE_NUMBA

#: channel-lane kernels compute a block's width rounded up to a multiple of this (one AVX2
#: float32 vector); the lanes past the block's channels hold zeros
LANE_QUANTUM = 8

if HAVE_NUMBA:
    import numba
    import numpy as np
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic, overload

    # the kernels may reorder sums (so reductions over the state vectorise); the range
    # reduction of exp uses explicit fma calls, which reassociation cannot merge
    _FAST = {"reassoc", "contract"}
    # error_model="numpy": x / 0 gives inf like torch, and no per-division zero check (a branch
    # that would stop LLVM from vectorising the loops)
    _HELPER = dict(cache=True, fastmath=_FAST, nogil=True, error_model="numpy")
    # elementary functions: compiled once per dtype, small enough for LLVM to inline them into
    # the loops (where they vectorise); no reassociation inside them
    _ELEMENTARY = dict(fastmath={"contract"}, error_model="numpy")

    @numba.njit(**_HELPER)
    def _lane_count(width):  # pragma: no cover - compiled
        """Lanes a block of ``width`` channels computes: whole vectors (:data:`LANE_QUANTUM`)."""
        return (width + LANE_QUANTUM - 1) // LANE_QUANTUM * LANE_QUANTUM

    # ------------------------------------------------------------------ elementary functions
    # float32: branch-free polynomials that LLVM inlines into the loops and vectorises (numba
    # has no vector exp without Intel's SVML).  float64 (tight checks): libm, as torch.

    @intrinsic
    def _f32_from_bits(typingctx, i):  # pragma: no cover - compiled
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.FloatType())

        return types.float32(types.int32), codegen

    @intrinsic
    def _bits_from_f32(typingctx, x):  # pragma: no cover - compiled
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.IntType(32))

        return types.int32(types.float32), codegen

    @intrinsic
    def _fma(typingctx, x, y, z):  # pragma: no cover - compiled
        def codegen(context, builder, signature, args):
            f32 = ir.FloatType()
            fnty = ir.FunctionType(f32, [f32, f32, f32])
            fn = builder.module.declare_intrinsic("llvm.fma", [f32], fnty)
            return builder.call(fn, args)

        return types.float32(types.float32, types.float32, types.float32), codegen

    def _is_f32(x) -> bool:
        return isinstance(x, types.Float) and x.bitwidth == 32

    def _exp(x):  # pragma: no cover - typing stub
        return math.exp(x)

    def _expm1(x):  # pragma: no cover - typing stub
        return math.expm1(x)

    def _softplus(x):  # pragma: no cover - typing stub
        return x if x > 20.0 else math.log1p(math.exp(x))

    def _sigmoid(x):  # pragma: no cover - typing stub
        return 1.0 / (1.0 + math.exp(-x))

    def _sincos(x):  # pragma: no cover - typing stub
        return math.sin(x), math.cos(x)

    # The float32 bodies avoid branches (min/max and comparisons-as-numbers are selects), so
    # the loops that call them stay vectorisable.

    def _exp_f32(x):  # pragma: no cover - compiled
        # exp(x) = 2^m exp(r), r = x - m ln2 in [-ln2/2, ln2/2] (ln2 split in two parts, fma
        # so no reassociation can merge them); degree-7 polynomial for exp(r), within 1 ulp;
        # 2^m is added to the result's exponent field (p in [0.7, 1.42] and m in [-126, 128]
        # keep it a normal number).  Past the float32 range: inf above ln(FLT_MAX); below -87
        # (exp(x) < 1.7e-38) the result is flushed to 0: denormal decays would cost ~100
        # cycles per operation downstream and change nothing measurable.  NaN stays NaN.
        lo, hi = np.float32(-87.0), np.float32(88.72283)
        xc = min(max(x, lo), hi)
        m = np.floor(xc * np.float32(1.4426950408889634) + np.float32(0.5))
        r = _fma(-m, np.float32(0.693359375), xc)
        r = _fma(-m, np.float32(-2.12194440e-4), r)
        p = np.float32(1.9875691500e-4)
        p = p * r + np.float32(1.3981999507e-3)
        p = p * r + np.float32(8.3334519073e-3)
        p = p * r + np.float32(4.1665795894e-2)
        p = p * r + np.float32(1.6666665459e-1)
        p = p * r + np.float32(5.0000001201e-1)
        p = p * r * r + r + np.float32(1.0)
        v = _f32_from_bits(_bits_from_f32(p) + (np.int32(m) << np.int32(23)))
        v = v if x >= lo else np.float32(0.0)
        v = v if x <= hi else np.float32(np.inf)
        return v if x == x else x  # (the comparisons above are false for NaN)

    def _expm1_f32(x):  # pragma: no cover - compiled
        # Taylor series to x^8 where exp(x) - 1 would cancel (|x| < 1/2: error < 1e-8 |x|)
        xs = min(max(x, np.float32(-0.5)), np.float32(0.5))
        p = np.float32(1.0 / 40320.0)
        p = p * xs + np.float32(1.0 / 5040.0)
        p = p * xs + np.float32(1.0 / 720.0)
        p = p * xs + np.float32(1.0 / 120.0)
        p = p * xs + np.float32(1.0 / 24.0)
        p = p * xs + np.float32(1.0 / 6.0)
        p = p * xs + np.float32(0.5)
        p = (p * xs + np.float32(1.0)) * xs
        small = np.float32(abs(x) < np.float32(0.5))
        return small * p + (np.float32(1.0) - small) * (_exp(x) - np.float32(1.0))

    def _softplus_f32(x):  # pragma: no cover - compiled
        # log(1 + e^x) = max(x, 0) + log1p(e^-|x|);  log1p(v) = 2 atanh(v / (2 + v)), v <= 1.
        # Above 20 the correction is below half an ulp of x: the result is x, as torch's.
        v = _exp(-abs(x))
        q = v / (np.float32(2.0) + v)
        q2 = q * q
        p = np.float32(1.0 / 13.0)
        p = p * q2 + np.float32(1.0 / 11.0)
        p = p * q2 + np.float32(1.0 / 9.0)
        p = p * q2 + np.float32(1.0 / 7.0)
        p = p * q2 + np.float32(1.0 / 5.0)
        p = p * q2 + np.float32(1.0 / 3.0)
        p = p * q2 + np.float32(1.0)
        return max(x, np.float32(0.0)) + np.float32(2.0) * q * p

    def _sigmoid_f32(x):  # pragma: no cover - compiled
        return np.float32(1.0) / (np.float32(1.0) + _exp(-x))

    def _sincos_f32(x):  # pragma: no cover - compiled
        # x = j pi/2 + r, |r| <= pi/4 (pi/2 split in three parts, fma); minimax polynomials
        # for sin r and cos r; the quadrant j mod 4 swaps and negates them
        j = np.floor(x * np.float32(0.6366197723675814) + np.float32(0.5))
        r = _fma(-j, np.float32(1.5703125), x)
        r = _fma(-j, np.float32(4.837512969970703125e-4), r)
        r = _fma(-j, np.float32(7.54978995489188216e-8), r)
        r2 = r * r
        ps = np.float32(-1.9515295891e-4)
        ps = ps * r2 + np.float32(8.3321608736e-3)
        ps = ps * r2 + np.float32(-1.6666654611e-1)
        sn = r + r * r2 * ps
        pc = np.float32(2.443315711809948e-5)
        pc = pc * r2 + np.float32(-1.388731625493765e-3)
        pc = pc * r2 + np.float32(4.166664568298827e-2)
        cs = np.float32(1.0) - np.float32(0.5) * r2 + r2 * r2 * pc
        q = np.int32(j)
        odd = np.float32(q & np.int32(1))
        s_neg = np.float32(1.0) - np.float32(2.0) * np.float32((q >> np.int32(1)) & np.int32(1))
        c_neg = np.float32(1.0) - np.float32(2.0) * np.float32(
            ((q + np.int32(1)) >> np.int32(1)) & np.int32(1)
        )
        sin_x = s_neg * (odd * cs + (np.float32(1.0) - odd) * sn)
        cos_x = c_neg * (odd * sn + (np.float32(1.0) - odd) * cs)
        return sin_x, cos_x

    @numba.njit(cache=True)
    def _softplus_f64(x):  # pragma: no cover - compiled
        return x if x > 20.0 else math.log1p(math.exp(x))  # torch's threshold

    @overload(_exp, jit_options=_ELEMENTARY)
    def _ol_exp(x):
        return _exp_f32 if _is_f32(x) else (lambda x: math.exp(x))

    @overload(_expm1, jit_options=_ELEMENTARY)
    def _ol_expm1(x):
        return _expm1_f32 if _is_f32(x) else (lambda x: math.expm1(x))

    @overload(_softplus, jit_options=_ELEMENTARY)
    def _ol_softplus(x):
        return _softplus_f32 if _is_f32(x) else (lambda x: _softplus_f64(x))

    @overload(_sigmoid, jit_options=_ELEMENTARY)
    def _ol_sigmoid(x):
        return _sigmoid_f32 if _is_f32(x) else (lambda x: 1.0 / (1.0 + math.exp(-x)))

    @overload(_sincos, jit_options=_ELEMENTARY)
    def _ol_sincos(x):
        return _sincos_f32 if _is_f32(x) else (lambda x: (math.sin(x), math.cos(x)))

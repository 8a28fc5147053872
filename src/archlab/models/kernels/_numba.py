"""Shared numba plumbing of the fused CPU kernels: import guard, jit decorator, vector math.

numba is optional at run time: when it cannot be imported (or a kernel fails to compile), the
callers fall back to the pure-torch implementations with a one-line notice. Kernels compile
lazily on first use for the dtypes actually seen, and are cached on disk (``cache=True``) when
numba finds a writable cache directory; otherwise they compile without a cache.

Vector math. numba has no vectorised ``exp``/``erf`` without Intel's SVML, so a loop that calls
``math.exp`` runs one element at a time (~1.7 ns each here, 10-20x a vectorised exp). The float32
kernels therefore use ``exp32``: Cody-Waite range reduction, a degree-7 polynomial and the 2^k
scale built from the exponent bits (an LLVM bitcast), all branch-free, so LLVM vectorises the loop
around it (16 lanes with AVX-512). Its relative error is below 2 ulp over the clamped range
[-87, 88] (below it returns exp(-87) ~ 1.6e-38 instead of a denormal). float64 kernels call the
exact ``math.exp``/``math.erf`` (they exist for the tests, where 1e-10 agreement matters more than
speed). Where 2 ulp is too coarse (the gated norms' sigmoid, whose error the gate's gradient sums
into in_proj's), ``vsigmoid`` takes a float32 through a vectorisable float64 exp and back: within
1 ulp of the correctly rounded sigmoid (torch's float32 sigmoid: 2 ulp).
"""

from __future__ import annotations

import itertools
import math
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

try:  # the whole module degrades to NUMBA = False
    import numba
    import numpy as np
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic, overload

    NUMBA = True
    IMPORT_ERROR: str | None = None
except Exception as exc:  # not installed, or a numba that does not match this numpy
    NUMBA = False
    IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

# Flags of the kernels' own arithmetic: reassociation lets LLVM vectorise the sums over channels
# (dB, dC, dw1, dw2) and contraction allows FMAs. No nnan/ninf: inf and nan propagate as usual.
# Helpers below (exp32, erf32) are compiled without them, and keep their exact evaluation order
# when inlined (LLVM's fast-math flags live on each instruction).
FASTMATH = {"reassoc", "contract"}
_notices: set[str] = set()


def notice_once(key: str, message: str) -> None:
    """Print ``message`` to stderr the first time ``key`` is seen in this process."""
    if key not in _notices:
        _notices.add(key)
        print(message, file=sys.stderr, flush=True)


def kernel(fn: Callable) -> Any:
    """``njit(nogil=True)`` with an on-disk cache when one can be written, else without.

    ``error_model="numpy"``: a float division is a plain IEEE division; numba's default checks
    for zero and raises, and that branch stops LLVM from vectorising any loop that divides.
    Kernels are serial over a range of work items ``[lo, hi)``; :func:`parallel_for` runs the
    ranges on Python threads (the kernels release the GIL). Serial kernels compile in a few
    seconds where ``parallel=True`` (numba's parfors) took ~10x longer, need no numba threading
    layer (none of its fork-safety caveats) and follow torch's thread count exactly.
    """
    opts: dict[str, Any] = dict(fastmath=FASTMATH, nogil=True, error_model="numpy")
    if os.environ.get("ARCHLAB_NUMBA_NO_CACHE") != "1":
        try:
            return numba.njit(cache=True, **opts)(fn)
        except Exception:  # no writable cache location: compile without one
            pass
    return numba.njit(**opts)(fn)


def helper(fn: Callable) -> Any:
    """A building block of several kernels, inlined into each at numba IR level (no call
    boundary, so the caller's loops vectorise as if written out), with the kernels' flags."""
    return numba.njit(inline="always", fastmath=FASTMATH, error_model="numpy")(fn)


_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_pid = 0  # a forked child inherits the pool object but not its threads: make a new one
_thread_cap = 1 << 30  # lowered when the OS refuses a thread (a ulimit, a container's pids cap)


_MIN_WORK_PER_THREAD = 1 << 16  # inner-loop elements below which a thread is not worth it


def parallel_for(fn: Callable, n_items: int, work: int, *args: Any) -> None:
    """Run ``fn(lo, hi, *args)`` over ``[0, n_items)`` on torch.get_num_threads() threads.

    ``work`` (inner-loop elements in all) keeps small calls such as decode steps on the calling
    thread: handing ~1e4 elements to another thread costs more than it saves. The range is cut
    into ~4 pieces per thread that the threads take in turn from a shared counter, so a thread
    the OS does not schedule (a shared machine) delays nothing: the others take its pieces.
    Every item writes only its own outputs, so the result does not depend on who ran what.
    """
    global _pool, _pool_size, _pool_pid, _thread_cap
    threads = max(1, min(torch.get_num_threads(), n_items, work // _MIN_WORK_PER_THREAD))
    threads = min(threads, _thread_cap)
    if threads == 1:
        fn(0, n_items, *args)
        return
    if _pool is None or _pool_size < threads or _pool_pid != os.getpid():
        _pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="archlab-kernel")
        _pool_size, _pool_pid = threads, os.getpid()
    pieces = min(n_items, 4 * threads)
    bounds = [n_items * i // pieces for i in range(pieces + 1)]
    counter = itertools.count()  # next() on it is atomic under the GIL
    done = threading.Semaphore(0)  # one release per finished piece, whoever ran it
    errors: list[BaseException] = []

    def worker() -> None:
        while (i := next(counter)) < pieces:
            try:
                fn(bounds[i], bounds[i + 1], *args)
            except BaseException as exc:  # re-raised on the calling thread
                errors.append(exc)
            finally:
                done.release()

    for _ in range(threads - 1):
        try:
            _pool.submit(worker)
        except RuntimeError as exc:  # "can't start new thread": the OS refused one
            _cap_threads(len(_pool._threads) + 1, exc)  # those that started, + the caller
            break
    worker()  # the calling thread works too, and takes every piece no thread took
    for _ in range(pieces):
        done.acquire()
    if errors:
        raise errors[0]


def _cap_threads(threads: int, exc: BaseException) -> None:
    """Run the kernels on at most ``threads`` threads (the caller included) from now on.

    The refused submit's work item stays queued; should a pool thread run it later it finds
    the pieces taken and returns (the caller waits for every piece, not for that item)."""
    global _thread_cap
    _thread_cap = max(1, threads)
    notice_once(
        "thread-cap",
        f"archlab: the system refused a kernel thread ({exc}); "
        f"the fused kernels go on with {_thread_cap} thread(s)",
    )


if NUMBA:

    def _bitcast(src: Any, dst: Any, llvm_type: Any) -> Any:
        """An intrinsic reinterpreting the bits of a ``src`` as a ``dst`` (an LLVM bitcast:
        vectorisable, no memory round trip); it builds 2^k from exponent bits in the exps."""

        @intrinsic
        def cast(typingctx, i):  # noqa: ARG001
            def codegen(context, builder, signature, args):  # noqa: ARG001
                return builder.bitcast(args[0], llvm_type)

            return dst(src), codegen

        return cast

    _i32_as_f32 = _bitcast(types.int32, types.float32, ir.FloatType())
    _i64_as_f64 = _bitcast(types.int64, types.float64, ir.DoubleType())

    _F = np.float32
    _LOG2E, _LN2_HI, _LN2_LO = _F(1.4426950408889634), _F(0.693359375), _F(-2.12194440e-4)
    _LO, _HI, _HALF, _ONE = _F(-87.0), _F(88.0), _F(0.5), _F(1.0)
    _P2, _P3, _P4, _P5, _P6, _P7 = (
        _F(1 / 2), _F(1 / 6), _F(1 / 24), _F(1 / 120), _F(1 / 720), _F(1 / 5040),
    )  # fmt: skip

    @numba.njit(inline="always", error_model="numpy")
    def exp32(x):
        """Vectorisable float32 exp; see the module docstring."""
        x = min(max(x, _LO), _HI)
        k = np.floor(x * _LOG2E + _HALF)
        r = (x - k * _LN2_HI) - k * _LN2_LO  # |r| <= ln2 / 2, Cody-Waite split of ln 2
        p = _P7
        p = p * r + _P6
        p = p * r + _P5
        p = p * r + _P4
        p = p * r + _P3
        p = p * r + _P2
        p = p * r + _ONE
        p = p * r + _ONE
        return p * _i32_as_f32((np.int32(k) + np.int32(127)) << np.int32(23))

    # erf by Abramowitz & Stegun 7.1.26 refined: |error| < 1.2e-7, one exp and one division
    _E_P = _F(0.3275911)
    _E_A1, _E_A2, _E_A3, _E_A4, _E_A5 = (
        _F(0.254829592), _F(-0.284496736), _F(1.421413741), _F(-1.453152027), _F(1.061405429),
    )  # fmt: skip
    _SQRT1_2 = _F(1 / math.sqrt(2))
    _INV_SQRT_2PI = _F(1 / math.sqrt(2 * math.pi))

    def vexp(x):  # typed dispatch: float32 -> exp32, float64 -> math.exp
        raise NotImplementedError

    @overload(vexp, inline="always")
    def _vexp(x):
        if x == types.float32:
            return lambda x: exp32(x)
        return lambda x: math.exp(x)

    _D = np.float64
    _D_LOG2E, _D_LN2 = _D(1.4426950408889634), _D(0.6931471805599453)
    _D_LO, _D_HI, _D_HALF, _D_ONE = _D(-708.0), _D(709.0), _D(0.5), _D(1.0)
    _D_P = tuple(_D(1 / math.factorial(i)) for i in range(10))

    @numba.njit(inline="always", error_model="numpy")
    def _exp_wide(x):
        """Vectorisable exp of a float64 in [-708, 709] (clamped: float64's normal range) to
        ~1e-11 relative: the float32 kernels' route to a sigmoid within 1 ulp (torch's is within
        2; exp32's 2 ulp error, through 1 / (1 + e), showed in summed gradients)."""
        x = min(max(x, _D_LO), _D_HI)
        k = np.floor(x * _D_LOG2E + _D_HALF)
        r = x - k * _D_LN2  # |r| <= ln2 / 2; degree 9 leaves r^10 / 10! < 1e-11
        p = _D_P[9]
        p = p * r + _D_P[8]
        p = p * r + _D_P[7]
        p = p * r + _D_P[6]
        p = p * r + _D_P[5]
        p = p * r + _D_P[4]
        p = p * r + _D_P[3]
        p = p * r + _D_P[2]
        p = p * r + _D_ONE
        p = p * r + _D_ONE
        return p * _i64_as_f64((np.int64(np.int32(k)) + np.int64(1023)) << np.int64(52))

    def vsigmoid(v):  # typed dispatch: float32 through _exp_wide, float64 with math.exp
        raise NotImplementedError

    @overload(vsigmoid, inline="always")
    def _vsigmoid(v):
        if v == types.float32:
            return lambda v: np.float32(_D_ONE / (_D_ONE + _exp_wide(-np.float64(v))))
        return lambda v: 1.0 / (1.0 + math.exp(-v))

    _TWO, _ZERO = _F(2.0), _F(0.0)
    _L3, _L5, _L7, _L9, _L11, _L13, _L15, _L17 = (
        _F(1 / 3), _F(1 / 5), _F(1 / 7), _F(1 / 9), _F(1 / 11), _F(1 / 13), _F(1 / 15), _F(1 / 17),
    )  # fmt: skip

    @numba.njit(inline="always", error_model="numpy")
    def _softplus32(v):
        """log(1 + exp(v)) = max(v, 0) + log1p(exp(-|v|)) with log1p(x) = 2 atanh(x / (2 + x)),
        x in (0, 1] so s = x / (2 + x) <= 1/3: the odd series to s^17 is exact to 1e-9."""
        x = exp32(-abs(v))
        s = x / (_TWO + x)
        s2 = s * s
        p = _L17
        p = p * s2 + _L15
        p = p * s2 + _L13
        p = p * s2 + _L11
        p = p * s2 + _L9
        p = p * s2 + _L7
        p = p * s2 + _L5
        p = p * s2 + _L3
        p = p * s2 + _ONE
        return max(v, _ZERO) + _TWO * s * p

    def vsoftplus(v):  # typed dispatch: float32 vectorisable, float64 exactly as torch
        raise NotImplementedError

    @overload(vsoftplus, inline="always")
    def _vsoftplus(v):
        if v == types.float32:
            return lambda v: _softplus32(v)
        return lambda v: v if v > 20.0 else math.log1p(math.exp(v))

    @numba.njit(inline="always", error_model="numpy")
    def _gelu32(x):
        """(gelu(x), gelu'(x)) in float32 with one exp: Phi from A&S erf, phi shares its exp."""
        z = abs(x) * _SQRT1_2
        t = _ONE / (_ONE + _E_P * z)
        e = exp32(-z * z)  # exp(-x^2 / 2)
        poly = ((((_E_A5 * t + _E_A4) * t + _E_A3) * t + _E_A2) * t + _E_A1) * t
        erf_abs = _ONE - poly * e
        erf = erf_abs if x >= 0 else -erf_abs
        cdf = _HALF * (_ONE + erf)
        return x * cdf, cdf + x * e * _INV_SQRT_2PI

    def gelu_and_grad(x):  # typed dispatch as vexp
        raise NotImplementedError

    @overload(gelu_and_grad, inline="always")
    def _gelu_and_grad(x):
        if x == types.float32:
            return lambda x: _gelu32(x)

        def exact(x):
            cdf = 0.5 * (1.0 + math.erf(x * 0.7071067811865476))
            return x * cdf, cdf + x * math.exp(-0.5 * x * x) * 0.3989422804014327

        return exact


def run_isolated(fn: Callable[[], None]) -> None:
    """Run a kernel warm-up (a tiny forward and backward) in a fresh thread, re-raising its error.

    The caller may be inside torch.utils.checkpoint's recomputation, inference mode, no_grad
    or autocast: all thread-local, so none of them reaches the new thread. Inside a
    recomputation the warm-up's own saved tensors would otherwise stop the recompute
    (_StopRecomputationError) and disable the kernel mid-step."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            with torch.inference_mode(False), torch.enable_grad():
                fn()
        except BaseException as exc:  # re-raised in the caller's thread
            errors.append(exc)

    thread = threading.Thread(target=target, name="archlab-kernel-warm-up", daemon=True)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


def warm_up_once(done: set[torch.dtype], dtype: torch.dtype, tiny_step: Callable[[], None]) -> None:
    """Compile (or load from numba's cache) a kernel family for ``dtype`` once per process by
    one tiny forward and backward (``tiny_step``, run isolated), so a compile failure shows
    before training starts and never in the middle of a backward pass; raises on failure."""
    if dtype in done:
        return
    if not NUMBA:
        raise RuntimeError("numba is not available")
    run_isolated(tiny_step)
    done.add(dtype)

"""What every fused decode step shares (kernels/decode_cpu.py holds the blocks' own).

The kernels a block's step is built from (a linear map, LayerNorm / RMSNorm, the residual MLP)
and the Python side around every call: a plan per module (its parameters found once, the numpy
views of its weights rebuilt when a parameter changes), the norm and MLP arrays in kernel
order, and the call over batch rows that falls back to torch when the kernel fails.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn

from ._numba import NUMBA, kernel, parallel_for

MLP_NONE, MLP_GELU_TANH, MLP_SWIGLU = 0, 1, 2
_SQRT_2_OVER_PI = 0.7978845608028654

if NUMBA:
    from ._numba import vexp

    @kernel
    def _linear(W, b, x, out):
        """out = W x + b; W (rows, C) row-major, so the inner loop is a contiguous dot product."""
        rows, C = W.shape
        for o in range(rows):
            acc = b[o]
            for c in range(C):
                acc += W[o, c] * x[c]
            out[o] = acc

    @kernel
    def _norm(x, w, b, eps, rms, out):
        """LayerNorm (biased variance) or, with ``rms``, RMSNorm of x (D,); eps (1,) array.
        b is a zero vector where the norm has no bias."""
        D = x.shape[0]
        mean = np.zeros(1, dtype=x.dtype)[0]
        if not rms:
            for d in range(D):
                mean += x[d]
            mean = mean / D
        var = np.zeros(1, dtype=x.dtype)[0]
        for d in range(D):
            c = x[d] - mean
            var += c * c
        inv = 1.0 / np.sqrt(var / D + eps[0])
        for d in range(D):
            out[d] = (x[d] - mean) * inv * w[d] + b[d]

    @kernel
    def _mlp_residual(r, nw, nb, ne, rms, kind, fcw, fcb, pw, pb, xn, hid, tmp):
        """r += MLP(Norm(r)) in place; kind 1: GELU (tanh), 2: SwiGLU (fc rows: gate, then up)."""
        one = np.ones(1, dtype=r.dtype)[0]
        c = np.empty(2, dtype=r.dtype)  # the GELU constants in r's dtype (a Python float
        c[0] = _SQRT_2_OVER_PI  # would promote float32 arithmetic to float64)
        c[1] = 0.044715
        k0, k1 = c[0], c[1]
        _norm(r, nw, nb, ne, rms, xn)
        _linear(fcw, fcb, xn, hid)
        H = pw.shape[1]
        if kind == 2:
            for j in range(H):
                g = hid[j]
                hid[j] = g / (one + vexp(-g)) * hid[H + j]
        else:
            for j in range(H):
                v = hid[j]
                u = k0 * (v + k1 * v * v * v)
                hid[j] = v / (one + vexp(-(u + u)))  # 0.5 v (1 + tanh u) = v sigmoid(2 u)
        _linear(pw, pb, hid[:H], tmp)
        for d in range(r.shape[0]):
            r[d] += tmp[d]


# ---- Python side: a plan per module (its parameters, found once), numpy views, the calls ------
_epoch = 0  # bumped whenever any module registers a parameter or a submodule


def _structure_changed(*_args: object) -> None:
    """A parameter or submodule was assigned somewhere (load_state_dict(assign=True), surgery):
    every plan is rebuilt before its next use, so none computes with a replaced parameter."""
    global _epoch
    _epoch += 1


torch.nn.modules.module.register_module_parameter_registration_hook(_structure_changed)
torch.nn.modules.module.register_module_module_registration_hook(_structure_changed)


class _Plan:
    """What one module's decode kernel needs, found once: its parameters in kernel order (walking
    the module tree per token cost more than the kernel), the dropouts that must be off, and
    the numpy views of the weights, rebuilt when a parameter changes (optimizer steps bump
    ``_version``; ``.to()``/``.double()`` swap storage and dtype)."""

    __slots__ = ("epoch", "params", "drops", "build", "key", "weights", "dtype", "views")

    def __init__(
        self,
        params: tuple[Tensor, ...] | None,
        drops: tuple[nn.Dropout, ...] = (),
        build: Callable[[], tuple] | None = None,
    ) -> None:
        self.epoch = _epoch
        self.params, self.drops, self.build = params, drops, build  # params None: unsupported
        self.key: tuple | None = None
        self.weights: tuple | None = None
        self.dtype: torch.dtype | None = None
        self.views: tuple = ()  # (state tensors, their numpy views) of the last call

    def __deepcopy__(self, memo: dict) -> None:
        """A copied module makes its own plan (this one's build reads the original's weights)."""
        return None

    def state_views(self, tensors: tuple[Tensor, ...]) -> tuple[np.ndarray, ...]:
        """numpy views of the decode state tensors (which the kernel updates in place), kept
        while the same tensors come back: the next token of one generation."""
        views = self.views
        if len(views) != 2 or any(a is not b for a, b in zip(views[0], tensors, strict=True)):
            views = self.views = (tensors, tuple(_np(t) for t in tensors))
        return views[1]

    def arrays(self, module: nn.Module, x: Tensor) -> tuple | None:
        """The weight arrays when the kernel applies to ``x``, else None. It applies to
        inference on CPU in float32/float64 with one dtype throughout: no autograd through the
        parameters, no dropout to apply."""
        from . import fused_available

        params = self.params
        if (
            params is None
            or x.device.type != "cpu"
            or (torch.is_grad_enabled() and any(p.requires_grad for p in params))
            or (module.training and any(d.p > 0 for d in self.drops))
            or not fused_available("decode_step")
        ):
            return None
        key = tuple([(p.data_ptr(), p._version, p.dtype) for p in params])
        if key != self.key:
            dtype = params[0].dtype
            ok = dtype in (torch.float32, torch.float64) and all(
                p.dtype == dtype and p.device.type == "cpu" for p in params
            )
            assert self.build is not None
            self.weights, self.dtype = (self.build(), dtype) if ok else (None, None)
            self.key = key
        return self.weights if x.dtype == self.dtype else None


def _plan(module: nn.Module, make: Callable[[nn.Module], _Plan]) -> _Plan:
    """The module's plan, made on first use and again after any structure change. Kept in the
    instance dict (a plain attribute, not a registered parameter or submodule)."""
    plan = module.__dict__.get("_decode_plan")
    if plan is None or plan.epoch != _epoch:
        plan = module.__dict__["_decode_plan"] = make(module)
    return plan


def _np(t: Tensor) -> np.ndarray:
    return t.detach().numpy()


def _arr(t: Tensor | None, like: Tensor, n: int) -> np.ndarray:
    """t as a contiguous numpy array, or zeros (n,) of like's dtype when t is None."""
    if t is None:
        return np.zeros(n, dtype=_np(like).dtype)
    return _np(t.detach().contiguous())


def _norm_params(norm: nn.Module | None) -> tuple[Tensor, ...] | None:
    """The tensors of a LayerNorm / RMSNorm the kernels implement; None for anything else."""
    from ..layers import RMSNorm

    if isinstance(norm, RMSNorm):
        return (norm.weight,)
    if isinstance(norm, nn.LayerNorm) and norm.elementwise_affine and len(norm.weight.shape) == 1:
        return (norm.weight,) if norm.bias is None else (norm.weight, norm.bias)
    return None


def _norm_arrays(norm: nn.Module) -> tuple:
    """(weight, bias or zeros, eps (1,), rms) for the kernels."""
    from ..layers import RMSNorm

    w = norm.weight
    bias = None if isinstance(norm, RMSNorm) else norm.bias
    eps = np.full(1, norm.eps, dtype=_np(w).dtype)
    return _arr(w, w, 0), _arr(bias, w, w.shape[0]), eps, isinstance(norm, RMSNorm)


def _mlp_kind(ffn: nn.Module | None) -> int | None:
    from ..layers import MLP, SwiGLU

    if ffn is None:
        return MLP_NONE
    if isinstance(ffn, SwiGLU):
        return MLP_SWIGLU
    if isinstance(ffn, MLP):
        return MLP_GELU_TANH
    return None


def _linear_params(lin: nn.Linear) -> tuple[Tensor, ...]:
    return (lin.weight,) if lin.bias is None else (lin.weight, lin.bias)


def _mlp_params(ffn: nn.Module | None) -> tuple[Tensor, ...]:
    return () if ffn is None else _linear_params(ffn.fc) + _linear_params(ffn.proj)


def _mlp_arrays(ffn: nn.Module | None, like: Tensor) -> tuple:
    """(fc weight, fc bias, proj weight, proj bias) with zero biases where absent; 1-row
    placeholders for a block without MLP (its kernel never reads them)."""
    if ffn is None:
        z = np.zeros((1, 1), dtype=_np(like).dtype)
        return z, z[0], z, z[0]
    fc, proj = ffn.fc, ffn.proj
    return (
        _arr(fc.weight, like, 0),
        _arr(fc.bias, like, fc.out_features),
        _arr(proj.weight, like, 0),
        _arr(proj.bias, like, proj.out_features),
    )


def _run(fn: Callable, rows: int, work: int, *args) -> bool:
    """Call a decode kernel over batch rows; on failure (compile error) disable the fused decode
    steps with a one-line notice and return False (the caller takes the torch path)."""
    from . import disable_fused, kernel_notice

    try:
        if rows == 1:  # one sequence: no thread hand-off to consider
            fn(0, 1, *args)
        else:
            parallel_for(fn, rows, work, *args)
    except Exception as exc:
        disable_fused("decode_step", exc)
        kernel_notice("decode_step", "decode: fused CPU steps unavailable, using torch ops")
        return False
    return True


def _tokens(x: Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A block's one-token input x (B, 1, D) as a (B, D) numpy view, and its output: a new
    (B, 1, D) array and its (B, D) view for the kernel."""
    B, _, D = x.shape
    xn = _np(x if x.is_contiguous() else x.contiguous()).reshape(B, D)
    out = np.empty((B, 1, D), dtype=xn.dtype)
    return xn, out, out.reshape(B, D)

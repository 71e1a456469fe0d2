"""Product units, sigma-pi units with sparse conjuncts, and the pi-sigma network (the multiplicative
units beyond the bilinear form; docs/modules.md).

* :func:`product_unit` — ``o_k = Σ_j v_kj Π_i x_i^{w_ji}`` in log space (Durbin & Rumelhart): one
  fused Triton kernel builds both GEMM operands from one load of ``x`` (``log|x|`` and ``[x < 0]``)
  and applies ``exp · cos`` (and ``exp · sin``, for the backward) in its epilogue; a second fused
  kernel gives ``dW`` the same way.
* :func:`sigma_pi_unit` — ``o = g(Σ_q w_q Π_{k∈q} z_k)`` over a given list of conjuncts (index
  tuples), and :func:`pi_sigma` — ``o = g(Π_k (w_k·z + b_k))``: compositions of torch ops (a
  gather and a product, or a GEMM and a product: no traffic a fused kernel would save beyond the
  GEMM's).

Order in this file: config -> launchers and the CPU path -> torch.library ops -> autograd.Function
-> public functionals.
Kernels live in ``triton_kernels/product.py`` (``mmkernels._triton.product``).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Tuple, Union

import torch

from mmkernels import _backend, _cpp
from mmkernels.ops._checks import FLOATS as _FLOATS
from mmkernels.ops._checks import check_same as _check_same
from mmkernels.ops._checks import check_tensor as _check_tensor
from mmkernels.ops._util import acc_dtype, cdiv, math_dtype

#: |x| below this is clamped to it before the log (log 0 = -inf): x = 0 acts as ±2^-100 ≈ 7.9e-31
#: — its power is ~0 for positive exponents and huge for negative ones (documented in
#: product_unit). A power of two: exact as the kernels' float32 argument.
PRODUCT_EPS = 2.0 ** -100

_ACTIVATIONS = {None: lambda t: t, "identity": lambda t: t, "sigmoid": torch.sigmoid, "tanh": torch.tanh,
                "relu": torch.relu}


def _activation(name: Union[str, Callable, None]) -> Callable[[torch.Tensor], torch.Tensor]:
    if callable(name):
        return name
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(k for k in _ACTIVATIONS if k)} or a callable, got {name!r}")
    return _ACTIVATIONS[name]


# ----------------------------------------------------------------------------------------------
# Product unit: config, launchers, CPU path
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ProductConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int


def resolve_config(M: int, N: int, K: int) -> ProductConfig:
    """One tile shape for both kernels. IEEE dots (the exp in the epilogue would amplify TF32's
    10-bit mantissa) run on the FMA units with the operands in registers: the compile tier showed
    64 x 64 x 32 tiles spilling (1.5 KB of stack in the dW kernel) and 32 x 32 x 32 still 120-200
    bytes; 32 x 32 x 16 does not spill (fp32: 164-168 registers on sm_90)."""
    return ProductConfig(32, 32, 16, 4)


def launch_configs():
    """Every config the resolver returns (the compile tier's coverage)."""
    return [resolve_config(1, 1, 1)]


def triton_terms(x, w) -> Tuple[torch.Tensor, torch.Tensor]:
    """(P, Q) = exp(A)·(cos πB, sin πB) with A = log(max(|x|, eps))·Wᵀ, B = [x < 0]·Wᵀ: (N, J) in
    the math dtype, the exp·cos / exp·sin in the kernel's epilogue."""

    from mmkernels._triton import product as K

    N, I = x.shape
    J = w.shape[0]
    acc = math_dtype(x.dtype)
    p = torch.empty((N, J), dtype=acc, device=x.device)
    q = torch.empty((N, J), dtype=acc, device=x.device)
    cfg = resolve_config(N, J, I)
    K.product_terms_kernel[(cdiv(N, cfg.block_m), cdiv(J, cfg.block_n))](
        x_ptr=x, w_ptr=w, p_ptr=p, q_ptr=q, M=N, N=J, K=I,
        sx_m=x.stride(0), sx_k=x.stride(1), sw_n=w.stride(0), sw_k=w.stride(1),
        so_m=p.stride(0), so_n=p.stride(1), eps=PRODUCT_EPS,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        ACC=acc_dtype(acc), num_warps=cfg.num_warps,
    )
    return p, q


def triton_dweight(x, da, db, w_dtype) -> torch.Tensor:
    """dW = daᵀ·log(max(|x|, eps)) + dbᵀ·[x < 0], (J, I), the operands built from one load of x."""

    from mmkernels._triton import product as K

    N, I = x.shape
    J = da.shape[1]
    dw = torch.empty((J, I), dtype=da.dtype, device=x.device)
    cfg = resolve_config(J, I, N)
    K.product_dweight_kernel[(cdiv(J, cfg.block_m), cdiv(I, cfg.block_n))](
        x_ptr=x, da_ptr=da, db_ptr=db, dw_ptr=dw, M=J, N=I, K=N,
        sx_k=x.stride(0), sx_n=x.stride(1), sd_k=da.stride(0), sd_m=da.stride(1),
        so_m=dw.stride(0), so_n=dw.stride(1), eps=PRODUCT_EPS,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        ACC=acc_dtype(da.dtype), num_warps=cfg.num_warps,
    )
    return dw.to(w_dtype)


def _log_and_sign(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    xm = x.to(math_dtype(x.dtype))
    return torch.log(xm.abs().clamp_min(PRODUCT_EPS)), (xm < 0).to(xm.dtype)


def _cpp_product(*ts: torch.Tensor):
    """``torch.ops.mmkernels_cpu`` when the C++ product steps (csrc/product.cpp) are selected,
    built and take these tensors (contiguous float32), else None (the torch composition)."""
    cpp = _cpp.ops()
    if cpp is None or not hasattr(cpp, "product_exp_cis_"):
        return None
    for t in ts:
        if t.dtype != torch.float32 or not t.is_contiguous():
            return None
    return cpp


def _exponents(x, w):
    """``log|x|``, ``[x < 0]`` and the two GEMMs of the CPU path, ``A = log|x|·Wᵀ`` and
    ``B = [x<0]·Wᵀ``, in the math dtype (torch ops: differentiable)."""
    lg, neg = _log_and_sign(x)
    wm = w.to(lg.dtype)
    return lg, neg, lg @ wm.T, neg @ wm.T


def _cpu_terms(x, w, keep_logs: bool = False, need_q: bool = True):
    """(P, Q) on the CPU path (Q None unless ``need_q``: only the backward reads it);
    ``keep_logs``: also ``log|x|`` and ``[x < 0]``, which the backward's ``dW`` reads (saved
    rather than made again from ``x``). The two GEMMs are ATen's; exp·cos and exp·sin after them
    one C++ pass in place (float32), else torch ops."""
    lg, neg, a, b = _exponents(x, w)
    cpp = _cpp_product(a, b)
    if cpp is not None:
        cpp.product_exp_cis_(a, b, need_q)
        p, q = a, (b if need_q else None)
    else:
        ea, angle = torch.exp_(a), b.mul_(math.pi)
        p = torch.cos(angle).mul_(ea)  # ea·cos, ea·sin
        q = angle.sin_().mul_(ea) if need_q else None
    return (p, q, lg, neg) if keep_logs else (p, q)


def _cpu_dweight(x, da, db, w_dtype, logs=None) -> torch.Tensor:
    """daᵀ·log|x| + dbᵀ·[x<0]; ``logs``: the two from the forward (else made from ``x``)."""
    lg, neg = _log_and_sign(x) if logs is None else logs
    return (da.T @ lg + db.T @ neg).to(w_dtype)


def _fused(x: torch.Tensor) -> bool:
    return x.numel() > 0 and _backend.resolve(x) is _backend.Impl.TRITON


def _terms(x, w):
    return (triton_terms if _fused(x) else _cpu_terms)(x, w)


def _dweight(x, da, db, w_dtype):
    return (triton_dweight if _fused(x) else _cpu_dweight)(x, da, db, w_dtype)


# torch.library ops (so that torch.compile(fullgraph=True) traces them)

@torch.library.custom_op("mmkernels::product_terms", mutates_args=())
def product_terms_op(x: torch.Tensor, w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(P, Q) = exp(log|x|·Wᵀ)·(cos, sin)(π·[x<0]·Wᵀ) in the math dtype."""
    return _terms(x, w)


@product_terms_op.register_fake
def _(x, w):
    shape = (x.shape[0], w.shape[0])
    return x.new_empty(shape, dtype=math_dtype(x.dtype)), x.new_empty(shape, dtype=math_dtype(x.dtype))


@torch.library.custom_op("mmkernels::product_dweight", mutates_args=())
def product_dweight_op(x: torch.Tensor, da: torch.Tensor, db: torch.Tensor, w_dtype: torch.dtype) -> torch.Tensor:
    """daᵀ·log|x| + dbᵀ·[x<0] in ``w_dtype``."""
    return _dweight(x, da, db, w_dtype)


@product_dweight_op.register_fake
def _(x, da, db, w_dtype):
    return x.new_empty((da.shape[1], x.shape[1]), dtype=w_dtype)


class ProductTermsFunction(torch.autograd.Function):
    """P = exp(A)·cos(πB) with A = log|x|·Wᵀ, B = [x<0]·Wᵀ: (N, I), (J, I) -> (N, J).
    Saves x, W, P and Q = exp(A)·sin(πB) (math dtype; on the CPU path also log|x| and [x<0] when
    dW is needed); backward: dA = dP·P, dB = -π·dP·Q,
    dx = (dA·W) / x (0 where |x| was clamped; the sign indicator has no gradient),
    dW = dAᵀ·log|x| + dBᵀ·[x<0] (fused). Under ``create_graph`` the backward makes P, Q and the
    logs again from x and W with torch ops, so that its result is differentiable."""

    @staticmethod
    def forward(ctx, x, w, grad: bool = True):
        """``grad``: whether a backward can follow (grad mode on and an input requiring it); the
        CPU path skips Q without it."""
        logs = (None, None)
        if not _backend.direct_call_ok(x, w):
            p, q = product_terms_op(x, w)
        elif _fused(x):
            p, q = triton_terms(x, w)
        else:  # the CPU path keeps log|x| and [x < 0] for dW, as eager autograd would
            p, q, *logs = _cpu_terms(x, w, keep_logs=grad and ctx.needs_input_grad[1], need_q=grad)
        ctx.save_for_backward(x, w, p, q, *logs)
        return p.to(x.dtype)

    @staticmethod
    def backward(ctx, dp):
        x, w, p, q, lg, neg = ctx.saved_tensors
        if torch.is_grad_enabled():  # a double backward: P, Q and the logs again as torch ops of x
            lg, neg, a, b = _exponents(x, w)  # and W, so that the gradient below has a graph to them
            ea, angle = torch.exp(a), b * math.pi
            p, q = ea * torch.cos(angle), ea * torch.sin(angle)
        dp = dp.to(p.dtype)
        da = dp * p
        db = (dp * q).mul_(-math.pi)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dlog = da @ w.to(p.dtype)
            # the C++ step in place where no graph is recorded (it has no derivative of its own)
            # and nothing traces
            direct = not torch.is_grad_enabled() and _backend.direct_call_ok(dlog, x)
            cpp = _cpp_product(dlog, x) if direct else None
            if cpp is not None:
                cpp.product_dx_(dlog, x, PRODUCT_EPS)
                dx = dlog
            else:
                xm = x.to(p.dtype)
                dx = torch.where(xm.abs() > PRODUCT_EPS, dlog / xm, 0.0).to(x.dtype)
        if ctx.needs_input_grad[1]:
            if lg is not None:
                dw = _cpu_dweight(x, da, db, w.dtype, (lg, neg))
            elif _backend.direct_call_ok(x, da, db):
                dw = _dweight(x, da, db, w.dtype)
            else:
                dw = product_dweight_op(x, da, db, w.dtype)
        return dx, dw, None


def _cpp_over_last(h: torch.Tensor, g: Optional[torch.Tensor] = None):
    """``torch.ops.mmkernels_cpu`` when its product over the last dim (csrc/product.cpp) is
    selected, built and takes ``h`` (a contiguous float32 / float64 CPU tensor with factors, no
    tracing) and ``g`` (a CPU tensor of its dtype), else None."""
    if h.device.type != "cpu" or h.dtype not in (torch.float32, torch.float64) or h.dim() == 0 or not h.shape[-1]:
        return None
    if not h.is_contiguous() or (g is not None and (g.device.type != "cpu" or g.dtype != h.dtype)):
        return None
    if not (_backend.direct_call_ok(h) if g is None else _backend.direct_call_ok(h, g)):
        return None
    cpp = _cpp.ops()
    return cpp if cpp is not None and hasattr(cpp, "product_over_last") else None


class ProductOverLastFunction(torch.autograd.Function):
    """``h.prod(-1)`` whose backward multiplies the prefix and suffix products: the gradient of
    factor ``s`` is ``g · Π_{t<s} h_t · Π_{t>s} h_t``, 3·S - 4 multiplies of ``h``'s slices, no
    division (exact with any number of zero factors) and none of the zero test torch's product
    backward runs. On the CPU (contiguous float32 / float64, nothing tracing) each way is one C++
    pass (csrc/product.cpp; the backward's in its torch ops' order, the same bits); the backward
    runs its torch ops where a graph is recorded, so it is itself differentiable.

    ``h``: ``(..., S)``; returns ``(..., )``."""

    @staticmethod
    def forward(ctx, h: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(h)
        cpp = _cpp_over_last(h)
        return cpp.product_over_last(h) if cpp is not None else h.prod(dim=-1)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        (h,) = ctx.saved_tensors
        # one C++ pass where no graph is recorded (it has no derivative of its own), the same bits
        cpp = None if torch.is_grad_enabled() else _cpp_over_last(h, g)
        if cpp is not None:
            return cpp.product_over_last_backward(h, g.contiguous())
        factors = h.unbind(dim=-1)
        if not factors:
            return torch.zeros_like(h)
        before = [g]  # g · Π_{t<s} h_t
        for f in factors[:-1]:
            before.append(before[-1] * f)
        grads = [before[-1]]
        after = factors[-1]  # Π_{t>s} h_t
        for s in range(len(factors) - 2, -1, -1):
            grads.append(before[s] * after)
            if s:
                after = after * factors[s]
        return torch.stack(grads[::-1], dim=-1)


def product_unit(x: torch.Tensor, weight: torch.Tensor, out_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    r"""Product units (Durbin & Rumelhart): ``p_j = Π_i x_i^{w_ji}``, ``o_k = Σ_j v_kj · p_j``.

    Computed in log space for inputs of any sign: ``p_j = exp(Σ_i w_ji·log|x_i|) ·
    cos(π·Σ_i w_ji·[x_i < 0])`` — the real part of the complex power, which equals
    ``Π x_i^{w_ji}`` whenever that is real (integer exponents). ``|x_i|`` is clamped to at least
    ``2^-100`` (PRODUCT_EPS) first, so an exact zero contributes ``2^{-100·w}`` (≈ 0 for ``w > 0``,
    huge for ``w < 0``, 1 for ``w = 0``) and has zero gradient.

    On CUDA (and under Triton's interpreter) one fused kernel computes both sums from one load of
    ``x`` with ``exp·cos`` in its epilogue (fp32 IEEE dots), and a second builds ``dW``; the
    ``v``-layer is an ordinary GEMM. On CPU, ATen's GEMMs, the steps between them one C++ pass
    each for float32 (csrc/product.cpp), torch ops otherwise.

    Args:
        x: ``(..., I)`` inputs, float16 / bfloat16 / float32 / float64 (math in float32, float64
            for float64).
        weight: ``(J, I)`` exponents ``w``.
        out_weight: optional ``(K, J)`` ``v``; None returns the ``J`` products.

    Returns:
        ``(..., K)`` (or ``(..., J)``) in ``x``'s dtype.
    """
    _check_tensor("x", x)
    _check_tensor("weight", weight)
    tensors, names = [x, weight], ["x", "weight"]
    if out_weight is not None:
        _check_tensor("out_weight", out_weight)
        tensors.append(out_weight)
        names.append("out_weight")
    for n, t in zip(names, tensors):
        if t.dtype not in _FLOATS:
            raise TypeError(f"{n} must be floating-point (float16, bfloat16, float32, float64), got {t.dtype}")
    _check_same(names, tensors, "dtype")
    _check_same(names, tensors, "device")
    if x.dim() < 1 or weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight must be (J, I) with I = x.shape[-1] = {x.shape[-1] if x.dim() else '?'}, got "
                         f"{tuple(weight.shape)} for x {tuple(x.shape)}")
    if out_weight is not None and (out_weight.dim() != 2 or out_weight.shape[1] != weight.shape[0]):
        raise ValueError(f"out_weight must be (K, J) with J = {weight.shape[0]}, got {tuple(out_weight.shape)}")
    lead = x.shape[:-1]
    grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    p = ProductTermsFunction.apply(x.reshape(math.prod(lead), x.shape[-1]), weight, grad)
    if out_weight is not None:
        p = torch.nn.functional.linear(p, out_weight)
    return p.reshape(*lead, p.shape[-1])


# ----------------------------------------------------------------------------------------------
# Sigma-pi units with sparse conjuncts, pi-sigma
# ----------------------------------------------------------------------------------------------

def sigma_pi_unit(z: torch.Tensor, conjuncts: torch.Tensor, weight: torch.Tensor,
                  bias: Optional[torch.Tensor] = None, activation: Union[str, Callable, None] = None) -> torch.Tensor:
    r"""Sigma-pi units over a given list of conjuncts: ``o_k = g(Σ_q w_kq · Π_{i ∈ q} z_i + b_k)``.

    Args:
        z: ``(..., n)`` inputs (float dtype).
        conjuncts: ``(Q, m)`` integer indices into the last dim of ``z``: conjunct ``q`` is the
            product of ``z`` at ``conjuncts[q]``; entries ``-1`` pad conjuncts shorter than ``m``
            (a conjunct of only ``-1`` is the constant 1). Repeated indices give powers.
        weight: ``(K, Q)``; bias: optional ``(K,)``.
        activation: ``None`` / ``"identity"``, ``"sigmoid"``, ``"tanh"``, ``"relu"`` or a callable.

    Returns:
        ``(..., K)`` in ``z``'s dtype. A gather, a product over ``m``
        (:class:`ProductOverLastFunction`: exact with zeros) and a GEMM.
    """
    _check_tensor("z", z)
    _check_tensor("conjuncts", conjuncts)
    _check_tensor("weight", weight)
    if z.dtype not in _FLOATS:
        raise TypeError(f"z must be floating-point, got {z.dtype}")
    if conjuncts.dtype.is_floating_point or conjuncts.dtype == torch.bool or conjuncts.dim() != 2:
        raise TypeError(f"conjuncts must be a (Q, m) integer tensor, got {conjuncts.dtype} of shape "
                        f"{tuple(conjuncts.shape)}")
    n = z.shape[-1]
    if conjuncts.numel() and (int(conjuncts.min()) < -1 or int(conjuncts.max()) >= n):
        raise ValueError(f"conjuncts entries must be in [0, {n}) or -1 (padding), got values in "
                         f"[{int(conjuncts.min())}, {int(conjuncts.max())}]")
    if weight.dim() != 2 or weight.shape[1] != conjuncts.shape[0]:
        raise ValueError(f"weight must be (K, Q) with Q = {conjuncts.shape[0]} conjuncts, got {tuple(weight.shape)}")
    _check_same(("z", "weight"), (z, weight), "dtype")
    g = _activation(activation)
    idx = conjuncts.to(z.device, torch.int64)
    pad = idx < 0
    factors = z[..., idx.clamp_min(0)]                      # (..., Q, m)
    factors = torch.where(pad.to(z.device), torch.ones((), dtype=z.dtype, device=z.device), factors)
    return g(torch.nn.functional.linear(ProductOverLastFunction.apply(factors), weight, bias))


def pi_sigma(z: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
             activation: Union[str, Callable, None] = "sigmoid") -> torch.Tensor:
    r"""Pi-sigma network (Shin & Ghosh): ``o_k = g(Π_{s=1..S} (w_ks · z + b_ks))``.

    Args:
        z: ``(..., n)``; weight: ``(K, S, n)`` — ``S`` summing units per output; bias: optional
            ``(K, S)``.
        activation: as in :func:`sigma_pi_unit` (default ``"sigmoid"``, the network's own).

    Returns:
        ``(..., K)`` in ``z``'s dtype: one GEMM ``(..., n) -> (..., K·S)`` and a product over ``S``
        (:class:`ProductOverLastFunction`: its backward without divisions, exact with zeros).
    """
    _check_tensor("z", z)
    _check_tensor("weight", weight)
    if z.dtype not in _FLOATS:
        raise TypeError(f"z must be floating-point, got {z.dtype}")
    if weight.dim() != 3 or weight.shape[2] != z.shape[-1]:
        raise ValueError(f"weight must be (K, S, n) with n = z.shape[-1] = {z.shape[-1]}, got {tuple(weight.shape)}")
    K, S, n = weight.shape
    if bias is not None and bias.shape != (K, S):
        raise ValueError(f"bias must be (K, S) = ({K}, {S}), got {tuple(bias.shape)}")
    _check_same(("z", "weight"), (z, weight), "dtype")
    g = _activation(activation)
    h = torch.nn.functional.linear(z, weight.reshape(K * S, n), None if bias is None else bias.reshape(K * S))
    return g(ProductOverLastFunction.apply(h.reshape(*z.shape[:-1], K, S)))

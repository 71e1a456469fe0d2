"""Product-unit kernels: GEMMs whose operand is built from ``x`` on chip, in two ways at once.

``product_terms_kernel``: ``A = log(max(|x|, eps))·Wᵀ`` and ``B = [x < 0]·Wᵀ`` (M = rows of x,
N = units, K = inputs): each x tile is loaded once and transformed twice; both products share the
W tile. The epilogue writes ``P = exp(A)·cos(πB)`` (the products) and ``Q = exp(A)·sin(πB)`` (what
the backward needs: ``dA = dP·P``, ``dB = -π·dP·Q``), never A or B.

``product_dweight_kernel``: ``dW = dAᵀ·log(max(|x|, eps)) + dBᵀ·[x < 0]`` (M = units, N = inputs,
K = rows): one x tile, two products into one accumulator.

Dots run in IEEE fp32 (fp64 for float64 inputs): the exp that follows would amplify TF32's
10-bit mantissa into visible errors. Padding rows / columns load x = 1 (log 1 = 0, not negative).
"""
import triton
import triton.language as tl


@triton.jit
def _log_and_sign(x, eps):
    return tl.log(tl.maximum(tl.abs(x), eps)), tl.where(x < 0, 1.0, 0.0).to(x.dtype)


@triton.jit
def _cos_sin_pi(b):
    """(cos πb, sin πb) by a Taylor polynomial on a quarter period, so that no libdevice range
    reduction (whose slow path for large arguments keeps a stack frame) is compiled in:
    r = b mod 2 in [-1, 1), k = the nearest quarter turn, t = π(r - k/2) in [-π/4, π/4]; terms up
    to t^17 / t^18 (below 1e-17 there: float64-accurate), then a rotation by k quarter turns."""
    r = b - 2.0 * tl.floor(b * 0.5 + 0.5)
    k = tl.floor(2.0 * r + 0.5)
    t = (r - 0.5 * k) * 3.141592653589793
    t2 = t * t
    c = 1.0 / 20922789888000.0
    c = c * t2 - 1.0 / 87178291200.0
    c = c * t2 + 1.0 / 479001600.0
    c = c * t2 - 1.0 / 3628800.0
    c = c * t2 + 1.0 / 40320.0
    c = c * t2 - 1.0 / 720.0
    c = c * t2 + 1.0 / 24.0
    c = c * t2 - 0.5
    c = c * t2 + 1.0
    s = 1.0 / 355687428096000.0
    s = s * t2 - 1.0 / 1307674368000.0
    s = s * t2 + 1.0 / 6227020800.0
    s = s * t2 - 1.0 / 39916800.0
    s = s * t2 + 1.0 / 362880.0
    s = s * t2 - 1.0 / 5040.0
    s = s * t2 + 1.0 / 120.0
    s = s * t2 - 1.0 / 6.0
    s = (s * t2 + 1.0) * t
    q = k - 4.0 * tl.floor(k * 0.25)  # k mod 4
    cos = tl.where(q == 0, c, tl.where(q == 1, -s, tl.where(q == 2, -c, s)))
    sin = tl.where(q == 0, s, tl.where(q == 1, c, tl.where(q == 2, -s, -c)))
    return cos, sin


@triton.jit
def product_terms_kernel(
    x_ptr, w_ptr, p_ptr, q_ptr,
    M, N, K,
    sx_m, sx_k, sw_n, sw_k, so_m, so_n,
    eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr,
):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc_a = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    acc_b = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + rk
        x = tl.load(x_ptr + rm[:, None] * sx_m + ks[None, :] * sx_k,
                    mask=(rm[:, None] < M) & (ks[None, :] < K), other=1.0).to(ACC)
        wt = tl.load(w_ptr + rn[None, :] * sw_n + ks[:, None] * sw_k,
                     mask=(rn[None, :] < N) & (ks[:, None] < K), other=0.0).to(ACC)
        lg, ng = _log_and_sign(x, eps)
        acc_a = tl.dot(lg, wt, acc_a, input_precision="ieee", out_dtype=ACC)
        acc_b = tl.dot(ng, wt, acc_b, input_precision="ieee", out_dtype=ACC)
    out = rm[:, None] * so_m + rn[None, :] * so_n
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    ea = tl.exp(acc_a)
    cos, sin = _cos_sin_pi(acc_b)
    tl.store(p_ptr + out, (ea * cos).to(p_ptr.dtype.element_ty), mask=mask)
    tl.store(q_ptr + out, (ea * sin).to(q_ptr.dtype.element_ty), mask=mask)


@triton.jit
def product_dweight_kernel(
    x_ptr, da_ptr, db_ptr, dw_ptr,
    M, N, K,
    sx_k, sx_n, sd_k, sd_m, so_m, so_n,
    eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr,
):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # units j
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # inputs i
    rk = tl.arange(0, BLOCK_K)                    # rows of x
    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + rk
        in_k = ks[None, :] < K
        da_t = tl.load(da_ptr + rm[:, None] * sd_m + ks[None, :] * sd_k, mask=(rm[:, None] < M) & in_k,
                       other=0.0).to(ACC)
        db_t = tl.load(db_ptr + rm[:, None] * sd_m + ks[None, :] * sd_k, mask=(rm[:, None] < M) & in_k,
                       other=0.0).to(ACC)
        x = tl.load(x_ptr + ks[:, None] * sx_k + rn[None, :] * sx_n, mask=(ks[:, None] < K) & (rn[None, :] < N),
                    other=1.0).to(ACC)
        lg, ng = _log_and_sign(x, eps)
        acc = tl.dot(da_t, lg, acc, input_precision="ieee", out_dtype=ACC)
        acc = tl.dot(db_t, ng, acc, input_precision="ieee", out_dtype=ACC)
    tl.store(dw_ptr + rm[:, None] * so_m + rn[None, :] * so_n, acc.to(dw_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


#: What the compile tier requires of each kernel (mmkernels.testing.compile_tier). IEEE fp32 dots
#: run on the FMA units: no tensor-core requirement.
EXPECTATIONS = {
    "product_terms_kernel": {"local_memory": 0},
    "product_dweight_kernel": {"local_memory": 0},
}

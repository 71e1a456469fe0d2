"""The compile tier's yardstick: a plain bf16 GEMM ``c = a · b`` (row-major ``a`` (M, K), ``b``
(K, N), fp32 accumulation), the leanest main loop a Triton GEMM gets — pointer loads pipelined
into shared memory, one ``tl.dot`` a step. The compile tier compiles it at the tile the grouped
expert GEMMs use on sm_90 (128 x 256 x 64, 8 warps, 3 stages) and reports its main loop's MMA FLOPs
per instruction, the figure a GEMM-shaped kernel is judged against without a GPU
(``mmkernels.testing.compile_tier``). Not launched by any op."""
import triton
import triton.language as tl


@triton.jit
def yardstick_gemm(a_ptr, b_ptr, c_ptr, M, N, K, s_am, s_bk, s_cm,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    m = (pid // num_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = (pid % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptr + m[:, None] * s_am + (k0 + kk)[None, :], mask=(m[:, None] < M) & ((k0 + kk)[None, :] < K),
                    other=0.0)
        b = tl.load(b_ptr + (k0 + kk)[:, None] * s_bk + n[None, :], mask=((k0 + kk)[:, None] < K) & (n[None, :] < N),
                    other=0.0)
        acc = tl.dot(a, b, acc)
    tl.store(c_ptr + m[:, None] * s_cm + n[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=(m[:, None] < M) & (n[None, :] < N))


EXPECTATIONS = {"yardstick_gemm": {"local_memory": 0, "mma": {90: "HGMMA", 80: "HMMA"}}}

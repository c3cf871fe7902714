// Dispatch of gemm_bcast (see gemm.h): for float the AVX-512 micro-kernel on the avx512
// paths (cpu_isa(), isa.h), else the AVX2 one; for double the BLAS of libtorch_cpu.
#include "cpu/gemm.h"

#include "cpu/cpu_isa.h"

#include <algorithm>

#include "cpu/blas.h"

namespace ring_attn::cpu {

bool use_avx512() { return cpu_isa() >= Isa::kAvx512; }

bool use_avx512_bf16() { return cpu_isa() >= Isa::kAvx512Bf16; }

namespace {

// Row-major C = A B through column-major BLAS: C^T = B^T A^T (see blas.h).
template <typename T>
void gemm_blas(int64_t M, int64_t N, int64_t K, T alpha, const T* a, int64_t a_rs, int64_t a_ps,
               const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  // A's stride along the unused dimension is irrelevant when that dimension has length 1;
  // BLAS still wants a leading dimension at least as large as it.
  if (a_ps == 1 && (a_rs >= K || M == 1)) {
    blas_gemm<T>('N', 'N', N, M, K, alpha, b, ldb, a, std::max(a_rs, K), beta, c, ldc);
  } else if (a_rs == 1 && (a_ps >= M || K == 1)) {
    blas_gemm<T>('N', 'T', N, M, K, alpha, b, ldb, a, std::max(a_ps, M), beta, c, ldc);
  } else {
    for (int64_t r = 0; r < M; ++r) {
      for (int64_t j = 0; j < N; ++j) {
        T acc = 0;
        for (int64_t p = 0; p < K; ++p) acc += a[r * a_rs + p * a_ps] * b[p * ldb + j];
        c[r * ldc + j] = alpha * acc + (beta == T(0) ? T(0) : beta * c[r * ldc + j]);
      }
    }
  }
}

}  // namespace

void gemm_bcast(int64_t M, int64_t N, int64_t K, float alpha, const float* a, int64_t a_rs,
                int64_t a_ps, const float* b, int64_t ldb, float beta, float* c, int64_t ldc,
                bool split_k) {
  if (M == 0 || N == 0) return;
  if (use_avx512()) {
    gemm_bcast_avx512(M, N, K, alpha, a, a_rs, a_ps, b, ldb, beta, c, ldc, split_k);
  } else {
    gemm_bcast_avx2(M, N, K, alpha, a, a_rs, a_ps, b, ldb, beta, c, ldc, split_k);
  }
}

void gemm_bcast(int64_t M, int64_t N, int64_t K, double alpha, const double* a, int64_t a_rs,
                int64_t a_ps, const double* b, int64_t ldb, double beta, double* c,
                int64_t ldc, bool /*split_k*/) {
  if (M == 0 || N == 0) return;
  gemm_blas<double>(M, N, K, alpha, a, a_rs, a_ps, b, ldb, beta, c, ldc);
}

}  // namespace ring_attn::cpu

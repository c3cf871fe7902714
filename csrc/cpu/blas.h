// Column-major BLAS gemm for the CPU kernels (the float64 products, gemm.cpp), on the BLAS
// that libtorch_cpu carries.
//
// Why not at::native::cpublas::gemm: its float/double overloads are not exported from
// libtorch_cpu, only the portable gemm_stub is, which is a plain loop nest. libtorch_cpu
// does export the Fortran BLAS entry points of the library it was built with (MKL in the
// official wheels: sgemm_/dgemm_, the calls ATen's own flash kernel ends up in). We bind
// them as weak symbols: a torch built without BLAS leaves them null and the products fall
// back to a simple loop nest, correct but slow.
#pragma once
#include <cstdint>

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc)
    __attribute__((weak));
}

namespace ring_attn::cpu {

// Column-major C[m x n] = alpha * op(A) * op(B) + beta * C (BLAS semantics).
template <typename T>
inline void blas_gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
                      int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  const int im = static_cast<int>(m), in = static_cast<int>(n), ik = static_cast<int>(k);
  const int ilda = static_cast<int>(lda > 1 ? lda : 1), ildb = static_cast<int>(ldb > 1 ? ldb : 1);
  const int ildc = static_cast<int>(ldc > 1 ? ldc : 1);
  if constexpr (sizeof(T) == 4) {
    if (sgemm_ != nullptr && k > 0) {
      sgemm_(&ta, &tb, &im, &in, &ik, &alpha, a, &ilda, b, &ildb, &beta, c, &ildc);
      return;
    }
  } else {
    if (dgemm_ != nullptr && k > 0) {
      dgemm_(&ta, &tb, &im, &in, &ik, &alpha, a, &ilda, b, &ildb, &beta, c, &ildc);
      return;
    }
  }
  // Fallback loop nest (also the k == 0 case, which some BLAS reject).
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t i = 0; i < m; ++i) {
      T acc = 0;
      for (int64_t p = 0; p < k; ++p) {
        const T av = ta == 'N' ? a[i + p * lda] : a[p + i * lda];
        const T bv = tb == 'N' ? b[p + j * ldb] : b[j + p * ldb];
        acc += av * bv;
      }
      c[i + j * ldc] = alpha * acc + (beta == T(0) ? T(0) : beta * c[i + j * ldc]);
    }
  }
}

}  // namespace ring_attn::cpu

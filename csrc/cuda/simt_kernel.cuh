// float32 / float64 attention on CUDA cores (SIMT): the exact-precision path.
//
// Tensor cores would round float32 inputs to tf32 (10-bit mantissa), which is not the
// float32 semantics users of a float32 SDPA expect, and have no float64 mode on sm_80;
// so float32 and float64 take this simpler kernel. It computes in double for both: the
// extension is built with --use_fast_math (setup.py, for the tensor-core kernels), which
// flushes float denormals to zero, makes float division approximate and turns expf into
// __expf, and none of that touches double arithmetic (nvcc's -ftz, -prec-div, -prec-sqrt
// and the fast intrinsics are single-precision only; -fmad contracts into IEEE fma). So
// float32 results are float32 roundings of a double computation (at least as accurate as
// torch's float32, also for logits in the thousands, where a float32 s - m loses up to
// ulp(2400) = 2.4e-4 in the exponent), whatever the nvcc flags; cuobjdump -sass of
// simt_fp32.o shows no .FTZ instruction and no MUFU (approximate) op. Storage follows the
// contract (attn_params.h): delta and a float mask in float32 for float32 inputs, lse in
// float64 for both.
// It is slower than the bf16/fp16 path, by design: correctness first (double runs at
// 1/2 the float rate on A100/H100, 1/64 on GeForce cards); float32 training should use
// bf16/fp16 inputs with out_fp32 / grad_fp32 for speed.
//
// Layout: one warp per row, the head dim spread over the lanes (d = lane + 32 c, c < 8,
// so D, Dv <= 256), dot products by warp shuffles.
//   forward   warp per query row: online softmax over the keys in order; O / l,
//             lse = m + log l (0 and -inf for rows with no key).
//   backward  dQ: warp per query row, P recomputed from lse, dS = P (dP' - delta) with
//             dP' = keep / (1-p) * dO . v_j; dQ = scale * sum_j dS K_j.
//             dK/dV: warp per key row over every query of every head of its KV group
//             (GQA summed in place): dV += Pd dO_i, dK += scale * dS Q_i.
// Scores are soft-capped (s = c tanh(s / c)) before the mask when softcap > 0.
// Non-finite values follow torch's math backend (attn_params.h): masks are additive
// (s + (-inf)), the running max propagates NaN, and keys that the band or documents hide
// (common/visibility.h's visible, per element) are skipped only when visibility_skip_ok
// (every input finite); bool-masked keys are never skipped (nothing tells a call without
// a band or documents that its inputs are finite).
// Every output element has one owner: no atomics, deterministic.
#pragma once
#include <cuda_runtime.h>
#include <cmath>

#include "common/attn_params.h"
#include "cuda/utils.cuh"

namespace ring_attn {
namespace cuda {

constexpr int kSimtWarps = 4;   // rows per CTA: small CTAs spread short sequences over SMs
constexpr int kSimtChunks = 8;  // head-dim elements per lane: 8 x 32 = 256 = max head dim

// Storage type of delta and a float mask (the contract's accumulation type); lse is
// double for every input dtype.
template <typename T> struct SimtAcc { using type = float; };
template <> struct SimtAcc<double> { using type = double; };
using C = double;  // compute type of every SIMT kernel (see the header comment)

// double <-> float by PTX without .ftz: under -ftz=true nvcc emits cvt.rn.ftz.f32.f64 for
// a plain cast, flushing a denormal result (|x| < 1.18e-38) to 0.
__device__ __forceinline__ C to_c(float x) {
  double r;
  asm("cvt.f64.f32 %0, %1;" : "=d"(r) : "f"(x));
  return r;
}
__device__ __forceinline__ C to_c(double x) { return x; }
template <typename T> __device__ __forceinline__ T from_c(C x);
template <> __device__ __forceinline__ float from_c<float>(C x) {
  float r;
  asm("cvt.rn.f32.f64 %0, %1;" : "=f"(r) : "d"(x));
  return r;
}
template <> __device__ __forceinline__ double from_c<double>(C x) { return x; }

// NaN-propagating max (math's softmax: a NaN score makes the row NaN).
__device__ __forceinline__ C max_nan(C a, C b) { return (a > b || a != a) ? a : b; }

__device__ __forceinline__ C warp_sum(C x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

template <typename T>
__device__ __forceinline__ void load_row(C (&r)[kSimtChunks], const T* row, int n, int lane) {
#pragma unroll
  for (int c = 0; c < kSimtChunks; ++c) {
    const int d = lane + 32 * c;
    r[c] = d < n ? to_c(row[d]) : C(0);
  }
}

__device__ __forceinline__ C dot_row(const C (&x)[kSimtChunks], const C (&y)[kSimtChunks]) {
  C s = 0;
#pragma unroll
  for (int c = 0; c < kSimtChunks; ++c) s += x[c] * y[c];
  return warp_sum(s);
}

template <typename T>
__device__ __forceinline__ void store_row(void* out, bool as_f32, int64_t off, const C (&r)[kSimtChunks],
                                          C mul, int n, int lane) {
#pragma unroll
  for (int c = 0; c < kSimtChunks; ++c) {
    const int d = lane + 32 * c;
    if (d >= n) continue;
    if (as_f32) static_cast<float*>(out)[off + d] = from_c<float>(r[c] * mul);
    else static_cast<T*>(out)[off + d] = from_c<T>(r[c] * mul);
  }
}

// Whether the band and documents let query (qpos, qdoc) see key j (common/visibility.h);
// true when there is no such rule. A hidden key is skipped when skip_ok
// (visibility_skip_ok: then its contribution is exactly 0), else masked with -inf.
__device__ __forceinline__ bool simt_visible(const AttnMaskParams& m, int64_t qpos,
                                             int32_t qdoc, int64_t kpos, int j) {
  return !has_visibility_rule(m) || visible(m, qpos, kpos, qdoc, k_document(m, j));
}

// The additive term of element (i, j): -inf where the band / documents hide it (!vis) or
// a bool mask excludes it, plus the float mask's value (stored in the accumulation type
// A, attn_params.h); 0 when nothing applies. Additive like mask_term (utils.cuh).
template <typename A>
__device__ __forceinline__ C simt_mask_add(const AttnMaskParams& m, const void* mask_bh, int i,
                                           int j, bool vis) {
  C t = vis ? C(0) : C(-INFINITY);
  if (m.kind == MaskKind::kBool) {
    if (static_cast<const uint8_t*>(mask_bh)[i * m.stride[2] + j * m.stride[3]] == 0) {
      t = -INFINITY;
    }
  } else if (m.kind == MaskKind::kFloat) {
    t += to_c(static_cast<const A*>(mask_bh)[i * m.stride[2] + j * m.stride[3]]);
  }
  return t;
}

// Soft cap of a scaled score (attn_params.h; cap = softcap, 0 off): x = cap tanh(x / cap),
// before the mask. Returns 1 - tanh^2, the factor the backward's dS picks up (1 when off).
__device__ __forceinline__ C simt_softcap(C& x, C cap) {
  if (cap <= 0) return 1;
  const C t = tanh(x / cap);
  x = cap * t;
  return 1 - t * t;
}

__device__ __forceinline__ bool simt_keep(const DropoutParams& d, int b, int h, int64_t qpos,
                                          int64_t kpos) {
  if (d.p <= 0.f) return true;
  return philox_word(dropout_words(d.seed, static_cast<uint32_t>(b),
                                   static_cast<uint32_t>(h + d.head_offset),
                                   qpos, kpos),
                     kpos) >= d.threshold;
}

template <typename T>
__global__ void __launch_bounds__(kSimtWarps * 32)
    fwd_simt_kernel(const AttnFwdParams p, const bool out_fp32) {
  using A = typename SimtAcc<T>::type;
  const auto& sh = p.shape;
  const AttnMaskParams& mk = p.mask;
  const int lane = threadIdx.x % 32;
  const int i = blockIdx.x * kSimtWarps + threadIdx.x / 32;
  const int h = blockIdx.y, b = blockIdx.z;
  if (i >= sh.Sq) return;  // whole warp
  const int hk = h / static_cast<int>(sh.Hq / sh.Hk);
  const int D = static_cast<int>(sh.D), Dv = static_cast<int>(sh.Dv);
  const T* kb = static_cast<const T*>(p.k) + b * p.k_stride[0] + hk * p.k_stride[1];
  const T* vb = static_cast<const T*>(p.v) + b * p.v_stride[0] + hk * p.v_stride[1];
  C q[kSimtChunks], kr[kSimtChunks], vr[kSimtChunks], o[kSimtChunks];
  load_row(q, static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1] + i * p.q_stride[2],
           D, lane);
#pragma unroll
  for (int c = 0; c < kSimtChunks; ++c) o[c] = 0;
  const void* mask_bh = mask_slice<A>(mk, b, h);
  const int64_t qpos = q_position(mk, i);
  const int32_t qdoc = q_document(mk, i);
  const bool skip_ok = visibility_skip_ok(mk);
  const C scale = static_cast<C>(p.scale);
  C m = -INFINITY, l = 0;
  for (int j = 0; j < sh.Sk; ++j) {
    const int64_t kpos = k_position(mk, j);
    const bool vis = simt_visible(mk, qpos, qdoc, kpos, j);
    if (skip_ok && !vis) continue;
    load_row(kr, kb + j * p.k_stride[2], D, lane);
    C s = dot_row(q, kr) * scale;
    simt_softcap(s, p.softcap);
    s += simt_mask_add<A>(mk, mask_bh, i, j, vis);
    const C m_new = max_nan(m, s);
    // No key yet (m_new = -inf): subtract 0, so exp(-inf) = 0, not exp(NaN).
    const C m_use = m_new == -INFINITY ? C(0) : m_new;
    const C alpha = exp(m - m_use);
    const C pr = exp(s - m_use);
    l = l * alpha + pr;
    const C pk = simt_keep(p.dropout, b, h, qpos, kpos) ? pr : C(0);
    load_row(vr, vb + j * p.v_stride[2], Dv, lane);
#pragma unroll
    for (int c = 0; c < kSimtChunks; ++c) o[c] = o[c] * alpha + pk * vr[c];
    m = m_new;
  }
  const int64_t row = (static_cast<int64_t>(b) * sh.Hq + h) * sh.Sq + i;
  const C keep_scale = p.dropout.p > 0.f ? C(1) / (C(1) - p.dropout.p) : C(1);
  // l == 0: no key (out 0, lse -inf; O * 0 keeps math's NaN from 0 * NaN V); NaN l -> NaN.
  const C inv = l == 0 ? C(0) : keep_scale / l;
  store_row<T>(p.out, out_fp32, row * Dv, o, inv, Dv, lane);
  // lse is float64 for every input dtype (attn_params.h): C is double, stored as is.
  if (lane == 0) static_cast<double*>(p.lse)[row] = l == 0 ? C(-INFINITY) : m + log(l);
}

// Shared by both backward kernels: dS and the dropped probability of element (i, j).
struct SimtGrad {
  C ds, pd;
};

__device__ __forceinline__ SimtGrad simt_grad(C s, C lse, C dpd, C delta, bool keep,
                                              C keep_scale) {
  const C pr = lse == -INFINITY ? C(0) : exp(s - lse);  // lse -inf: a row with no key
  const C dp = keep ? dpd * keep_scale : C(0);
  return {pr * (dp - delta), keep ? pr * keep_scale : C(0)};
}

template <typename T>
__global__ void __launch_bounds__(kSimtWarps * 32)
    bwd_dq_simt_kernel(const AttnBwdParams p, const bool grad_fp32) {
  using A = typename SimtAcc<T>::type;
  const auto& sh = p.shape;
  const AttnMaskParams& mk = p.mask;
  const int lane = threadIdx.x % 32;
  const int i = blockIdx.x * kSimtWarps + threadIdx.x / 32;
  const int h = blockIdx.y, b = blockIdx.z;
  if (i >= sh.Sq) return;
  const int hk = h / static_cast<int>(sh.Hq / sh.Hk);
  const int D = static_cast<int>(sh.D), Dv = static_cast<int>(sh.Dv);
  const int64_t row = (static_cast<int64_t>(b) * sh.Hq + h) * sh.Sq + i;
  const C lse = static_cast<const double*>(p.lse)[row];
  const bool skip_ok = visibility_skip_ok(mk);
  C dq[kSimtChunks];
#pragma unroll
  for (int c = 0; c < kSimtChunks; ++c) dq[c] = 0;
  // A row with no key has P = 0 everywhere: dQ = 0 when every input is finite.
  if (!(skip_ok && lse == -INFINITY)) {
    const T* kb = static_cast<const T*>(p.k) + b * p.k_stride[0] + hk * p.k_stride[1];
    const T* vb = static_cast<const T*>(p.v) + b * p.v_stride[0] + hk * p.v_stride[1];
    C q[kSimtChunks], dout[kSimtChunks], kr[kSimtChunks], vr[kSimtChunks];
    load_row(q, static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1] + i * p.q_stride[2],
             D, lane);
    load_row(dout, static_cast<const T*>(p.dout) + b * p.dout_stride[0] + h * p.dout_stride[1] +
                       i * p.dout_stride[2], Dv, lane);
    const C delta = to_c(static_cast<const A*>(p.delta)[row]);
    const void* mask_bh = mask_slice<A>(mk, b, h);
    const int64_t qpos = q_position(mk, i);
    const int32_t qdoc = q_document(mk, i);
    const C scale = static_cast<C>(p.scale);
    const C keep_scale = p.dropout.p > 0.f ? C(1) / (C(1) - p.dropout.p) : C(1);
    for (int j = 0; j < sh.Sk; ++j) {
      const int64_t kpos = k_position(mk, j);
      const bool vis = simt_visible(mk, qpos, qdoc, kpos, j);
      if (skip_ok && !vis) continue;
      load_row(kr, kb + j * p.k_stride[2], D, lane);
      load_row(vr, vb + j * p.v_stride[2], Dv, lane);
      C s = dot_row(q, kr) * scale;
      const C dcap = simt_softcap(s, p.softcap);
      s += simt_mask_add<A>(mk, mask_bh, i, j, vis);
      const C dpd = dot_row(dout, vr);
      const SimtGrad g = simt_grad(s, lse, dpd, delta, simt_keep(p.dropout, b, h, qpos, kpos),
                                   keep_scale);
#pragma unroll
      for (int c = 0; c < kSimtChunks; ++c) dq[c] += g.ds * dcap * kr[c];
    }
  }
  store_row<T>(p.dq, grad_fp32, row * D, dq, static_cast<C>(p.scale), D, lane);
}

template <typename T>
__global__ void __launch_bounds__(kSimtWarps * 32)
    bwd_dkv_simt_kernel(const AttnBwdParams p, const bool grad_fp32) {
  using A = typename SimtAcc<T>::type;
  const auto& sh = p.shape;
  const AttnMaskParams& mk = p.mask;
  const int lane = threadIdx.x % 32;
  const int j = blockIdx.x * kSimtWarps + threadIdx.x / 32;
  const int hk = blockIdx.y, b = blockIdx.z;
  if (j >= sh.Sk) return;
  const int group = static_cast<int>(sh.Hq / sh.Hk);
  const int D = static_cast<int>(sh.D), Dv = static_cast<int>(sh.Dv);
  C kr[kSimtChunks], vr[kSimtChunks], q[kSimtChunks], dout[kSimtChunks];
  C dk[kSimtChunks], dv[kSimtChunks];
  load_row(kr, static_cast<const T*>(p.k) + b * p.k_stride[0] + hk * p.k_stride[1] + j * p.k_stride[2],
           D, lane);
  load_row(vr, static_cast<const T*>(p.v) + b * p.v_stride[0] + hk * p.v_stride[1] + j * p.v_stride[2],
           Dv, lane);
#pragma unroll
  for (int c = 0; c < kSimtChunks; ++c) dk[c] = dv[c] = 0;
  const int64_t kpos = k_position(mk, j);
  const bool skip_ok = visibility_skip_ok(mk);
  const C scale = static_cast<C>(p.scale);
  const C keep_scale = p.dropout.p > 0.f ? C(1) / (C(1) - p.dropout.p) : C(1);
  for (int h = hk * group; h < (hk + 1) * group; ++h) {
    const void* mask_bh = mask_slice<A>(mk, b, h);
    const int64_t row0 = (static_cast<int64_t>(b) * sh.Hq + h) * sh.Sq;
    const T* qb = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1];
    const T* dob = static_cast<const T*>(p.dout) + b * p.dout_stride[0] + h * p.dout_stride[1];
    for (int i = 0; i < sh.Sq; ++i) {
      const C lse = static_cast<const double*>(p.lse)[row0 + i];
      if (skip_ok && lse == -INFINITY) continue;  // no key: P = 0, contributes exactly 0
      const int64_t qpos = q_position(mk, i);
      const bool vis = simt_visible(mk, qpos, q_document(mk, i), kpos, j);
      if (skip_ok && !vis) continue;
      load_row(q, qb + i * p.q_stride[2], D, lane);
      load_row(dout, dob + i * p.dout_stride[2], Dv, lane);
      C s = dot_row(q, kr) * scale;
      const C dcap = simt_softcap(s, p.softcap);
      s += simt_mask_add<A>(mk, mask_bh, i, j, vis);
      const C dpd = dot_row(dout, vr);
      const SimtGrad g =
          simt_grad(s, lse, dpd, to_c(static_cast<const A*>(p.delta)[row0 + i]),
                    simt_keep(p.dropout, b, h, qpos, kpos), keep_scale);
      const C ds = g.ds * dcap;
#pragma unroll
      for (int c = 0; c < kSimtChunks; ++c) {
        dv[c] += g.pd * dout[c];
        dk[c] += ds * q[c];
      }
    }
  }
  const int64_t krow = (static_cast<int64_t>(b) * sh.Hk + hk) * sh.Sk + j;
  store_row<T>(p.dk, grad_fp32, krow * D, dk, scale, D, lane);
  store_row<T>(p.dv, grad_fp32, krow * Dv, dv, C(1), Dv, lane);
}

template <typename T>
cudaError_t run_fwd_simt(const AttnFwdParams& p, bool out_fp32, cudaStream_t stream) {
  const dim3 grid(ceil_div(p.shape.Sq, kSimtWarps), static_cast<unsigned>(p.shape.Hq),
                  static_cast<unsigned>(p.shape.B));
  fwd_simt_kernel<T><<<grid, kSimtWarps * 32, 0, stream>>>(p, out_fp32);
  return cudaGetLastError();
}

template <typename T>
cudaError_t run_bwd_simt(const AttnBwdParams& p, bool grad_fp32, cudaStream_t stream) {
  const auto& s = p.shape;
  if (s.Sq > 0) {
    const dim3 grid(ceil_div(s.Sq, kSimtWarps), static_cast<unsigned>(s.Hq),
                    static_cast<unsigned>(s.B));
    bwd_dq_simt_kernel<T><<<grid, kSimtWarps * 32, 0, stream>>>(p, grad_fp32);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (s.Sk > 0) {
    const dim3 grid(ceil_div(s.Sk, kSimtWarps), static_cast<unsigned>(s.Hk),
                    static_cast<unsigned>(s.B));
    bwd_dkv_simt_kernel<T><<<grid, kSimtWarps * 32, 0, stream>>>(p, grad_fp32);
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace ring_attn

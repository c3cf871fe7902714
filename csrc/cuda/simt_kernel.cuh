// float32 / float64 attention on CUDA cores (SIMT): the exact-precision path.
//
// Tensor cores would round float32 inputs to tf32 (10-bit mantissa), which is not the
// float32 semantics users of a float32 SDPA expect, and have no float64 mode on sm_80;
// so float32 and float64 take this simpler kernel, computed entirely in the input
// precision (exp of float32 scores evaluated in double: --use_fast_math would otherwise
// turn expf into __expf, whose error grows with |x|). It is slower than the bf16/fp16
// path, by design: correctness first; float32 training should use bf16/fp16 inputs with
// out_fp32 / grad_fp32 for speed.
//
// Layout: one warp per row, the head dim spread over the lanes (d = lane + 32 c, c < 8,
// so D, Dv <= 256), dot products by warp shuffles. lse, delta and a float mask are in the
// same precision (attn_params.h), so float64 is float64-accurate end to end.
//   forward   warp per query row: online softmax over the keys in order, masked keys
//             skipped; O / l, lse = m + log l (0 and -inf for rows with no key).
//   backward  dQ: warp per query row, P recomputed from lse, dS = P (dP' - delta) with
//             dP' = keep / (1-p) * dO . v_j; dQ = scale * sum_j dS K_j.
//             dK/dV: warp per key row over every query of every head of its KV group
//             (GQA summed in place): dV += Pd dO_i, dK += scale * dS Q_i.
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

template <typename T> struct SimtAcc { using type = float; };
template <> struct SimtAcc<double> { using type = double; };

__device__ __forceinline__ float simt_exp(float x) {
  return static_cast<float>(exp(static_cast<double>(x)));
}
__device__ __forceinline__ double simt_exp(double x) { return exp(x); }
__device__ __forceinline__ float simt_log(float x) {
  return static_cast<float>(log(static_cast<double>(x)));
}
__device__ __forceinline__ double simt_log(double x) { return log(x); }

template <typename A>
__device__ __forceinline__ A warp_sum(A x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

template <typename T, typename A>
__device__ __forceinline__ void load_row(A (&r)[kSimtChunks], const T* row, int n, int lane) {
#pragma unroll
  for (int c = 0; c < kSimtChunks; ++c) {
    const int d = lane + 32 * c;
    r[c] = d < n ? static_cast<A>(row[d]) : A(0);
  }
}

template <typename A>
__device__ __forceinline__ A dot_row(const A (&x)[kSimtChunks], const A (&y)[kSimtChunks]) {
  A s = 0;
#pragma unroll
  for (int c = 0; c < kSimtChunks; ++c) s += x[c] * y[c];
  return warp_sum(s);
}

template <typename T, typename A>
__device__ __forceinline__ void store_row(void* out, bool as_f32, int64_t off, const A (&r)[kSimtChunks],
                                          A mul, int n, int lane) {
#pragma unroll
  for (int c = 0; c < kSimtChunks; ++c) {
    const int d = lane + 32 * c;
    if (d >= n) continue;
    if (as_f32) static_cast<float*>(out)[off + d] = static_cast<float>(r[c] * mul);
    else static_cast<T*>(out)[off + d] = static_cast<T>(r[c] * mul);
  }
}

// Whether element (i, j) survives causality and the mask; `add` receives the additive
// mask value (natural-log units), stored in the accumulation type A (attn_params.h).
template <typename A>
__device__ __forceinline__ bool simt_visible(const AttnMaskParams& m, const void* mask_bh, int i,
                                             int j, int64_t qpos, int64_t kpos, A& add) {
  add = 0;
  if (m.causal && kpos > qpos) return false;
  if (m.kind == MaskKind::kBool) {
    return static_cast<const uint8_t*>(mask_bh)[i * m.stride[2] + j * m.stride[3]] != 0;
  }
  if (m.kind == MaskKind::kFloat) {
    add = static_cast<const A*>(mask_bh)[i * m.stride[2] + j * m.stride[3]];
    return add != -INFINITY;
  }
  return true;
}

__device__ __forceinline__ bool simt_keep(const DropoutParams& d, int b, int h, int64_t qpos,
                                          int64_t kpos) {
  if (d.p <= 0.f) return true;
  return philox_word(dropout_words(d.seed, static_cast<uint32_t>(b), static_cast<uint32_t>(h),
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
  A q[kSimtChunks], kr[kSimtChunks], vr[kSimtChunks], o[kSimtChunks];
  load_row(q, static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1] + i * p.q_stride[2],
           D, lane);
#pragma unroll
  for (int c = 0; c < kSimtChunks; ++c) o[c] = 0;
  const void* mask_bh = mask_slice<A>(mk, b, h);
  const int64_t qpos = q_position(mk, i);
  const A scale = static_cast<A>(p.scale);
  A m = -INFINITY, l = 0;
  for (int j = 0; j < sh.Sk; ++j) {
    const int64_t kpos = k_position(mk, j);
    A add;
    if (!simt_visible(mk, mask_bh, i, j, qpos, kpos, add)) continue;
    load_row(kr, kb + j * p.k_stride[2], D, lane);
    const A s = dot_row(q, kr) * scale + add;
    const A m_new = s > m ? s : m;
    const A alpha = simt_exp(m - m_new);  // m = -inf -> 0
    const A pr = simt_exp(s - m_new);
    l = l * alpha + pr;
    const A pk = simt_keep(p.dropout, b, h, qpos, kpos) ? pr : A(0);
    load_row(vr, vb + j * p.v_stride[2], Dv, lane);
#pragma unroll
    for (int c = 0; c < kSimtChunks; ++c) o[c] = o[c] * alpha + pk * vr[c];
    m = m_new;
  }
  const int64_t row = (static_cast<int64_t>(b) * sh.Hq + h) * sh.Sq + i;
  const A keep_scale = p.dropout.p > 0.f ? A(1) / (A(1) - static_cast<A>(p.dropout.p)) : A(1);
  const A inv = l > 0 ? keep_scale / l : A(0);
  store_row<T>(p.out, out_fp32, row * Dv, o, inv, Dv, lane);
  if (lane == 0) static_cast<A*>(p.lse)[row] = l > 0 ? m + simt_log(l) : A(-INFINITY);
}

// Shared by both backward kernels: dS and the dropped probability of element (i, j).
template <typename A>
struct SimtGrad {
  A ds, pd;
};

template <typename A>
__device__ __forceinline__ SimtGrad<A> simt_grad(A s, A lse, A dpd, A delta, bool keep,
                                                 A keep_scale) {
  const A pr = simt_exp(s - lse);
  const A dp = keep ? dpd * keep_scale : A(0);
  return {pr * (dp - delta), keep ? pr * keep_scale : A(0)};
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
  const A lse = static_cast<const A*>(p.lse)[row];
  A dq[kSimtChunks];
#pragma unroll
  for (int c = 0; c < kSimtChunks; ++c) dq[c] = 0;
  if (lse != -INFINITY) {  // a row with no key has P = 0 everywhere: dQ = 0
    const T* kb = static_cast<const T*>(p.k) + b * p.k_stride[0] + hk * p.k_stride[1];
    const T* vb = static_cast<const T*>(p.v) + b * p.v_stride[0] + hk * p.v_stride[1];
    A q[kSimtChunks], dout[kSimtChunks], kr[kSimtChunks], vr[kSimtChunks];
    load_row(q, static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1] + i * p.q_stride[2],
             D, lane);
    load_row(dout, static_cast<const T*>(p.dout) + b * p.dout_stride[0] + h * p.dout_stride[1] +
                       i * p.dout_stride[2], Dv, lane);
    const A delta = static_cast<const A*>(p.delta)[row];
    const void* mask_bh = mask_slice<A>(mk, b, h);
    const int64_t qpos = q_position(mk, i);
    const A scale = static_cast<A>(p.scale);
    const A keep_scale = p.dropout.p > 0.f ? A(1) / (A(1) - static_cast<A>(p.dropout.p)) : A(1);
    for (int j = 0; j < sh.Sk; ++j) {
      const int64_t kpos = k_position(mk, j);
      A add;
      if (!simt_visible(mk, mask_bh, i, j, qpos, kpos, add)) continue;
      load_row(kr, kb + j * p.k_stride[2], D, lane);
      load_row(vr, vb + j * p.v_stride[2], Dv, lane);
      const A s = dot_row(q, kr) * scale + add;
      const A dpd = dot_row(dout, vr);
      const SimtGrad<A> g = simt_grad(s, lse, dpd, delta, simt_keep(p.dropout, b, h, qpos, kpos),
                                      keep_scale);
#pragma unroll
      for (int c = 0; c < kSimtChunks; ++c) dq[c] += g.ds * kr[c];
    }
  }
  store_row<T>(p.dq, grad_fp32, row * D, dq, static_cast<A>(p.scale), D, lane);
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
  A kr[kSimtChunks], vr[kSimtChunks], q[kSimtChunks], dout[kSimtChunks];
  A dk[kSimtChunks], dv[kSimtChunks];
  load_row(kr, static_cast<const T*>(p.k) + b * p.k_stride[0] + hk * p.k_stride[1] + j * p.k_stride[2],
           D, lane);
  load_row(vr, static_cast<const T*>(p.v) + b * p.v_stride[0] + hk * p.v_stride[1] + j * p.v_stride[2],
           Dv, lane);
#pragma unroll
  for (int c = 0; c < kSimtChunks; ++c) dk[c] = dv[c] = 0;
  const int64_t kpos = k_position(mk, j);
  const A scale = static_cast<A>(p.scale);
  const A keep_scale = p.dropout.p > 0.f ? A(1) / (A(1) - static_cast<A>(p.dropout.p)) : A(1);
  for (int h = hk * group; h < (hk + 1) * group; ++h) {
    const void* mask_bh = mask_slice<A>(mk, b, h);
    const int64_t row0 = (static_cast<int64_t>(b) * sh.Hq + h) * sh.Sq;
    const T* qb = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1];
    const T* dob = static_cast<const T*>(p.dout) + b * p.dout_stride[0] + h * p.dout_stride[1];
    for (int i = 0; i < sh.Sq; ++i) {
      const A lse = static_cast<const A*>(p.lse)[row0 + i];
      if (lse == -INFINITY) continue;
      const int64_t qpos = q_position(mk, i);
      A add;
      if (!simt_visible(mk, mask_bh, i, j, qpos, kpos, add)) continue;
      load_row(q, qb + i * p.q_stride[2], D, lane);
      load_row(dout, dob + i * p.dout_stride[2], Dv, lane);
      const A s = dot_row(q, kr) * scale + add;
      const A dpd = dot_row(dout, vr);
      const SimtGrad<A> g =
          simt_grad(s, lse, dpd, static_cast<const A*>(p.delta)[row0 + i],
                    simt_keep(p.dropout, b, h, qpos, kpos), keep_scale);
#pragma unroll
      for (int c = 0; c < kSimtChunks; ++c) {
        dv[c] += g.pd * dout[c];
        dk[c] += g.ds * q[c];
      }
    }
  }
  const int64_t krow = (static_cast<int64_t>(b) * sh.Hk + hk) * sh.Sk + j;
  store_row<T>(p.dk, grad_fp32, krow * D, dk, scale, D, lane);
  store_row<T>(p.dv, grad_fp32, krow * Dv, dv, A(1), Dv, lane);
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

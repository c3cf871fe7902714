// Device helpers shared by the CUDA kernels: tensor-core (mma.sync / ldmatrix) and
// cp.async wrappers, the smem tile loader, and the attention-mask semantics of
// csrc/common/attn_params.h evaluated per element. Only CUDA headers and csrc/common.
//
// All inline PTX here is sm_80 PTX (mma.sync.m16n8k16, ldmatrix, cp.async), which the
// sm_90 compiler accepts unchanged, so one source serves A100 and H100/H200.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cstdint>

#include "common/attn_params.h"
#include "common/dropout_rng.h"
#include "common/visibility.h"

namespace ring_attn {
namespace cuda {

constexpr float kLog2e = 1.4426950408889634f;

// ---------------------------------------------------------------------------------------
// Element types of the tensor-core path.
template <typename Elem> struct ElemOps;

template <> struct ElemOps<__nv_bfloat16> {
  // Two floats -> one register of two bf16, lower half = `lo` (the lower column index,
  // as the mma fragments expect).
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16(x); }
  // D = A * B + D, m16n8k16, A row-major, B column-major, fp32 accumulate.
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <> struct ElemOps<__half> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_float(float x) { return __float2half(x); }
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// ---------------------------------------------------------------------------------------
// ldmatrix: four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i and
// register i receives matrix i (lane t holds row t/4, columns 2(t%4), 2(t%4)+1; with
// .trans, row 2(t%4)+{0,1} and column t/4 of the stored matrix).
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// Fragment loaders for one warp. `base` is a row-major smem tile with `stride` elements per
// row. They name the four layouts the kernels need:
//  * A (16x16 at rows m0, cols k0) stored as A[m][k]                    -> load_a
//  * A (16x16) stored transposed, At[k][m] (e.g. P[query][key] as P^T)   -> load_a_trans
//  * B for two n8 tiles (k16 x n16) stored as Bt[n][k] (e.g. K[key][d])  -> load_b2
//  * B for two n8 tiles stored as B[k][n] (e.g. V[key][dv])               -> load_b2_trans
// load_b2* return {b0, b1} of n-tile 0 in r[0], r[1] and of n-tile 1 in r[2], r[3].
template <typename Elem>
__device__ __forceinline__ void load_a(uint32_t (&r)[4], const Elem* base, int stride, int m0,
                                       int k0, int lane) {
  const int row = m0 + (lane & 7) + ((lane >> 3) & 1) * 8;
  const int col = k0 + (lane >> 4) * 8;
  ldmatrix_x4(r, base + row * stride + col);
}

template <typename Elem>
__device__ __forceinline__ void load_a_trans(uint32_t (&r)[4], const Elem* base, int stride,
                                             int m0, int k0, int lane) {
  const int krow = k0 + (lane & 7) + (lane >> 4) * 8;
  const int mcol = m0 + ((lane >> 3) & 1) * 8;
  ldmatrix_x4_trans(r, base + krow * stride + mcol);
}

template <typename Elem>
__device__ __forceinline__ void load_b2(uint32_t (&r)[4], const Elem* base, int stride, int n0,
                                        int k0, int lane) {
  const int nrow = n0 + (lane & 7) + (lane >> 4) * 8;
  const int kcol = k0 + ((lane >> 3) & 1) * 8;
  ldmatrix_x4(r, base + nrow * stride + kcol);
}

template <typename Elem>
__device__ __forceinline__ void load_b2_trans(uint32_t (&r)[4], const Elem* base, int stride,
                                              int n0, int k0, int lane) {
  const int krow = k0 + (lane & 7) + ((lane >> 3) & 1) * 8;
  const int ncol = n0 + (lane >> 4) * 8;
  ldmatrix_x4_trans(r, base + krow * stride + ncol);
}

// ---------------------------------------------------------------------------------------
// cp.async (sm_80+): global -> shared copies that bypass registers. 16 bytes through L2
// only (.cg, tiles); 8 and 4 bytes (.ca, the only form for them). The _zfill forms copy
// the first src_bytes (<= the copy size; 0 reads nothing) and zero the rest of the copy.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(smem)), "l"(gmem));
}
__device__ __forceinline__ void cp_async_8(void* smem, const void* gmem) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(smem_addr(smem)), "l"(gmem));
}
__device__ __forceinline__ void cp_async_4(void* smem, const void* gmem) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(smem_addr(smem)), "l"(gmem));
}
__device__ __forceinline__ void cp_async_16_zfill(void* smem, const void* gmem, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)),
               "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_8_zfill(void* smem, const void* gmem, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(smem_addr(smem)),
               "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_4_zfill(void* smem, const void* gmem, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(smem)),
               "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// "memory": a thread may read its own completed copies right after the wait, before any
// barrier (bwd_kernel.cuh's lse split); without the clobber the compiler could hoist that
// plain shared load above the wait.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Copies rows [0, rows_valid) x cols [0, cols_valid) of a global tile (row stride `gstride`
// elements, unit column stride) into a [kRows][kCols] smem tile with `sstride` elements per
// row, zero-filling everything outside: padded head-dim lanes and rows past the sequence
// end must be exact zeros (0 * garbage could be NaN in the products). Each 16-byte chunk
// (8 elements) of a valid row is one cp.async of 16 bytes when its source is 16-byte
// aligned, else two of 8 or four of 4 bytes, the widest its source alignment allows; a
// ragged last chunk (cols_valid % 8 != 0) copies only its valid bytes and zero-fills the
// rest (src-size). With D % 8 != 0 the rows of a contiguous tensor start off 16-byte
// boundaries (row stride 2D bytes): D % 8 == 4 gives 16- and 8-byte rows alternately,
// D % 4 == 2 4-byte rows between them, so every even D stays asynchronous. Only a source
// at an odd element (2-byte alignment: odd rows of an odd D, odd-offset views) takes the
// synchronous element loads, which stall the thread until they arrive.
template <int kRows, int kCols, int kNThreads, typename Elem>
__device__ __forceinline__ void load_tile(Elem* smem, int sstride, const Elem* gmem,
                                          int64_t gstride, int rows_valid, int cols_valid) {
  static_assert(kCols % 8 == 0, "tile width must be a multiple of 8 elements (16 bytes)");
  static_assert(sizeof(Elem) == 2, "chunks of 8 two-byte elements");
  constexpr int kChunks = kCols / 8;
  const bool vec_ok = (reinterpret_cast<uintptr_t>(gmem) % 16 == 0) && (gstride % 8 == 0);
  for (int idx = threadIdx.x; idx < kRows * kChunks; idx += kNThreads) {
    const int r = idx / kChunks;
    const int c = (idx % kChunks) * 8;
    Elem* dst = smem + r * sstride + c;
    if (r < rows_valid && c + 8 <= cols_valid && vec_ok) {
      cp_async_16(dst, gmem + r * gstride + c);
    } else if (r >= rows_valid || c >= cols_valid) {
      *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
    } else {
      const Elem* src = gmem + r * gstride + c;
      const int bytes = 2 * min(8, cols_valid - c);  // valid bytes of the chunk, 2..16
      const unsigned align = static_cast<unsigned>(reinterpret_cast<uintptr_t>(src) & 15u);
      if (align == 0) {
        cp_async_16_zfill(dst, src, bytes);
      } else if (align % 8 == 0) {
        // A piece past the valid bytes copies 0 bytes; its source is then the chunk's
        // first element (valid), not an address past the tensor's end that
        // compute-sanitizer could flag although nothing is read.
#pragma unroll
        for (int k = 0; k < 2; ++k) {
          const int n = max(0, min(8, bytes - 8 * k));
          cp_async_8_zfill(dst + 4 * k, n > 0 ? src + 4 * k : src, n);
        }
      } else if (align % 4 == 0) {
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const int n = max(0, min(4, bytes - 4 * k));
          cp_async_4_zfill(dst + 2 * k, n > 0 ? src + 2 * k : src, n);  // as above
        }
      } else {
        const Elem zero = ElemOps<Elem>::from_float(0.f);
#pragma unroll
        for (int e = 0; e < 8; ++e) dst[e] = c + e < cols_valid ? src[e] : zero;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// Positions and masks (the semantics of attn_params.h).
__device__ __forceinline__ int64_t q_position(const AttnMaskParams& m, int i) {
  return m.q_pos ? m.q_pos[i] : m.q_offset + i;
}
__device__ __forceinline__ int64_t k_position(const AttnMaskParams& m, int j) {
  return m.k_pos ? m.k_pos[j] : m.k_offset + j;
}

// Non-finite inputs follow torch's math backend (attn_params.h): a NaN anywhere in a row's
// scores makes the row NaN. fmaxf returns the other operand for a NaN (IEEE maxNum), so a
// running max built with it silently drops a NaN score and the row came out finite or 0;
// PTX max.NaN (sm_80+, one FMNMX like fmaxf) returns NaN if either operand is NaN.
__device__ __forceinline__ float max_nan(float a, float b) {
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

// Whether tiles or elements that the band or documents hide (common/visibility.h) may be
// skipped: only when there is such a rule and every value they would read is finite
// (AttnMaskParams::nonfinite), since math gives NaN for NaN + (-inf) and 0 * NaN. Calls
// without a band or documents never skip.
__device__ __forceinline__ bool visibility_skip_ok(const AttnMaskParams& m) {
  return has_visibility_rule(m) && skip_allowed(m);
}

__device__ __forceinline__ int32_t q_document(const AttnMaskParams& m, int i) {
  return m.q_doc ? m.q_doc[i] : 0;
}
__device__ __forceinline__ int32_t k_document(const AttnMaskParams& m, int j) {
  return m.k_doc ? m.k_doc[j] : 0;
}

// Min and max of vals[start, start + len) (len >= 1), identical in every lane of the
// warp (a strided warp loop, then a butterfly).
template <typename T>
__device__ __forceinline__ Span warp_span(const T* vals, int start, int len, int lane) {
  T mn = vals[start], mx = mn;
  for (int t = lane; t < len; t += 32) {
    const T v = vals[start + t];
    mn = v < mn ? v : mn;
    mx = v > mx ? v : mx;
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const T a = __shfl_xor_sync(0xffffffffu, mn, o);
    const T b = __shfl_xor_sync(0xffffffffu, mx, o);
    mn = a < mn ? a : mn;
    mx = b > mx ? b : mx;
  }
  return {static_cast<int64_t>(mn), static_cast<int64_t>(mx)};
}

// Positions and documents of one block of queries or keys, as min/max (the input of
// classify_tile). Positions may be any map (zigzag, striped); without a map they are
// offset + index, without documents the document span is {0, 0} (never read).
struct BlockSpans {
  Span pos, doc;
};

__device__ __forceinline__ BlockSpans block_spans(const int64_t* pos, int64_t offset,
                                                  const int32_t* doc, int start, int len,
                                                  int lane) {
  BlockSpans r;
  r.pos = pos ? warp_span(pos, start, len, lane)
              : Span{offset + start, offset + start + len - 1};
  r.doc = doc ? warp_span(doc, start, len, lane) : Span{0, 0};
  return r;
}

// The spans of block b (blocks of `block` rows, n rows in all; warp-collective like
// block_spans): from the per-call table when launch.cu computed one (a position map or
// documents: block_spans.cu, which fills it with block_spans), else block_spans itself.
__device__ __forceinline__ BlockSpans spans_of_block(const Span* table, const int64_t* pos,
                                                     int64_t offset, const int32_t* doc, int b,
                                                     int block, int n, int lane) {
  if (table) return BlockSpans{table[2 * b], table[2 * b + 1]};
  const int start = b * block;
  return block_spans(pos, offset, doc, start, min(block, n - start), lane);
}

// The status of a (query block, key block) tile under the band and documents: kFull when
// there is no such rule, else classify_tile's, with kSkip demoted to kPartial (computed,
// every element hidden by the element test) when skipping is not allowed (skip_ok is
// visibility_skip_ok). Warp-uniform: every input is.
__device__ __forceinline__ TileKind tile_status(const AttnMaskParams& m, bool skip_ok,
                                                const BlockSpans& q, const BlockSpans& k) {
  if (!has_visibility_rule(m)) return TileKind::kFull;
  const TileKind t = classify_tile(m, q.pos, k.pos, q.doc, k.doc);
  return t == TileKind::kSkip && !skip_ok ? TileKind::kPartial : t;
}

// Gemma 2's soft cap (attn_params.h) on a scaled score, before the mask: returns
// t = tanh(x / cap) and sets x = cap * t; the backward's dS factor is 1 - t^2.
// Not tanhf: under --use_fast_math (setup.py) nvcc compiles tanhf to tanh.approx.f32
// (PTX ISA: about 2^-11 relative error; the PTX of fwd_bf16_hd128.cu showed it), so at
// Gemma 2's cap of 50 a logit would be off by up to 0.025, its probability by 2.5%.
// tanh(y) = 1 - 2 / (exp(2y) + 1) with ex2.approx (2^-22 relative) and the approximate
// division (2 ulp) is within ~4e-7 of tanh(y) absolutely, i.e. 2e-5 in a logit at cap 50,
// for one more MUFU op per element. exp2 overflowing to +inf gives t = 1 and underflowing
// to 0 gives t = -1 (so +-inf scores become +-cap, as math's cap * tanh(s / cap)); a NaN
// stays NaN.
__device__ __forceinline__ float apply_softcap(float& x, float cap, float inv_cap) {
  const float e = exp2f(x * inv_cap * (2.f * kLog2e));
  const float t = 1.f - 2.f / (e + 1.f);
  x = cap * t;
  return t;
}

// The additive term of one element, in natural log units as torch adds it to the scaled
// (and soft-capped) score: -inf where the band or documents hide the element (tested only
// when `vis_test`, i.e. on a partial tile) or a bool mask is false, plus the float mask's
// value; 0 when nothing applies. Additive like math's (s + mask): a hidden element adds
// -inf, so a NaN or +inf score there stays NaN, and a float mask of +inf there gives NaN
// (-inf + inf), as the CPU kernels' mask_tile (mask, then -inf) gives. Row i < Sq and
// column j < Sk are the caller's responsibility; qd / kd are read only with documents.
// The tensor-core kernels (bf16 / fp16) accumulate in float, so their float mask is float.
// The kernels keep scores in natural units and convert to log2 units only inside exp2:
// exp2((s - m) * log2(e)). Scaling the mask by log2(e) first (as this code once did)
// overflows to -inf for any value below -FLT_MAX / log2(e) = -2.36e38, and
// torch.finfo(bfloat16 / float32).min (-3.39e38 / -3.40e38), Hugging Face's padding
// value, is below it: a fully padded row then gave out = 0, lse = -inf instead of torch's
// mean of V with lse = finfo.min.
__device__ __forceinline__ float mask_term(const AttnMaskParams& m, const void* mask_bh, int i,
                                           int j, bool vis_test, int64_t qpos, int64_t kpos,
                                           int32_t qd, int32_t kd) {
  float t = vis_test && !visible(m, qpos, kpos, qd, kd) ? -INFINITY : 0.f;
  if (m.kind == MaskKind::kBool) {
    const uint8_t* mb = static_cast<const uint8_t*>(mask_bh);
    if (!mb[i * m.stride[2] + j * m.stride[3]]) t = -INFINITY;
  } else if (m.kind == MaskKind::kFloat) {
    const float* mf = static_cast<const float*>(mask_bh);
    t += mf[i * m.stride[2] + j * m.stride[3]];
  }
  return t;
}

// lse (float64 for every input dtype, attn_params.h) as two floats, hi = (float)lse and
// lo = (float)(lse - hi), so the backward's P = exp((S - hi) - lo) stays float32
// arithmetic per element yet keeps lse's float64 accuracy: a row masked by a huge finite
// value (-1e9, finfo.min) has lse = m + log(n) with log(n) below half an ulp of m in
// float32, which a float lse rounded away (P = exp(S - m) = 1 instead of 1 / n).
// lse = -inf (a row with no key) gives hi = -inf, lo = NaN: callers test hi first.
struct SplitLse {
  float hi, lo;
};
__device__ __forceinline__ SplitLse split_lse(double lse) {
  // Explicit round-to-nearest conversions: plain casts compile to cvt.rn.ftz under
  // --use_fast_math, which would flush a denormal lo to 0 (harmless, but not exact).
  float hi, lo;
  asm("cvt.rn.f32.f64 %0, %1;" : "=f"(hi) : "d"(lse));
  double hid;
  asm("cvt.f64.f32 %0, %1;" : "=d"(hid) : "f"(hi));
  asm("cvt.rn.f32.f64 %0, %1;" : "=f"(lo) : "d"(lse - hid));
  return {hi, lo};
}

// The (b, h) slice of the mask. A float mask is stored in the accumulation type
// (attn_params.h): MaskT is float for every kernel but the float64 SIMT one (double).
template <typename MaskT = float>
__device__ __forceinline__ const void* mask_slice(const AttnMaskParams& m, int b, int h) {
  if (m.kind == MaskKind::kNone) return nullptr;
  const int64_t off = b * m.stride[0] + h * m.stride[1];
  return m.kind == MaskKind::kBool
             ? static_cast<const void*>(static_cast<const uint8_t*>(m.ptr) + off)
             : static_cast<const void*>(static_cast<const MaskT*>(m.ptr) + off);
}

// Word (kpos & 3) of a Philox result, by selects: a dynamic index into the struct would
// put it in local memory (ptxas showed a 32-byte stack frame for r.w[kpos & 3]).
__device__ __forceinline__ uint32_t philox_word(const Philox4& r, int64_t kpos) {
  const uint32_t lane = static_cast<uint32_t>(kpos) & 3u;
  const uint32_t lo = lane & 1u ? r.w[1] : r.w[0];
  const uint32_t hi = lane & 1u ? r.w[3] : r.w[2];
  return lane & 2u ? hi : lo;
}

// Dropout decision (dropout_rng.h's dropout_keep, bit for bit) for two horizontally
// adjacent elements of one row (the pair a thread holds in an mma accumulator); one
// Philox call serves both when their keys share a group of four positions (always, for
// contiguous even-aligned positions).
__device__ __forceinline__ void dropout_keep2(const DropoutParams& d, int b, int h, int64_t qpos,
                                              int64_t kpos0, int64_t kpos1, bool& keep0,
                                              bool& keep1) {
  const Philox4 r0 = dropout_words(d.seed, static_cast<uint32_t>(b),
                                   static_cast<uint32_t>(h + d.head_offset),
                                   qpos, kpos0);
  keep0 = philox_word(r0, kpos0) >= d.threshold;
  if ((static_cast<uint64_t>(kpos0) >> 2) == (static_cast<uint64_t>(kpos1) >> 2)) {
    keep1 = philox_word(r0, kpos1) >= d.threshold;
  } else {
    const Philox4 r1 = dropout_words(d.seed, static_cast<uint32_t>(b),
                                     static_cast<uint32_t>(h + d.head_offset),
                                     qpos, kpos1);
    keep1 = philox_word(r1, kpos1) >= d.threshold;
  }
}

// Whether dropout_keep_pair may serve a warp: contiguous key positions (no map) with
// k_offset % 4 == 0, so the four keys a lane pair holds in an n8 tile (whose first column
// is a multiple of 8) share one Philox counter (kpos >> 2). Warp-uniform.
__device__ __forceinline__ bool dropout_pair_ok(const AttnMaskParams& m) {
  return m.k_pos == nullptr && (static_cast<uint64_t>(m.k_offset) & 3u) == 0;
}

// Keep bits of the four keys kpos4 .. kpos4 + 3 (kpos4 % 4 == 0) for two rows, shared by
// lanes 2u and 2u + 1 of an mma accumulator fragment: both hold rows (qpos0, qpos1), the
// even lane keys kpos4 + {0, 1}, the odd lane kpos4 + {2, 3}. dropout_keep2 has each lane
// draw both rows' Philox call, so the pair drew the same two calls twice; here the even
// lane draws row 0's, the odd lane row 1's, and one shuffle swaps the 4-bit results.
// Returns bit 4 t + w = key kpos4 + w of row t kept (dropout_rng.h's decision, bit for
// bit). Every lane of the warp must call it (shuffle).
__device__ __forceinline__ uint32_t dropout_keep_pair(const DropoutParams& d, int b, int h,
                                                      int64_t qpos0, int64_t qpos1,
                                                      int64_t kpos4, int lane) {
  const bool odd = lane & 1;
  const Philox4 r = dropout_words(d.seed, static_cast<uint32_t>(b),
                                  static_cast<uint32_t>(h + d.head_offset),
                                  odd ? qpos1 : qpos0, kpos4);
  uint32_t own = 0;
#pragma unroll
  for (int w = 0; w < 4; ++w) own |= (r.w[w] >= d.threshold ? 1u : 0u) << w;
  const uint32_t other = __shfl_xor_sync(0xffffffffu, own, 1);
  return odd ? (other | own << 4) : (own | other << 4);
}

__host__ __device__ constexpr int ceil_div(int64_t a, int b) {
  return static_cast<int>((a + b - 1) / b);
}

}  // namespace cuda
}  // namespace ring_attn

// CPU backward of ring_attn's local attention: flash-style recomputation of P from the
// saved lse, with work items that own their outputs, so no atomics and a deterministic
// result.
//
// A work item is (batch, KV head, key chunk): it owns dK and dV of its chunk's keys and
// loops over every query head of the KV group (GQA: dK/dV summed over the group in the
// item's float32 accumulators) and every query block. Per (query block, key block) tile:
//   S  = scale * Q K^T, softcapped: S = cap * tanh(S / cap), T = 1 - tanh^2 (softcap > 0)
//   P = exp(S + mask - lse)                            (P = 0 where lse = -inf; the mask
//                                                       in the accumulation type, lse in
//                                                       float64, split hi + lo)
//   dP = dO V^T, then both P and dP are multiplied by keep / (1 - p) under dropout
//   dV += P_dropped^T dO
//   dS = P * (dP - delta)                              (delta = rowsum(dO * O) - dlse)
//   dS *= T                                            (softcap: the raw score's gradient)
//   dK += scale * dS^T Q,  dQ_block += scale * dS K
// dQ of a query block is summed over the item's key blocks in a local buffer. With one
// chunk per (batch, KV head) it is complete and written directly; when there are too few
// (batch, KV head) pairs to keep every thread busy, the keys are cut into chunks, each
// chunk writes its own float32 partial dQ, and a second parallel pass sums the partials.
//
// Non-finite values as in torch's math backward: the mask is added (tile.h), exp keeps
// NaN, P = 0 rows still multiply dP (0 * NaN = NaN in dS), and no tile is skipped when a
// value it would read is non-finite (attn_params.h), so NaN lands exactly where math's.
//
// Products: gemm_bcast (gemm.h). With bfloat16 inputs on AVX512-BF16 CPUs all five run on
// vdpbf16ps (gemm_bf16_avx512.cpp) with float32 accumulation, P and dS rounded to bf16 for
// dV, dK and dQ as torch's own CPU flash backward and FlashAttention do. Measured on the
// 2-core Zen 4 EPYC, S=4096, H=2, D=64..128, one thread, CPU time, shared host: with only S
// and dP on bf16 pairs the three float32 products took 69-73% of the backward (at about
// half the bf16 products' rate) and the backward ran at 111-118 GFLOP/s; all five on bf16
// pairs: 150-170 GFLOP/s. Errors vs float64 stay within 1.1x torch's bf16 error (dq, as
// before) and below it for dk, dv (tests/test_cpu_kernels.py bound: 3x).
#include "cpu/isa.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

#include "cpu/gemm.h"
#include "cpu/kernels.h"
#include "cpu/tile.h"

namespace ring_attn::cpu {
namespace {

struct BwdBlocks {
  int64_t q, k;
};

// Block sizes, clipped to the lengths. Query block 64 x key block 128: five products per
// tile share P and dS (3 x 32 KiB tiles) in L1/L2. Measured on the 2-core AMD EPYC
// (AVX-512), backward S=4096, H=2, D=64, float32, one thread, CPU time, GFLOP/s
// (FlashAttention convention, 2.5x forward):
//   q x k = 32x64: 146, 64x64: 149, 64x128: 175, 64x256: 144, 128x128: 142, 128x64: 129,
//           32x128: 136.
// bf16_dot (all five products on bf16 pairs) takes 128 queries: dV += P^T dO and dK +=
// dS^T Q reduce over the query block, and 64 pairs per pass instead of 32 amortise the
// reload of their float32 accumulators. Backward S=4096, H=2, bfloat16, one thread, CPU
// time, shared host (Zen 4), two rounds, GFLOP/s, D=64 / D=128 non-causal:
//   64x128: 152, 141 / 154, 143;  128x128: 166, 159 / 165, 161;  256x128: 166, 152 /
//   173, 172;  128x256: 169, 158 / 172, 160;  causal 128x128: 155 / 154 (64x128: 151 / 147).
BwdBlocks bwd_blocks(int64_t Sq, int64_t Sk, bool bf16_dot) {
  BwdBlocks bs{bf16_dot ? 128 : 64, 128};
  if (Sq < bs.q) bs.q = std::max<int64_t>(Sq, 1);
  if (Sk < bs.k) bs.k = std::max<int64_t>(Sk, 1);
  return bs;
}

template <typename T, typename grad_t>
inline void store_rows(const T* src, int64_t rows, int64_t cols, grad_t* dst) {
  for (int64_t i = 0; i < rows * cols; ++i) dst[i] = static_cast<grad_t>(src[i]);
}

// kDot: bfloat16 inputs with AVX512-BF16 -- all five products take bf16 pairs
// (gemm_bf16_avx512.cpp) with float32 accumulation. Pairs run along each product's
// reduction: over D for S = Q K^T and dP = dO V^T (Q, dO, K^T, V^T packed in pairs along
// their rows), over queries for dV += P^T dO and dK += dS^T Q (P, dS, dO, Q in pairs of
// rows), over keys for dQ += dS K (dS rows as bf16, K in pairs of rows). P and dS are
// rounded to bf16 only as operands; softmax and dS = P (dP - delta) stay float32.
template <typename scalar_t, typename grad_t, bool kDot>
void bwd_impl(const AttnBwdParams& p) {
  using acc = acc_t<scalar_t>;
  const auto& s = p.shape;
  const int64_t B = s.B, Hq = s.Hq, Hk = s.Hk, Sq = s.Sq, Sk = s.Sk, D = s.D, Dv = s.Dv;
  grad_t* dq = static_cast<grad_t*>(p.dq);
  grad_t* dk = static_cast<grad_t*>(p.dk);
  grad_t* dv = static_cast<grad_t*>(p.dv);
  if (B * Hk * Sk == 0 || Sq == 0) {
    std::fill(dq, dq + B * Hq * Sq * D, grad_t(0));
    std::fill(dk, dk + B * Hk * Sk * D, grad_t(0));
    std::fill(dv, dv + B * Hk * Sk * Dv, grad_t(0));
    return;
  }
  const int64_t group = Hq / Hk;
  const int64_t D2 = (D + 1) / 2, Dv2 = (Dv + 1) / 2;
  const BwdBlocks bs = bwd_blocks(Sq, Sk, kDot);
  const int64_t QB = bs.q, KB = bs.k;
  const int64_t nqb = ceil_div(Sq, QB), nkb = ceil_div(Sk, KB);

  // Key chunks: enough work items for every thread (two per thread for balance), but a
  // single chunk whenever (batch, KV head) pairs already provide them.
  const int64_t nthreads = at::get_num_threads();
  int64_t nchunks = 1;
  if (B * Hk < 2 * nthreads) nchunks = std::min(nkb, ceil_div(2 * nthreads, B * Hk));
  // The dQ partials cost one [B, Hq, Sq, D] slice per chunk: keep them within 512 MiB;
  // beyond that, fewer chunks (less parallelism for tiny B * Hk) rather than more memory.
  const int64_t slice_bytes = B * Hq * Sq * D * static_cast<int64_t>(sizeof(acc));
  if (slice_bytes > 0) {
    nchunks = std::max<int64_t>(1, std::min(nchunks, (int64_t(512) << 20) / slice_bytes));
  }
  const int64_t blocks_per_chunk = ceil_div(nkb, nchunks);
  nchunks = ceil_div(nkb, blocks_per_chunk);
  const int64_t CK = blocks_per_chunk * KB;  // keys per chunk (the last may be shorter)

  BlockPositions qpos, kpos;
  qpos.init(p.mask.q_pos, p.mask.q_offset, p.mask.q_doc, Sq, QB);
  kpos.init(p.mask.k_pos, p.mask.k_offset, p.mask.k_doc, Sk, KB);
  const int64_t* qp = qpos.pos.data();
  const int64_t* kp = kpos.pos.data();

  const scalar_t* q = static_cast<const scalar_t*>(p.q);
  const scalar_t* k = static_cast<const scalar_t*>(p.k);
  const scalar_t* v = static_cast<const scalar_t*>(p.v);
  const scalar_t* dout = static_cast<const scalar_t*>(p.dout);
  const acc* delta = static_cast<const acc*>(p.delta);
  const acc scale = static_cast<acc>(p.scale);
  const acc softcap = static_cast<acc>(p.softcap);  // 0: off
  const bool has_dropout = p.dropout.p > 0.0;
  const double* lse = static_cast<const double*>(p.lse);  // every dtype (attn_params.h)
  const bool direct_q = direct_rows<scalar_t, acc>(p.q_stride[2], D);
  const bool direct_do = direct_rows<scalar_t, acc>(p.dout_stride[2], Dv);
  const bool may_skip = skip_allowed(p.mask);

  // dQ partials, one [B, Hq, Sq, D] slice per key chunk, only when there are several.
  std::vector<acc> dq_partial;
  if (nchunks > 1) dq_partial.assign(static_cast<size_t>(nchunks * B * Hq * Sq * D), acc(0));

  // Per-thread scratch, allocated once.
  const int64_t per_thread = CK * D                // K rows of the chunk (B of dQ += dS K)
                             + D * CK + Dv * CK    // K^T, V^T blocks (B of S and dP)
                             + CK * D + CK * Dv    // dK, dV accumulators
                             + QB * D + QB * Dv    // Q, dO blocks
                             + 3 * QB * KB         // P, dP / dS, dropped-P tiles
                             + (softcap > 0 ? QB * KB : 0)  // softcap's 1 - tanh^2 tile
                             + QB * D              // dQ block
                             + (kDot ? QB * (D + Dv) : 0)   // Q, dO as bf16 pairs
                             // kDot: P and dS in row pairs (A of dV, dK), dS in key pairs (A of dQ)
                             + (kDot ? 2 * ((QB + 1) / 2) * KB + QB * ((KB + 1) / 2) : 0);
  std::vector<acc> scratch(static_cast<size_t>(per_thread * nthreads));

  at::parallel_for(0, B * Hk * nchunks, 1, [&](int64_t begin, int64_t end) {
    acc* Kc = scratch.data() + at::get_thread_num() * per_thread;
    acc* Ktc = Kc + CK * D;
    acc* Vtc = Ktc + D * CK;
    acc* dKc = Vtc + Dv * CK;
    acc* dVc = dKc + CK * D;
    acc* Qbuf = dVc + CK * Dv;
    acc* dObuf = Qbuf + QB * D;
    acc* P = dObuf + QB * Dv;
    acc* dP = P + QB * KB;
    acc* Pdrop = dP + QB * KB;
    acc* dQb = Pdrop + QB * KB;
    acc* Tcap = dQb + QB * D;  // softcap > 0 only
    // kDot: K^T / V^T blocks as pairs in place of the float32 ones (half the words),
    // and the Q / dO blocks as pairs.
    uint32_t* Kt2c = reinterpret_cast<uint32_t*>(Ktc);
    uint32_t* Vt2c = reinterpret_cast<uint32_t*>(Vtc);
    uint32_t* Q2 = reinterpret_cast<uint32_t*>(Tcap + (softcap > 0 ? QB * KB : 0));
    uint32_t* dO2 = Q2 + QB * D2;
    uint32_t* Pt2 = dO2 + QB * Dv2;
    uint32_t* dSt2 = Pt2 + ((QB + 1) / 2) * KB;
    uint32_t* dS2 = dSt2 + ((QB + 1) / 2) * KB;
    // kDot: K, Q and dO in pairs of rows (B of dQ, dK and dV) in place of the float32 rows.
    uint32_t* Ki = reinterpret_cast<uint32_t*>(Kc);
    uint32_t* Qi = reinterpret_cast<uint32_t*>(Qbuf);
    uint32_t* dOi = reinterpret_cast<uint32_t*>(dObuf);

    for (int64_t item = begin; item < end; ++item) {
      const int64_t chunk = item % nchunks;
      const int64_t hk = (item / nchunks) % Hk;
      const int64_t b = item / (nchunks * Hk);
      const int64_t kb0 = chunk * blocks_per_chunk;
      const int64_t kb1 = std::min(nkb, kb0 + blocks_per_chunk);
      const int64_t c0 = kb0 * KB, cn = std::min(Sk, kb1 * KB) - c0;

      const scalar_t* kh = k + b * p.k_stride[0] + hk * p.k_stride[1];
      const scalar_t* vh = v + b * p.v_stride[0] + hk * p.v_stride[1];
      if constexpr (!kDot) load_block(kh, p.k_stride[2], c0, cn, D, Kc);
      for (int64_t kb = kb0; kb < kb1; ++kb) {
        const int64_t j0 = kb * KB, n = std::min(KB, Sk - j0);
        if constexpr (kDot) {
          pack_pairs_t(kh, p.k_stride[2], j0, n, D, Kt2c + (kb - kb0) * D2 * KB, KB);
          pack_pairs_t(vh, p.v_stride[2], j0, n, Dv, Vt2c + (kb - kb0) * Dv2 * KB, KB);
          pack_pairs_interleaved(kh, p.k_stride[2], j0, n, D, Ki + (j0 - c0) / 2 * D);
        } else {
          load_block_t(kh, p.k_stride[2], j0, n, D, Ktc + (kb - kb0) * D * KB, KB);
          load_block_t(vh, p.v_stride[2], j0, n, Dv, Vtc + (kb - kb0) * Dv * KB, KB);
        }
      }
      std::fill(dKc, dKc + cn * D, acc(0));
      std::fill(dVc, dVc + cn * Dv, acc(0));

      for (int64_t g = 0; g < group; ++g) {
        const int64_t h = hk * group + g;
        const scalar_t* qh = q + b * p.q_stride[0] + h * p.q_stride[1];
        const scalar_t* doh = dout + b * p.dout_stride[0] + h * p.dout_stride[1];
        const double* lse_h = lse + (b * Hq + h) * Sq;
        const acc* delta_h = delta + (b * Hq + h) * Sq;
        for (int64_t qb = 0; qb < nqb; ++qb) {
          const int64_t i0 = qb * QB, m = std::min(QB, Sq - i0);
          bool loaded = false;
          const acc* Q = Qbuf;
          const acc* dO = dObuf;
          int64_t ldq = D, lddo = Dv;
          std::fill(dQb, dQb + m * D, acc(0));
          for (int64_t kb = kb0; kb < kb1; ++kb) {
            const TileKind kind = tile_kind(p.mask, qpos, qb, kpos, kb, may_skip);
            if (kind == TileKind::kSkip) continue;
            if (!loaded) {
              if constexpr (kDot) {
                pack_pairs_rows(qh, p.q_stride[2], i0, m, D, Q2);
                pack_pairs_rows(doh, p.dout_stride[2], i0, m, Dv, dO2);
                pack_pairs_interleaved(qh, p.q_stride[2], i0, m, D, Qi);
                pack_pairs_interleaved(doh, p.dout_stride[2], i0, m, Dv, dOi);
              } else if (direct_q) {
                Q = reinterpret_cast<const acc*>(qh + i0 * p.q_stride[2]);
                ldq = p.q_stride[2];
              } else {
                load_block(qh, p.q_stride[2], i0, m, D, Qbuf);
              }
              if constexpr (kDot) {
                // (dO is read as pairs only, packed above.)
              } else if (direct_do) {
                dO = reinterpret_cast<const acc*>(doh + i0 * p.dout_stride[2]);
                lddo = p.dout_stride[2];
              } else {
                load_block(doh, p.dout_stride[2], i0, m, Dv, dObuf);
              }
              loaded = true;
            }
            const int64_t j0 = kb * KB, n = std::min(KB, Sk - j0);
            const acc* K = Kc + (j0 - c0) * D;
            const acc* Kt = Ktc + (kb - kb0) * D * KB;
            const acc* Vt = Vtc + (kb - kb0) * Dv * KB;

            // P = exp(scale * Q K^T + mask - lse)
            if constexpr (kDot) {
              gemm_bcast_bf16_avx512(m, n, D2, scale, Q2, D2, 1, Kt2c + (kb - kb0) * D2 * KB, KB,
                                     0.f, P, n);
            } else {
              gemm_bcast(m, n, D, scale, Q, ldq, 1, Kt, KB, acc(0), P, n, /*split_k=*/n < 16);
            }
            if (softcap > 0) softcap_tile<acc>(P, Tcap, n, m, n, softcap);
            mask_tile(P, n, m, n, p.mask, b, h, i0, j0, qpos, kpos, kind == TileKind::kPartial);
            for (int64_t r = 0; r < m; ++r) {
              acc* row = P + r * n;
              const double l = lse_h[i0 + r];
              if (l == -std::numeric_limits<double>::infinity()) {
                std::fill(row, row + n, acc(0));
              } else {
                // P = exp((S - hi) - lo), lse = hi + lo (attn_params.h): exact for
                // float64 (lo = 0); for float32 the log(n) that hi alone rounds away.
                const acc hi = static_cast<acc>(l);
                exp_row_sum(row, n, hi, static_cast<acc>(l - double(hi)));
              }
            }
            // dP = dO V^T
            if constexpr (kDot) {
              gemm_bcast_bf16_avx512(m, n, Dv2, 1.f, dO2, Dv2, 1, Vt2c + (kb - kb0) * Dv2 * KB,
                                     KB, 0.f, dP, n);
            } else {
              gemm_bcast(m, n, Dv, acc(1), dO, lddo, 1, Vt, KB, acc(0), dP, n, /*split_k=*/n < 16);
            }
            const acc* Pd = P;  // the probabilities dV sees
            if (has_dropout) {
              dropout_tile<acc>(P, Pdrop, dP, n, m, n, p.dropout, b, h, i0, j0, qp, kp);
              Pd = Pdrop;
            }
            // dV += P_dropped^T dO
            if constexpr (kDot) {
              to_bf16_row_pairs_avx512(Pd, m, n, n, Pt2, n);
              gemm_bcast_bf16_avx512(n, Dv, (m + 1) / 2, 1.f, Pt2, 1, n, dOi, Dv, 1.f,
                                     dVc + (j0 - c0) * Dv, Dv);
            } else {
              gemm_bcast(n, Dv, m, acc(1), Pd, 1, n, dO, lddo, acc(1), dVc + (j0 - c0) * Dv, Dv);
            }
            // dS = P * (dP - delta), in place of dP
            for (int64_t r = 0; r < m; ++r) ds_row(P + r * n, dP + r * n, n, delta_h[i0 + r]);
            if (softcap > 0) {
              for (int64_t e = 0; e < m * n; ++e) dP[e] *= Tcap[e];  // d(cap tanh(s/cap))/ds
            }
            // dK += scale * dS^T Q, dQ += scale * dS K
            if constexpr (kDot) {
              to_bf16_row_pairs_avx512(dP, m, n, n, dSt2, n);
              gemm_bcast_bf16_avx512(n, D, (m + 1) / 2, scale, dSt2, 1, n, Qi, D, 1.f,
                                     dKc + (j0 - c0) * D, D);
              const int64_t n2 = (n + 1) / 2;
              to_bf16_rows_avx512(dP, m, n, n, reinterpret_cast<uint16_t*>(dS2), 2 * n2);
              gemm_bcast_bf16_avx512(m, D, n2, scale, dS2, n2, 1, Ki + (j0 - c0) / 2 * D, D, 1.f,
                                     dQb, D);
            } else {
              gemm_bcast(n, D, m, scale, dP, 1, n, Q, ldq, acc(1), dKc + (j0 - c0) * D, D);
              gemm_bcast(m, D, n, scale, dP, n, 1, K, D, acc(1), dQb, D);
            }
          }
          if (nchunks == 1) {
            store_rows(dQb, m, D, dq + ((b * Hq + h) * Sq + i0) * D);
          } else {
            acc* dst = dq_partial.data() + (((chunk * B + b) * Hq + h) * Sq + i0) * D;
            std::copy(dQb, dQb + m * D, dst);
          }
        }
      }
      store_rows(dKc, cn, D, dk + ((b * Hk + hk) * Sk + c0) * D);
      store_rows(dVc, cn, Dv, dv + ((b * Hk + hk) * Sk + c0) * Dv);
    }
  });

  if (nchunks > 1) {
    const int64_t rows = B * Hq * Sq, slice = rows * D;
    at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        for (int64_t c = 0; c < D; ++c) {
          acc sum = 0;
          for (int64_t ch = 0; ch < nchunks; ++ch) sum += dq_partial[ch * slice + r * D + c];
          dq[r * D + c] = static_cast<grad_t>(sum);
        }
      }
    });
  }
}

}  // namespace

template <typename scalar_t, typename grad_t>
void attn_bwd_kernel(const AttnBwdParams& p) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    if (use_avx512_bf16()) return bwd_impl<scalar_t, grad_t, true>(p);
  }
  bwd_impl<scalar_t, grad_t, false>(p);
}

template void attn_bwd_kernel<float, float>(const AttnBwdParams&);
template void attn_bwd_kernel<double, double>(const AttnBwdParams&);
template void attn_bwd_kernel<double, float>(const AttnBwdParams&);
template void attn_bwd_kernel<c10::BFloat16, c10::BFloat16>(const AttnBwdParams&);
template void attn_bwd_kernel<c10::BFloat16, float>(const AttnBwdParams&);
template void attn_bwd_kernel<c10::Half, c10::Half>(const AttnBwdParams&);
template void attn_bwd_kernel<c10::Half, float>(const AttnBwdParams&);

}  // namespace ring_attn::cpu

// Backward attention on tensor cores (bf16 / fp16), the FlashAttention-2 scheme.
//
// One CTA owns kBlockN keys of one (batch, KV head): it keeps K and V in smem and dK, dV
// in fp32 registers, and loops over every query head of the KV group (GQA: dK/dV are
// summed over the group here, no separate reduction) and every query block that the band
// and documents do not hide entirely (classify_tile, skipped as in the forward). The query
// block's Q, dO tiles, float64 lse and delta rows arrive by cp.async into one of kStages
// smem stages: with two (tile_config.h, wherever they fit) the next active block's copy,
// possibly in the next head of the group, is issued before this block's compute and
// waited for at the top of the next iteration (FA2's double-buffered Q/dO), so one CTA
// per SM (register-limited) no longer stalls on global memory at every query block; with
// one, each block waits for its own copy. Per query block of kBlockM rows (the lse split
// into two floats in smem, split_lse in utils.cuh):
//   phase 1  S = Q K^T, dP = dO V^T (mma.sync), then per element, recomputing P from the
//            saved lse (P = 0 where lse = -inf, i.e. rows with no key), with
//            delta = rowsum(dO * O) - dlse and s = scale S, soft-capped (s = c tanh(s / c))
//            when softcap > 0:
//              P   = exp((s + mask - lse_hi) - lse_lo)     (mask, band, documents as forward)
//              Pd  = P * keep / (1-p)                      (the dropped P forward used)
//              dS  = P * (dP * keep / (1-p) - delta)       (times 1 - tanh^2 with softcap)
//            Pd and dS go to smem as [query][key] in the input dtype.
//   phase 2  dV += Pd^T dO and dK += dS^T Q (ldmatrix.trans reads the transposes).
//   phase 3  dQ_partial = scale * dS K for this key block, added with fp32 atomicAdd into
//            a zeroed float32 dq_accum [B, Hq, Sq, D] (launch.cu converts it to dq's
//            dtype, or it is dq itself under grad_fp32). Atomics: each dQ element gets one
//            add per key block, as in FlashAttention-2.
// The three phases use different warp layouts (kernel_traits.h), joined through smem, so
// no warp needs the whole [kBlockM x kBlockN] tile or the whole head dim in registers.
// Epilogue: dK *= scale; dK, dV written once (padded head-dim lanes never written).
#pragma once
#include "common/attn_params.h"
#include "cuda/kernel_traits.h"
#include "cuda/utils.cuh"

namespace ring_attn {
namespace cuda {

template <typename Elem, typename Tr>
__global__ void __launch_bounds__(Tr::kNThreads, 1)
    bwd_tc_kernel(const AttnBwdParams p, const Span* __restrict__ q_spans,
                  float* __restrict__ dq_accum, const bool grad_fp32) {
  using Ops = ElemOps<Elem>;
  constexpr int kBlockM = Tr::kBlockM, kBlockN = Tr::kBlockN, kHD = Tr::kHeadDim;
  constexpr int kS = Tr::kStride, kPS = Tr::kPStride, kNThreads = Tr::kNThreads;
  constexpr int kStages = Tr::kStages;
  constexpr int kN1 = Tr::kN1, kD2 = Tr::kD2, kD3 = Tr::kD3;
  // dQ columns per chunk: the widest multiple of 16 up to 64 that divides kD3 (kD3 96 at
  // hd192 -> 48).
  constexpr int kD3Chunk = kD3 <= 64 ? kD3 : (kD3 % 64 == 0 ? 64 : 48);
  static_assert(kD3 % kD3Chunk == 0 && kD3Chunk % 16 == 0, "dQ column chunks");
  constexpr int kT1 = kN1 / 8, kT2 = kD2 / 8, kT3 = kD3Chunk / 8;  // n8 tiles per warp

  extern __shared__ __align__(16) unsigned char smem_raw[];
  // Stage st of the query block: sQ0 / sdO0 + st * kBlockM * kS, sLse0 / sDelta0 +
  // st * kBlockM. Every array before sLse0 is a multiple of 16 bytes long (kS and kPS are
  // multiples of 8 elements), so the doubles are aligned.
  Elem* sQ0 = reinterpret_cast<Elem*>(smem_raw);  // [kStages][kBlockM][kS]
  Elem* sdO0 = sQ0 + kStages * kBlockM * kS;      // [kStages][kBlockM][kS]
  Elem* sK = sdO0 + kStages * kBlockM * kS;       // [kBlockN][kS]
  Elem* sV = sK + kBlockN * kS;                   // [kBlockN][kS]
  Elem* sP = sV + kBlockN * kS;                   // [kBlockM][kPS]
  Elem* sdS = sP + kBlockM * kPS;                 // [kBlockM][kPS]
  double* sLse0 = reinterpret_cast<double*>(sdS + kBlockM * kPS);  // [kStages][kBlockM]
  float* sDelta0 = reinterpret_cast<float*>(sLse0 + kStages * kBlockM);  // [kStages][kBlockM]
  // The computed block's lse as two floats, hi + lo (split_lse), split once per row here
  // rather than by each of the 8 threads (4 lanes x 2 warps) that read a row in phase 1:
  // the split is float64 arithmetic, 1/64 of the float32 rate on sm_86/89/120.
  float* sLseHi = sDelta0 + kStages * kBlockM;  // [kBlockM]
  float* sLseLo = sLseHi + kBlockM;             // [kBlockM]

  const auto& sh = p.shape;
  const AttnMaskParams& mk = p.mask;
  const int n_block = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int Sq = static_cast<int>(sh.Sq), Sk = static_cast<int>(sh.Sk);
  const int D = static_cast<int>(sh.D), Dv = static_cast<int>(sh.Dv);
  const int group = static_cast<int>(sh.Hq / sh.Hk);
  const int n0 = n_block * kBlockN;
  const int cols_valid = min(kBlockN, Sk - n0);
  const bool has_mask = mk.kind != MaskKind::kNone;
  const bool has_rule = has_visibility_rule(mk);
  const bool has_doc = has_docs(mk);
  const bool skip_ok = visibility_skip_ok(mk);
  const bool softcap = p.softcap > 0.0;
  const bool dropout = p.dropout.p > 0.f;
  const bool pair_rng = dropout_pair_ok(mk);
  const float keep_scale = dropout ? 1.f / (1.f - static_cast<float>(p.dropout.p)) : 1.f;
  const float scale = static_cast<float>(p.scale);

  // Warp coordinates of the three phases (see kernel_traits.h).
  const int wm1 = warp % Tr::kWarpsM1, wn1 = warp / Tr::kWarpsM1;
  const int wn2 = warp % Tr::kWarpsN2, wd2 = warp / Tr::kWarpsN2;
  const int wm3 = warp % Tr::kWarpsM3, wd3 = warp / Tr::kWarpsM3;

  const Elem* gk = static_cast<const Elem*>(p.k) + b * p.k_stride[0] + hk * p.k_stride[1] +
                   static_cast<int64_t>(n0) * p.k_stride[2];
  const Elem* gv = static_cast<const Elem*>(p.v) + b * p.v_stride[0] + hk * p.v_stride[1] +
                   static_cast<int64_t>(n0) * p.v_stride[2];
  load_tile<kBlockN, kHD, kNThreads>(sK, kS, gk, p.k_stride[2], cols_valid, D);
  load_tile<kBlockN, kHD, kNThreads>(sV, kS, gv, p.v_stride[2], cols_valid, Dv);
  cp_async_commit();
  // The key block's spans, for classifying every query block: kept in sK's row padding
  // (the kSmemPad columns past kHD, never written by load_tile nor read by ldmatrix), one
  // copy per warp in its rows 2 warp and 2 warp + 1 (kBlockN >= 2 kNWarps), so no CTA
  // barrier orders the write and the reads and no registers hold them across the loops
  // (the forward's q_span_pad says what holding them cost).
  static_assert(kBlockN >= 2 * Tr::kNWarps, "two sK rows of padding per warp");
  static_assert(kSmemPad * sizeof(Elem) >= sizeof(Span), "a Span fits one row's padding");
  Span* k_span_pad = reinterpret_cast<Span*>(sK + 2 * warp * kS + kHD);
  Span* k_doc_pad = reinterpret_cast<Span*>(sK + (2 * warp + 1) * kS + kHD);
  if (has_rule) {
    const BlockSpans ks = block_spans(mk.k_pos, mk.k_offset, mk.k_doc, n0, cols_valid, lane);
    if (lane == 0) {
      *k_span_pad = ks.pos;
      *k_doc_pad = ks.doc;
    }
    __syncwarp();
  }

  float dk[kT2][4], dv[kT2][4];
#pragma unroll
  for (int t = 0; t < kT2; ++t)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[t][e] = dv[t][e] = 0.f;

  const double* lse_all = static_cast<const double*>(p.lse);  // float64 for every dtype
  const float* delta_all = static_cast<const float*>(p.delta);  // bf16/fp16: acc type float
  const int m_blocks = ceil_div(Sq, kBlockM);
  const int h_end = (hk + 1) * group;

  // The status of query block m against this key block (tile_status; warp-uniform, every
  // warp computes it identically from its own copy of the key spans). It does not depend
  // on the query head: positions and documents are per sequence index. The query block's
  // spans come from q_spans when launch.cu computed them once for the call (a position
  // map or documents: block_spans.cu), else from block_spans (offset arithmetic).
  auto kind_of = [&](int m) -> TileKind {
    if (!has_rule) return TileKind::kFull;
    return tile_status(mk, skip_ok,
                       spans_of_block(q_spans, mk.q_pos, mk.q_offset, mk.q_doc, m, kBlockM, Sq,
                                      lane),
                       BlockSpans{*k_span_pad, *k_doc_pad});
  };
  // The first query block >= m that is not skipped (m_blocks if none), and its status.
  // Every pair (query, key) such a block hides is skipped, unless an input may be
  // non-finite (visibility_skip_ok; math's NaN + (-inf) and 0 * NaN reach dQ, dK, dV).
  auto next_active = [&](int m, TileKind& status) -> int {
    for (; m < m_blocks; ++m) {
      status = kind_of(m);
      if (status != TileKind::kSkip) break;
    }
    return m;
  };
  // Stage st <- query block m of head h, all by cp.async: Q and dO tiles (load_tile), the
  // rows' float64 lse (8 bytes, by thread r for row r: the thread that splits it after its
  // own wait, before the barrier) and float delta (4 bytes). Rows past Sq are not copied;
  // nothing reads them (split and phase 1 test i < Sq).
  auto load_query_block = [&](int head, int m, int st) {
    const int m0 = m * kBlockM;
    const int rows = min(kBlockM, Sq - m0);
    const Elem* gq = static_cast<const Elem*>(p.q) + b * p.q_stride[0] +
                     head * p.q_stride[1] + static_cast<int64_t>(m0) * p.q_stride[2];
    const Elem* gdo = static_cast<const Elem*>(p.dout) + b * p.dout_stride[0] +
                      head * p.dout_stride[1] + static_cast<int64_t>(m0) * p.dout_stride[2];
    load_tile<kBlockM, kHD, kNThreads>(sQ0 + st * kBlockM * kS, kS, gq, p.q_stride[2], rows, D);
    load_tile<kBlockM, kHD, kNThreads>(sdO0 + st * kBlockM * kS, kS, gdo, p.dout_stride[2],
                                       rows, Dv);
    const int64_t row0 = (static_cast<int64_t>(b) * sh.Hq + head) * sh.Sq + m0;
    for (int r = threadIdx.x; r < 2 * kBlockM; r += kNThreads) {
      const int row = r < kBlockM ? r : r - kBlockM;
      if (row >= rows) continue;
      if (r < kBlockM) cp_async_8(sLse0 + st * kBlockM + row, lse_all + row0 + row);
      else cp_async_4(sDelta0 + st * kBlockM + row, delta_all + row0 + row);
    }
  };

  // The query blocks of every head of the KV group (GQA) in one sequence of active
  // (h, m_block) items, so the copy of the next item overlaps this one's compute even
  // across heads. cp.async groups: K/V (above), then with two stages the first item's
  // (prologue) and one per iteration (the next item's, empty after the last item);
  // wait<1> at the top of an iteration leaves only the newest group, the next item's, in
  // flight, so K/V and this item are complete. With one stage each iteration copies and
  // waits for its own item (wait<0>), as before double buffering.
  int h = hk * group;
  TileKind kind = TileKind::kFull;
  int m_block = next_active(0, kind);
  if constexpr (kStages == 2) {
    if (m_block < m_blocks) load_query_block(h, m_block, 0);
    cp_async_commit();
  }
  int stage = 0;

  // The item after (h, m_block): the next active block of this head, else the first of
  // the next head (which exists whenever this one does: activity does not depend on the
  // head); m_blocks after the last item.
  auto advance = [&](int& hh, int& m, TileKind& status) {
    m = next_active(m + 1, status);
    if (m == m_blocks && ++hh < h_end) m = next_active(0, status);
  };
  while (m_block < m_blocks) {
    // Two stages: the next item is found here and its copy issued before this item's
    // compute. One stage: it is found after the compute (nothing to prefetch).
    TileKind kind_next = kind;
    int h_next = h, m_next = m_block;
    if constexpr (kStages == 2) {
      advance(h_next, m_next, kind_next);
      // The other stage was last read by the previous iteration, which ended with a
      // barrier.
      if (m_next < m_blocks) load_query_block(h_next, m_next, stage ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      load_query_block(h, m_block, 0);
      cp_async_commit();
      cp_async_wait<0>();
    }
    const int m0 = m_block * kBlockM;
    const Elem* sQ = sQ0 + stage * kBlockM * kS;
    const Elem* sdO = sdO0 + stage * kBlockM * kS;
    const float* sDelta = sDelta0 + stage * kBlockM;
    if (threadIdx.x < kBlockM) {
      // Row r's lse was copied by this thread, so its own wait made it visible here.
      // Natural units (mask_term in utils.cuh): lse * log2(e) overflows for lse below
      // -2.36e38, e.g. a row padded with finfo(float32).min.
      const int r = threadIdx.x;
      const SplitLse sl = split_lse(m0 + r < Sq ? sLse0[stage * kBlockM + r]
                                                : -static_cast<double>(INFINITY));
      sLseHi[r] = sl.hi;
      sLseLo[r] = sl.lo;
    }
    __syncthreads();

    const void* mask_bh = mask_slice(mk, b, h);
    const int64_t row_base = (static_cast<int64_t>(b) * sh.Hq + h) * sh.Sq;
    const bool vis_test = kind == TileKind::kPartial;
    const bool read_doc = vis_test && has_doc;
    const bool need_mask = has_mask || cols_valid < kBlockN || vis_test;

    // ---- phase 1: S and dP for 16 queries x kN1 keys per warp -> Pd, dS in smem.
    {
      float s[kT1][4], dp[kT1][4];
#pragma unroll
      for (int t = 0; t < kT1; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[t][e] = dp[t][e] = 0.f;
#pragma unroll
      for (int kk = 0; kk < kHD / 16; ++kk) {
        uint32_t a[4];
        load_a(a, sQ, kS, wm1 * 16, kk * 16, lane);
#pragma unroll
        for (int nt2 = 0; nt2 < kT1 / 2; ++nt2) {
          uint32_t bb[4];
          load_b2(bb, sK, kS, wn1 * kN1 + nt2 * 16, kk * 16, lane);
          Ops::mma(s[2 * nt2], a, bb[0], bb[1]);
          Ops::mma(s[2 * nt2 + 1], a, bb[2], bb[3]);
        }
        load_a(a, sdO, kS, wm1 * 16, kk * 16, lane);
#pragma unroll
        for (int nt2 = 0; nt2 < kT1 / 2; ++nt2) {
          uint32_t bb[4];
          load_b2(bb, sV, kS, wn1 * kN1 + nt2 * 16, kk * 16, lane);
          Ops::mma(dp[2 * nt2], a, bb[0], bb[1]);
          Ops::mma(dp[2 * nt2 + 1], a, bb[2], bb[3]);
        }
      }
      const float cap = static_cast<float>(p.softcap);
      const float inv_cap = softcap ? __frcp_rn(cap) : 0.f;
      // Dropout bits of a lane pair's keys for both rows, one Philox call per lane
      // (dropout_keep_pair; warp-uniform: every lane runs this loop).
      uint32_t pair_bits[kT1];
#pragma unroll
      for (int nt = 0; nt < kT1; ++nt) pair_bits[nt] = 0u;
      if (dropout && pair_rng) {
        const int i0 = m0 + wm1 * 16 + lane / 4;
        const int64_t qp0 = i0 < Sq ? q_position(mk, i0) : 0;
        const int64_t qp1 = i0 + 8 < Sq ? q_position(mk, i0 + 8) : 0;
#pragma unroll
        for (int nt = 0; nt < kT1; ++nt) {
          pair_bits[nt] = dropout_keep_pair(
              p.dropout, b, h, qp0, qp1,
              mk.k_offset + n0 + wn1 * kN1 + nt * 8 + 4 * ((lane % 4) >> 1), lane);
        }
      }
#pragma unroll
      for (int t = 0; t < 2; ++t) {
        const int i_loc = wm1 * 16 + lane / 4 + 8 * t;
        const int i = m0 + i_loc;
        const float lse_hi = sLseHi[i_loc], lse_lo = sLseLo[i_loc];
        const float dlt = i < Sq ? sDelta[i_loc] : 0.f;
        const int64_t qpos = i < Sq ? q_position(mk, i) : 0;
        const int32_t qdoc = read_doc && i < Sq ? mk.q_doc[i] : 0;
#pragma unroll
        for (int nt = 0; nt < kT1; ++nt) {
          const int j_loc = wn1 * kN1 + nt * 8 + 2 * (lane % 4);
          const int j0 = n0 + j_loc;
          const int64_t kpos0 = j0 < Sk ? k_position(mk, j0) : 0;
          const int64_t kpos1 = j0 + 1 < Sk ? k_position(mk, j0 + 1) : 0;
          const int32_t kdoc0 = read_doc && j0 < Sk ? mk.k_doc[j0] : 0;
          const int32_t kdoc1 = read_doc && j0 + 1 < Sk ? mk.k_doc[j0 + 1] : 0;
          bool keep[2] = {true, true};
          if (dropout && i < Sq) {
            if (pair_rng) {
              const uint32_t bits = pair_bits[nt] >> (4 * t + 2 * (lane & 1));
              keep[0] = bits & 1u;
              keep[1] = (bits >> 1) & 1u;
            } else {
              dropout_keep2(p.dropout, b, h, qpos, kpos0, kpos1, keep[0], keep[1]);
            }
          }
          float pd[2], ds[2];
#pragma unroll
          for (int jj = 0; jj < 2; ++jj) {
            float x = s[nt][2 * t + jj] * scale;
            // d(c tanh(x / c)) / dx = 1 - tanh^2, the factor dS picks up.
            float dcap = 1.f;
            if (softcap) {
              const float th = apply_softcap(x, cap, inv_cap);
              dcap = 1.f - th * th;
            }
            if (need_mask) {
              if (i >= Sq || j0 + jj >= Sk) x = -INFINITY;
              else x += mask_term(mk, mask_bh, i, j0 + jj, vis_test, qpos,
                                  jj ? kpos1 : kpos0, qdoc, jj ? kdoc1 : kdoc0);
            }
            // (x - hi) - lo, not x - (hi + lo): hi + lo rounds back to hi in float.
            const float pr =
                lse_hi == -INFINITY ? 0.f : exp2f(((x - lse_hi) - lse_lo) * kLog2e);
            const float dpk = keep[jj] ? dp[nt][2 * t + jj] * keep_scale : 0.f;
            pd[jj] = keep[jj] ? pr * keep_scale : 0.f;
            ds[jj] = pr * (dpk - dlt) * dcap;
          }
          *reinterpret_cast<uint32_t*>(sP + i_loc * kPS + j_loc) = Ops::pack(pd[0], pd[1]);
          *reinterpret_cast<uint32_t*>(sdS + i_loc * kPS + j_loc) = Ops::pack(ds[0], ds[1]);
        }
      }
    }
    __syncthreads();

    // ---- phase 2: dV += Pd^T dO, dK += dS^T Q for 16 keys x kD2 columns per warp.
#pragma unroll
    for (int kk = 0; kk < kBlockM / 16; ++kk) {
      uint32_t a[4];
      load_a_trans(a, sP, kPS, wn2 * 16, kk * 16, lane);
#pragma unroll
      for (int nt2 = 0; nt2 < kT2 / 2; ++nt2) {
        uint32_t bb[4];
        load_b2_trans(bb, sdO, kS, wd2 * kD2 + nt2 * 16, kk * 16, lane);
        Ops::mma(dv[2 * nt2], a, bb[0], bb[1]);
        Ops::mma(dv[2 * nt2 + 1], a, bb[2], bb[3]);
      }
      load_a_trans(a, sdS, kPS, wn2 * 16, kk * 16, lane);
#pragma unroll
      for (int nt2 = 0; nt2 < kT2 / 2; ++nt2) {
        uint32_t bb[4];
        load_b2_trans(bb, sQ, kS, wd2 * kD2 + nt2 * 16, kk * 16, lane);
        Ops::mma(dk[2 * nt2], a, bb[0], bb[1]);
        Ops::mma(dk[2 * nt2 + 1], a, bb[2], bb[3]);
      }
    }

    // ---- phase 3: dQ += scale * dS K for 16 queries x kD3 columns per warp, in
    // chunks of at most 64 columns (32 accumulator registers): at hd256 the whole
    // 128-column slice on top of dK/dV spilled (ptxas: 255 registers + 8 bytes).
#pragma unroll 1
    for (int c0 = 0; c0 < kD3; c0 += kD3Chunk) {
      float dq[kT3][4];
#pragma unroll
      for (int t = 0; t < kT3; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) dq[t][e] = 0.f;
#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk) {
        uint32_t a[4];
        load_a(a, sdS, kPS, wm3 * 16, kk * 16, lane);
#pragma unroll
        for (int nt2 = 0; nt2 < kT3 / 2; ++nt2) {
          uint32_t bb[4];
          load_b2_trans(bb, sK, kS, wd3 * kD3 + c0 + nt2 * 16, kk * 16, lane);
          Ops::mma(dq[2 * nt2], a, bb[0], bb[1]);
          Ops::mma(dq[2 * nt2 + 1], a, bb[2], bb[3]);
        }
      }
#pragma unroll
      for (int t = 0; t < 2; ++t) {
        const int i = m0 + wm3 * 16 + lane / 4 + 8 * t;
        if (i >= Sq) continue;
        float* dst = dq_accum + (row_base + i) * D;
#pragma unroll
        for (int nt = 0; nt < kT3; ++nt)
#pragma unroll
          for (int jj = 0; jj < 2; ++jj) {
            const int c = wd3 * kD3 + c0 + nt * 8 + 2 * (lane % 4) + jj;
            if (c < D) atomicAdd(dst + c, dq[nt][2 * t + jj] * scale);
          }
      }
    }
    // sP, sdS, sLseHi / sLseLo and this stage are rewritten by the next iterations.
    __syncthreads();
    if constexpr (kStages == 2) {
      h = h_next;
      m_block = m_next;
      kind = kind_next;
      stage ^= 1;
    } else {
      advance(h, m_block, kind);
    }
  }
  cp_async_wait<0>();  // K/V copies complete even when no query block was active

  // Epilogue: dK = scale * sum dS^T Q, dV; rows past Sk and padded lanes are not written.
  const int64_t kv_base = (static_cast<int64_t>(b) * sh.Hk + hk) * sh.Sk;
#pragma unroll
  for (int t = 0; t < 2; ++t) {
    const int j = n0 + wn2 * 16 + lane / 4 + 8 * t;
    if (j >= Sk) continue;
#pragma unroll
    for (int nt = 0; nt < kT2; ++nt)
#pragma unroll
      for (int jj = 0; jj < 2; ++jj) {
        const int c = wd2 * kD2 + nt * 8 + 2 * (lane % 4) + jj;
        const float vk = dk[nt][2 * t + jj] * scale, vv = dv[nt][2 * t + jj];
        if (c < D) {
          if (grad_fp32) static_cast<float*>(p.dk)[(kv_base + j) * D + c] = vk;
          else static_cast<Elem*>(p.dk)[(kv_base + j) * D + c] = Ops::from_float(vk);
        }
        if (c < Dv) {
          if (grad_fp32) static_cast<float*>(p.dv)[(kv_base + j) * Dv + c] = vv;
          else static_cast<Elem*>(p.dv)[(kv_base + j) * Dv + c] = Ops::from_float(vv);
        }
      }
  }
}

// Host launcher, instantiated once per (dtype, head dim, tile variant) in csrc/cuda/inst/.
template <typename Elem, int kHeadDim, int kVariant>
cudaError_t run_bwd_tc(const AttnBwdParams& p, const Span* q_spans, float* dq_accum,
                       bool grad_fp32, cudaStream_t stream) {
  using Tr = typename BwdConfig<kHeadDim, kVariant>::T;
  static_assert(sizeof(Elem) == 2, "kSmemBytes assumes 2-byte elements");
  const size_t smem = Tr::kSmemBytes;
  auto kernel = bwd_tc_kernel<Elem, Tr>;
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  const dim3 grid(ceil_div(p.shape.Sk, Tr::kBlockN), static_cast<unsigned>(p.shape.Hk),
                  static_cast<unsigned>(p.shape.B));
  kernel<<<grid, Tr::kNThreads, smem, stream>>>(p, q_spans, dq_accum, grad_fp32);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace ring_attn

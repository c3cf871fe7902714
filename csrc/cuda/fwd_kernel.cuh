// Forward attention on tensor cores (bf16 / fp16), the FlashAttention-2 scheme.
//
// One CTA computes kBlockM query rows of one (batch, query head):
//   1. Q tile -> smem once (cp.async); K/V tiles of kBlockN keys stream through a
//      two-stage smem ring, the next tile's cp.async in flight while this one computes.
//   2. Per tile, each warp (16 query rows) computes S = Q K^T with mma.sync.m16n8k16
//      (operands via ldmatrix), scales it, soft-caps it (softcap > 0), applies the mask
//      (band and documents on global positions, bool / additive mask, sequence ends)
//      where the tile needs it, and updates the online softmax in fp32 registers:
//      m = max(m, rowmax S), P = exp2((S - m) log2 e),
//      l and O rescaled by exp2((m_old - m) log2 e) (natural units until the exp2: see
//      mask_term in utils.cuh). P is re-packed in registers as the A operand of
//      O += P V (the m16n8 accumulator layout equals the m16k16 operand layout).
//   3. One write of O / l (0 for rows without keys) and lse = m + log l (-inf there),
//      computed and stored in float64 (attn_params.h; split_lse in utils.cuh says why).
// Tiles that the band or documents hide entirely (common/visibility.h's classify_tile on
// the min/max of the block's positions and documents) are skipped, so zigzag / striped
// position maps skip exactly like contiguous ones, unless an input may be non-finite
// (visibility_skip_ok): math's NaN + (-inf) and 0 * NaN then reach every row. Tiles it
// reports fully visible need no element test. The row max propagates NaN (max_nan) and
// only a true -inf max takes the no-key branch, so NaN/inf follow torch's math backend
// (attn_params.h).
// Dropout: kept probabilities feed O, every probability feeds l (lse is un-dropped), and
// O is scaled by 1/(1-p) at the end; the keep decision is dropout_rng.h's, per element.
// Head dims below the instantiated kHeadDim are zero-padded in smem and never written.
#pragma once
#include "common/attn_params.h"
#include "cuda/kernel_traits.h"
#include "cuda/utils.cuh"

namespace ring_attn {
namespace cuda {

template <typename Elem, typename Tr>
__global__ void __launch_bounds__(Tr::kNThreads)
    fwd_tc_kernel(const AttnFwdParams p, const Span* __restrict__ k_spans, const bool out_fp32) {
  using Ops = ElemOps<Elem>;
  constexpr int kBlockM = Tr::kBlockM, kBlockN = Tr::kBlockN, kHD = Tr::kHeadDim;
  constexpr int kS = Tr::kStride, kNThreads = Tr::kNThreads;
  constexpr int kNT = kBlockN / 8;  // n8 tiles of S per warp
  constexpr int kOT = kHD / 8;      // n8 tiles of O per warp
  static_assert(kNT * 4 <= 32, "dropout keep bits of one tile must fit a 32-bit mask");

  extern __shared__ __align__(16) unsigned char smem_raw[];
  Elem* sQ = reinterpret_cast<Elem*>(smem_raw);  // [kBlockM][kS]
  Elem* sK = sQ + kBlockM * kS;                  // [2][kBlockN][kS]
  Elem* sV = sK + 2 * kBlockN * kS;              // [2][kBlockN][kS]

  const auto& sh = p.shape;
  const AttnMaskParams& mk = p.mask;
  // Causal: the last query blocks see the most keys; launching them first (FA2's order)
  // leaves the short blocks for the tail wave. Order only: every block is still computed.
  const int m_block = mk.causal ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
  const int h = blockIdx.y, b = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int Sq = static_cast<int>(sh.Sq), Sk = static_cast<int>(sh.Sk);
  const int D = static_cast<int>(sh.D), Dv = static_cast<int>(sh.Dv);
  const int hk = h / static_cast<int>(sh.Hq / sh.Hk);
  const int m0 = m_block * kBlockM;
  const int rows_valid = min(kBlockM, Sq - m0);

  const Elem* gq = static_cast<const Elem*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1] +
                   static_cast<int64_t>(m0) * p.q_stride[2];
  const Elem* gk = static_cast<const Elem*>(p.k) + b * p.k_stride[0] + hk * p.k_stride[1];
  const Elem* gv = static_cast<const Elem*>(p.v) + b * p.v_stride[0] + hk * p.v_stride[1];
  const void* mask_bh = mask_slice(mk, b, h);
  const bool has_mask = mk.kind != MaskKind::kNone;
  const bool has_doc = has_docs(mk);
  const bool dropout = p.dropout.p > 0.f;
  const bool pair_rng = dropout_pair_ok(mk);
  const bool softcap = p.softcap > 0.0;

  // This thread's two accumulator rows: r and r + 8 of the warp's 16.
  const int r_loc = warp * 16 + lane / 4;
  bool row_ok[2];
#pragma unroll
  for (int t = 0; t < 2; ++t) row_ok[t] = m0 + r_loc + 8 * t < Sq;
  // The query block's position and document spans, read at every key tile's
  // classification. They live in sQ's row padding (the kSmemPad columns past kHD, which
  // load_tile never writes and ldmatrix never reads), not in registers: with them, the
  // rows' positions and documents held across the loop, ptxas (CUDA 13.0) reported 253
  // registers at hd128 (232 before the band) and spills at hd192 (sm_80, 60 bytes) and
  // hd256 (sm_90, 16 bytes). Each warp keeps its own copy in the padding of its first two
  // rows, so no CTA barrier orders the write and the reads.
  const bool has_rule = has_visibility_rule(mk);
  Span* q_span_pad = reinterpret_cast<Span*>(sQ + warp * 16 * kS + kHD);         // 16 B
  Span* q_doc_pad = reinterpret_cast<Span*>(sQ + (warp * 16 + 1) * kS + kHD);     // 16 B
  static_assert(kSmemPad * sizeof(Elem) >= sizeof(Span), "a Span fits one row's padding");
  if (has_rule) {
    const BlockSpans qs = block_spans(mk.q_pos, mk.q_offset, mk.q_doc, m0, rows_valid, lane);
    if (lane == 0) {
      *q_span_pad = qs.pos;
      *q_doc_pad = qs.doc;
    }
    __syncwarp();
  }

  const int n_blocks = ceil_div(Sk, kBlockN);
  const bool skip_ok = visibility_skip_ok(mk);
  // The status of key tile n (tile_status); every warp evaluates it identically (its own
  // copy of the query spans, no CTA sync), and only when a band or documents exist. The
  // tile's spans come from k_spans when launch.cu computed them once for the call (a
  // position map or documents: block_spans.cu), else from block_spans.
  auto kind_of = [&](int n) -> TileKind {
    if (!has_rule) return TileKind::kFull;
    return tile_status(mk, skip_ok, BlockSpans{*q_span_pad, *q_doc_pad},
                       spans_of_block(k_spans, mk.k_pos, mk.k_offset, mk.k_doc, n, kBlockN, Sk,
                                      lane));
  };
  // The first tile >= n that is not skipped (n_blocks if none), and its status.
  auto next_active = [&](int n, TileKind& kind) -> int {
    for (; n < n_blocks; ++n) {
      kind = kind_of(n);
      if (kind != TileKind::kSkip) break;
    }
    return n;
  };
  auto load_kv = [&](int n, int stage) {
    const int rows = min(kBlockN, Sk - n * kBlockN);
    load_tile<kBlockN, kHD, kNThreads>(sK + stage * kBlockN * kS, kS,
                                       gk + static_cast<int64_t>(n) * kBlockN * p.k_stride[2],
                                       p.k_stride[2], rows, D);
    load_tile<kBlockN, kHD, kNThreads>(sV + stage * kBlockN * kS, kS,
                                       gv + static_cast<int64_t>(n) * kBlockN * p.v_stride[2],
                                       p.v_stride[2], rows, Dv);
  };

  // Pipeline prologue: group 0 = Q, group 1 = the first active K/V tile.
  load_tile<kBlockM, kHD, kNThreads>(sQ, kS, gq, p.q_stride[2], rows_valid, D);
  cp_async_commit();
  TileKind kind = TileKind::kFull;
  int n = next_active(0, kind);
  if (n < n_blocks) load_kv(n, 0);
  cp_async_commit();

  float o[kOT][4];
#pragma unroll
  for (int ot = 0; ot < kOT; ++ot)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[ot][e] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY};  // running row max (natural units)
  float l_run[2] = {0.f, 0.f};              // this thread's part of the row sum
  const float scale = static_cast<float>(p.scale);
  int stage = 0;

  while (n < n_blocks) {
    // Prefetch the next active tile into the other stage (read by the previous
    // iteration, which ended with __syncthreads), then wait for this one.
    TileKind kind_next = TileKind::kFull;
    const int n_next = next_active(n + 1, kind_next);
    if (n_next < n_blocks) load_kv(n_next, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const Elem* cK = sK + stage * kBlockN * kS;
    const Elem* cV = sV + stage * kBlockN * kS;

    // S = Q K^T for the warp's 16 rows x kBlockN keys.
    float s[kNT][4];
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kHD / 16; ++kk) {
      uint32_t a[4];
      load_a(a, sQ, kS, warp * 16, kk * 16, lane);
#pragma unroll
      for (int nt2 = 0; nt2 < kNT / 2; ++nt2) {
        uint32_t bb[4];
        load_b2(bb, cK, kS, nt2 * 16, kk * 16, lane);
        Ops::mma(s[2 * nt2], a, bb[0], bb[1]);
        Ops::mma(s[2 * nt2 + 1], a, bb[2], bb[3]);
      }
    }

    // Scale; soft-cap; mask where the tile needs it; draw dropout bits.
    const int n0 = n * kBlockN;
    const int cols_valid = min(kBlockN, Sk - n0);
    const bool vis_test = kind == TileKind::kPartial;
    const bool need_mask = has_mask || cols_valid < kBlockN || vis_test;
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] *= scale;
    if (softcap) {
      // Read per tile, not held across the loop (see q_span_pad).
      const float cap = static_cast<float>(p.softcap);
      const float inv_cap = __frcp_rn(cap);
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) apply_softcap(s[nt][e], cap, inv_cap);
    }
    uint32_t keep_bits = 0xffffffffu;  // bit 4*nt + e: element s[nt][e] is kept
    if (need_mask || dropout) {  // warp-uniform (dropout_keep_pair shuffles)
      // The rows' positions are read here, per masked tile, rather than held in registers
      // across the loop (4 registers; see q_span_pad).
      int64_t qpos[2];
#pragma unroll
      for (int t = 0; t < 2; ++t) qpos[t] = row_ok[t] ? q_position(mk, m0 + r_loc + 8 * t) : 0;
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
        const int j0 = n0 + nt * 8 + 2 * (lane % 4);
        const int64_t kpos0 = j0 < Sk ? k_position(mk, j0) : 0;
        const int64_t kpos1 = j0 + 1 < Sk ? k_position(mk, j0 + 1) : 0;
        const bool read_doc = vis_test && has_doc;
        // Documents are read only on partial tiles: the queries' here too, rather than
        // two registers held across the loop.
        const int32_t kdoc0 = read_doc && j0 < Sk ? mk.k_doc[j0] : 0;
        const int32_t kdoc1 = read_doc && j0 + 1 < Sk ? mk.k_doc[j0 + 1] : 0;
        // One Philox call per lane instead of two (keys past Sk draw bits never used).
        const uint32_t pair_bits =
            dropout && pair_rng
                ? dropout_keep_pair(p.dropout, b, h, qpos[0], qpos[1],
                                    mk.k_offset + n0 + nt * 8 + 4 * ((lane % 4) >> 1), lane)
                : 0u;
#pragma unroll
        for (int t = 0; t < 2; ++t) {
          if (need_mask) {
            const int32_t qdoc = read_doc && row_ok[t] ? mk.q_doc[m0 + r_loc + 8 * t] : 0;
#pragma unroll
            for (int jj = 0; jj < 2; ++jj) {
              const int j = j0 + jj;
              float& x = s[nt][2 * t + jj];
              if (!row_ok[t] || j >= Sk) {
                x = -INFINITY;
              } else {
                x += mask_term(mk, mask_bh, m0 + r_loc + 8 * t, j, vis_test, qpos[t],
                               jj ? kpos1 : kpos0, qdoc, jj ? kdoc1 : kdoc0);
              }
            }
          }
          if (dropout && row_ok[t]) {
            bool k0, k1;
            if (pair_rng) {
              const uint32_t bits = pair_bits >> (4 * t + 2 * (lane & 1));
              k0 = bits & 1u;
              k1 = (bits >> 1) & 1u;
            } else {
              dropout_keep2(p.dropout, b, h, qpos[t], kpos0, kpos1, k0, k1);
            }
            if (!k0) keep_bits &= ~(1u << (4 * nt + 2 * t));
            if (!k1) keep_bits &= ~(1u << (4 * nt + 2 * t + 1));
          }
        }
      }
    }

    // Online softmax. Row max over the quad of lanes sharing a row (xor 1, 2).
    float mx[2] = {m_run[0], m_run[1]};
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
      mx[0] = max_nan(mx[0], max_nan(s[nt][0], s[nt][1]));
      mx[1] = max_nan(mx[1], max_nan(s[nt][2], s[nt][3]));
    }
    float m_use[2], alpha[2], rs[2] = {0.f, 0.f};
#pragma unroll
    for (int t = 0; t < 2; ++t) {
      mx[t] = max_nan(mx[t], __shfl_xor_sync(0xffffffffu, mx[t], 1));
      mx[t] = max_nan(mx[t], __shfl_xor_sync(0xffffffffu, mx[t], 2));
      // A row with no key so far keeps m = -inf; subtracting 0 instead keeps exp2 at
      // exp2(-inf) = 0 rather than NaN from (-inf) - (-inf). Only a true -inf: a NaN max
      // must reach P (and l) so the row is NaN, as in math.
      m_use[t] = mx[t] == -INFINITY ? 0.f : mx[t];
      alpha[t] = exp2f((m_run[t] - m_use[t]) * kLog2e);
      m_run[t] = mx[t];
    }
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float pr = exp2f((s[nt][e] - m_use[e / 2]) * kLog2e);
        rs[e / 2] += pr;
        s[nt][e] = (keep_bits >> (4 * nt + e)) & 1u ? pr : 0.f;
      }
#pragma unroll
    for (int t = 0; t < 2; ++t) l_run[t] = l_run[t] * alpha[t] + rs[t];
#pragma unroll
    for (int ot = 0; ot < kOT; ++ot) {
      o[ot][0] *= alpha[0];
      o[ot][1] *= alpha[0];
      o[ot][2] *= alpha[1];
      o[ot][3] *= alpha[1];
    }

    // O += P V: P's accumulator tiles (2kk, 2kk+1) form the A operand of k-step kk.
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      const uint32_t a[4] = {Ops::pack(s[2 * kk][0], s[2 * kk][1]),
                             Ops::pack(s[2 * kk][2], s[2 * kk][3]),
                             Ops::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                             Ops::pack(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int ot2 = 0; ot2 < kOT / 2; ++ot2) {
        uint32_t bb[4];
        load_b2_trans(bb, cV, kS, ot2 * 16, kk * 16, lane);
        Ops::mma(o[2 * ot2], a, bb[0], bb[1]);
        Ops::mma(o[2 * ot2 + 1], a, bb[2], bb[3]);
      }
    }
    __syncthreads();  // every warp is done with this stage before it is refilled
    stage ^= 1;
    n = n_next;
    kind = kind_next;
  }
  cp_async_wait<0>();  // no copy may still target smem when the CTA exits

  // Epilogue: O / (l (1-p)), lse = m + log l; rows with l == 0 (no key) -> 0 and -inf.
  // l == 0 rather than l > 0: a NaN l must give a NaN row and lse; and O * 0 keeps the
  // NaN that math's 0 * V gives a no-key row when V holds NaN.
  const float keep_scale = dropout ? 1.f / (1.f - static_cast<float>(p.dropout.p)) : 1.f;
  const int64_t row_base = (static_cast<int64_t>(b) * sh.Hq + h) * sh.Sq;
#pragma unroll
  for (int t = 0; t < 2; ++t) {
    float l = l_run[t];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const int i = m0 + r_loc + 8 * t;
    if (i >= Sq) continue;
    const float inv = l == 0.f ? 0.f : keep_scale / l;
    const int64_t orow = (row_base + i) * Dv;
#pragma unroll
    for (int ot = 0; ot < kOT; ++ot) {
      const int c = ot * 8 + 2 * (lane % 4);  // even: columns c, c + 1
      if (c >= Dv) continue;
      const float v0 = o[ot][2 * t] * inv, v1 = o[ot][2 * t + 1] * inv;
      if (Dv % 2 == 0) {
        // Even Dv: (orow + c) is even, so the pair is one aligned 4-byte (8-byte) store.
        if (out_fp32) {
          *reinterpret_cast<float2*>(static_cast<float*>(p.out) + orow + c) = make_float2(v0, v1);
        } else {
          *reinterpret_cast<uint32_t*>(static_cast<Elem*>(p.out) + orow + c) = Ops::pack(v0, v1);
        }
      } else {
        if (out_fp32) static_cast<float*>(p.out)[orow + c] = v0;
        else static_cast<Elem*>(p.out)[orow + c] = Ops::from_float(v0);
        if (c + 1 < Dv) {
          if (out_fp32) static_cast<float*>(p.out)[orow + c + 1] = v1;
          else static_cast<Elem*>(p.out)[orow + c + 1] = Ops::from_float(v1);
        }
      }
    }
    if (lane % 4 == 0) {
      // lse is float64 for every input dtype (attn_params.h), m + log l computed in
      // double: in float, m = -1e9 (a row masked by -1e9) absorbs log l < 32.
      double* lse = static_cast<double*>(p.lse);
      lse[row_base + i] = l == 0.f ? -static_cast<double>(INFINITY)
                                   : static_cast<double>(m_run[t]) + log(static_cast<double>(l));
    }
  }
}

// Host launcher, instantiated once per (dtype, head dim, tile variant) in csrc/cuda/inst/.
template <typename Elem, int kHeadDim, int kVariant>
cudaError_t run_fwd_tc(const AttnFwdParams& p, const Span* k_spans, bool out_fp32,
                       cudaStream_t stream) {
  using Tr = typename FwdConfig<kHeadDim, kVariant>::T;
  const size_t smem = static_cast<size_t>(Tr::kSmemElems) * sizeof(Elem);
  auto kernel = fwd_tc_kernel<Elem, Tr>;
  // Above 48 KB a kernel must opt in to dynamic smem (set once per process per kernel).
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  const dim3 grid(ceil_div(p.shape.Sq, Tr::kBlockM), static_cast<unsigned>(p.shape.Hq),
                  static_cast<unsigned>(p.shape.B));
  kernel<<<grid, Tr::kNThreads, smem, stream>>>(p, k_spans, out_fp32);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace ring_attn

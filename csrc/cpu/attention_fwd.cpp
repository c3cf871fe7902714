// CPU forward of ring_attn's local attention: the flash algorithm (online softmax over
// key blocks), in the manner of ATen's CPU flash kernel.
//
// One work item per (batch, query head, query block), spread by at::parallel_for. For
// each key block the item computes S = scale * Q K^T, soft-caps it (S = cap *
// tanh(S / cap) when softcap > 0), adds the mask / band / documents to S,
// folds the block into running row maxima m and sums l (O is rescaled by
// exp(m_old - m_new)), drops elements of P for dropout, and accumulates O += P V.
// At the end out = O / l and lse = m + log l; a row that saw no key keeps l = 0 and gets
// out = 0, lse = -inf. Causal tiles whose every key lies after every query are skipped,
// decided from the min/max position of each block, so zigzag and striped position maps
// skip as much as contiguous ones do.
//
// Non-finite inputs follow torch's math backend (attn_params.h) at no cost to the finite
// path: the row max propagates NaN (a NaN or +inf score, or NaN + -inf at a masked one,
// makes m, the rescale, l and so the row and its lse NaN); the "no key yet" branch fires
// only on a true -inf max; P V runs over every tile that is not skipped, so 0 * NaN in V
// poisons its column as in math; and no tile is skipped when any input is non-finite.
//
// Accumulation is float32 (float64 for float64 inputs), and so is a float mask; lse is
// written in float64 for every dtype (attn_params.h): float64 stays float64-accurate end
// to end, and a row saturated by a huge finite mask keeps its log(n). K^T (and V, when it
// is not float32 rows already) is packed once per (batch, KV head) in the accumulation
// type, so both products run in gemm_bcast (gemm.h): our AVX-512 or AVX2 micro-kernel
// (float), the BLAS (double).
// bfloat16 on CPUs with AVX512-BF16 packs K^T and V as bf16 pairs instead and runs both
// products on vdpbf16ps (gemm_bf16_avx512.cpp), P rounded to bf16 for P V as torch's own
// reduced-precision kernels do. Measured on the 2-core EPYC, S=4096, D=128, one thread,
// CPU time: 316 GFLOP/s against 192 on the float32 path (torch's kernel: 82).
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

struct FwdBlocks {
  int64_t q, k;
};

// Block sizes, clipped to the lengths. Query block 64 x key block 512: the score tile
// (128 KiB in float32) stays in the 1 MiB L2 and each Q row is reused over 512 keys.
// Measured on the 2-core AMD EPYC (AVX-512), forward S=4096, H=2, D=64, float32, one
// thread, CPU time (the machine was shared, so wall time was unusable), GFLOP/s:
//   q x k = 32x512: 134, 64x256: 131, 64x512: 142, 64x1024: 133, 128x512: 141,
//           128x256: 122, 256x512: 135;  D=128: 64x512: 144, 128x512: 151, 64x768: 136.
// The spread is within the +-10% noise of that machine; 64 x 512 is never worse than the
// best by more than the noise and keeps more work items for short sequences.
//
// With documents (cu_seqlens) the key block is 128: a 512-key tile straddling document
// starts computes keys no query of the tile sees, and packed shards hold pieces of
// L / 2P tokens (~290 in the uniform mix below), shorter than 512. Measured with the
// kernel calls of benchmarks/bench_varlen.py (S=16384, H=8, D=64, float32, causal, one
// thread, thread CPU time, key block 512 / 256 / 128 in one process): varlen_attention
// uniform 893 / 726 / 674 ms, long-tailed 1220 / 1040 / 1012, 1-token documents
// 341 / 216 / 157, one long document 990 / 918 / 886; the packed ring's slowest rank at
// P = 4: uniform 443 / 346 / 296 ms, long-tailed 581 / 447 / 380, 1-token 275 / 161 / 141,
// long document 482 / 348 / 315.
//
// bfloat16 on vdpbf16ps with a band (causal, window): key block 256. The tile across the
// diagonal is computed in full and masked, so a smaller key block wastes less. Forward
// S=4096, H=2, one thread, CPU time, shared host, GFLOP/s, two rounds, key block 512 /
// 256: D=64 causal 121, 119 / 133, 135; D=128 causal 144, 144 / 161, 161; without the
// band 512 stays (D=64: 164, 162 / 159, 160; D=128: 181, 178 / 183, 183).
FwdBlocks fwd_blocks(int64_t Sq, int64_t Sk, bool docs, bool bf16_band) {
  FwdBlocks bs{64, docs ? 128 : bf16_band ? 256 : 512};
  if (Sq < bs.q) bs.q = std::max<int64_t>(Sq, 1);
  if (Sk < bs.k) bs.k = std::max<int64_t>(Sk, 1);
  return bs;
}

// kDot: bfloat16 inputs with AVX512-BF16 -- both products take bf16 pairs (K^T and V
// packed in pairs along their reduction, P rounded to bf16 like torch's own reduced-
// precision kernels do) with float32 accumulation; softmax statistics stay float32.
template <typename scalar_t, typename out_t, bool kDot>
void fwd_impl(const AttnFwdParams& p) {
  using acc = acc_t<scalar_t>;
  const auto& s = p.shape;
  const int64_t B = s.B, Hq = s.Hq, Hk = s.Hk, Sq = s.Sq, Sk = s.Sk, D = s.D, Dv = s.Dv;
  const int64_t group = Hk > 0 ? Hq / Hk : 1;
  if (B * Hq * Sq == 0) return;
  const FwdBlocks bs = fwd_blocks(Sq, Sk, p.mask.q_doc != nullptr, kDot && has_band(p.mask));
  const int64_t QB = bs.q, KB = bs.k;
  const int64_t nqb = ceil_div(Sq, QB), nkb = ceil_div(Sk, KB);

  BlockPositions qpos, kpos;
  qpos.init(p.mask.q_pos, p.mask.q_offset, p.mask.q_doc, Sq, QB);
  kpos.init(p.mask.k_pos, p.mask.k_offset, p.mask.k_doc, Sk, KB);

  const scalar_t* q = static_cast<const scalar_t*>(p.q);
  const scalar_t* k = static_cast<const scalar_t*>(p.k);
  const scalar_t* v = static_cast<const scalar_t*>(p.v);
  out_t* out = static_cast<out_t*>(p.out);
  double* lse = static_cast<double*>(p.lse);  // float64 for every dtype (attn_params.h)
  const acc scale = static_cast<acc>(p.scale);
  const acc softcap = static_cast<acc>(p.softcap);  // 0: off
  const bool has_dropout = p.dropout.p > 0.0;
  const bool direct_q = direct_rows<scalar_t, acc>(p.q_stride[2], D);
  const bool direct_v = direct_rows<scalar_t, acc>(p.v_stride[2], Dv);
  const bool may_skip = skip_allowed(p.mask);

  // K^T of a (batch, KV head) pair, packed once and shared by all the query blocks and
  // query heads that read it: [nkb][D][KB]. V in the accumulation type when it cannot be
  // read in place: [Sk][Dv]. O(S) work against O(S^2) use. kDot instead packs bf16 pairs:
  // K^T as [nkb][D2][KB] words (d = 2*d2, 2*d2+1) and V as [Sk2][Dv] words (keys 2*j2,
  // 2*j2+1), odd ends padded with 0.
  // Where the packs live: with at least as many (batch, KV head) pairs as threads, one slot
  // per thread, filled when the thread's items (contiguous in (batch, head, query block)
  // order, at::parallel_for's static split) reach the next pair; otherwise one slot per
  // pair, packed up front in parallel over key blocks. The per-thread slots keep the
  // call's memory at out + lse + threads/(B * Hk) of a K-sized pack: the ring's forward
  // measured one extra float32 out-sized buffer per call (benchmarks/ring_memory.py), the
  // all-pairs pack (K^T in float32 for float32, K^T + V in bf16 pairs for bfloat16).
  const int64_t nthreads = at::get_num_threads();
  const bool pack_per_thread = B * Hk >= nthreads;
  const int64_t slots = pack_per_thread ? nthreads : B * Hk;
  const int64_t D2 = (D + 1) / 2, Sk2 = (Sk + 1) / 2;
  std::vector<acc> kt_pack(kDot ? 0 : static_cast<size_t>(slots * nkb * D * KB));
  std::vector<acc> v_pack(direct_v || kDot ? 0 : static_cast<size_t>(slots * Sk * Dv));
  std::vector<uint32_t> kt2(kDot ? static_cast<size_t>(slots * nkb * D2 * KB) : 0);
  std::vector<uint32_t> v2(kDot ? static_cast<size_t>(slots * Sk2 * Dv) : 0);
  // Key block kb of pair bh into slot `slot`.
  auto pack = [&](int64_t bh, int64_t kb, int64_t slot) {
    const int64_t b = bh / Hk, hk = bh % Hk;
    const int64_t j0 = kb * KB, n = std::min(KB, Sk - j0);
    const scalar_t* kh = k + b * p.k_stride[0] + hk * p.k_stride[1];
    const scalar_t* vh = v + b * p.v_stride[0] + hk * p.v_stride[1];
    if constexpr (kDot) {
      pack_pairs_t(kh, p.k_stride[2], j0, n, D, kt2.data() + (slot * nkb + kb) * D2 * KB, KB);
      pack_pairs_interleaved(vh, p.v_stride[2], j0, n, Dv, v2.data() + (slot * Sk2 + j0 / 2) * Dv);
    } else {
      load_block_t(kh, p.k_stride[2], j0, n, D, kt_pack.data() + (slot * nkb + kb) * D * KB, KB);
      if (!direct_v) {
        load_block(vh, p.v_stride[2], j0, n, Dv, v_pack.data() + (slot * Sk + j0) * Dv);
      }
    }
  };
  if (!pack_per_thread) {
    at::parallel_for(0, B * Hk * nkb, 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) pack(item / nkb, item % nkb, item / nkb);
    });
  }

  // Per-thread scratch, allocated once: the Q block (when it cannot be read in place),
  // the score tile, the output accumulator and the row statistics.
  // (kDot: the Q block and the bf16 P tile, as bf16 pairs, in the first QB*D + QB*KB/2.)
  const int64_t KB2 = (KB + 1) / 2;
  const int64_t per_thread = QB * D + QB * KB + QB * Dv + 2 * QB + (kDot ? QB * KB2 : 0);
  std::vector<acc> scratch(static_cast<size_t>(per_thread * nthreads));

  at::parallel_for(0, B * Hq * nqb, 1, [&](int64_t begin, int64_t end) {
    acc* qbuf = scratch.data() + at::get_thread_num() * per_thread;
    acc* S = qbuf + QB * D;
    acc* O = S + QB * KB;
    acc* mrow = O + QB * Dv;
    acc* lrow = mrow + QB;
    uint32_t* q2 = reinterpret_cast<uint32_t*>(qbuf);  // kDot: [QB][D2] pairs (fits in QB*D)
    uint32_t* p2 = reinterpret_cast<uint32_t*>(lrow + QB);  // kDot: [QB][KB2] pairs
    constexpr acc kNegInf = -std::numeric_limits<acc>::infinity();
    int64_t packed = -1;  // the pair in this thread's slot (pack_per_thread)

    for (int64_t item = begin; item < end; ++item) {
      const int64_t qb = item % nqb;
      const int64_t h = (item / nqb) % Hq;
      const int64_t b = item / (nqb * Hq);
      const int64_t bhk = b * Hk + h / group;
      const int64_t slot = pack_per_thread ? at::get_thread_num() : bhk;
      if (pack_per_thread && packed != bhk) {
        for (int64_t kb = 0; kb < nkb; ++kb) pack(bhk, kb, slot);
        packed = bhk;
      }
      const int64_t i0 = qb * QB, m = std::min(QB, Sq - i0);

      const scalar_t* qh = q + b * p.q_stride[0] + h * p.q_stride[1];
      const acc* Q = qbuf;
      int64_t ldq = D;
      const uint32_t* Q2 = q2;
      int64_t ldq2 = D2;
      if constexpr (kDot) {
        // Pairs straight from q when rows hold whole pairs; else repack (padding odd D).
        const bool in_place = D % 2 == 0 && p.q_stride[2] % 2 == 0 &&
                              reinterpret_cast<uintptr_t>(qh) % 4 == 0;
        if (in_place) {
          Q2 = reinterpret_cast<const uint32_t*>(qh + i0 * p.q_stride[2]);
          ldq2 = p.q_stride[2] / 2;
        } else {
          pack_pairs_rows(qh, p.q_stride[2], i0, m, D, q2);
        }
      } else if (direct_q) {
        Q = reinterpret_cast<const acc*>(qh + i0 * p.q_stride[2]);
        ldq = p.q_stride[2];
      } else {
        load_block(qh, p.q_stride[2], i0, m, D, qbuf);
      }
      const acc* Vh;
      int64_t ldv;
      if (kDot) {
        Vh = nullptr;
        ldv = 0;
      } else if (direct_v) {
        Vh = reinterpret_cast<const acc*>(v + b * p.v_stride[0] + (h / group) * p.v_stride[1]);
        ldv = p.v_stride[2];
      } else {
        Vh = v_pack.data() + slot * Sk * Dv;
        ldv = Dv;
      }
      std::fill(O, O + m * Dv, acc(0));
      std::fill(mrow, mrow + m, kNegInf);
      std::fill(lrow, lrow + m, acc(0));

      for (int64_t kb = 0; kb < nkb; ++kb) {
        const TileKind kind = tile_kind(p.mask, qpos, qb, kpos, kb, may_skip);
        if (kind == TileKind::kSkip) continue;
        const int64_t j0 = kb * KB, n = std::min(KB, Sk - j0);
        if constexpr (kDot) {
          gemm_bcast_bf16_avx512(m, n, D2, scale, Q2, ldq2, 1,
                                 kt2.data() + (slot * nkb + kb) * D2 * KB, KB, 0.f, S, n);
        } else {
          gemm_bcast(m, n, D, scale, Q, ldq, 1, kt_pack.data() + (slot * nkb + kb) * D * KB, KB,
                     acc(0), S, n, /*split_k=*/n < 16);
        }
        if (softcap > 0) softcap_tile<acc>(S, nullptr, n, m, n, softcap);
        mask_tile(S, n, m, n, p.mask, b, h, i0, j0, qpos, kpos, kind == TileKind::kPartial);

        for (int64_t r = 0; r < m; ++r) {
          acc* row = S + r * n;
          const acc m_new = max_nan(mrow[r], row_max(row, n));
          if (m_new == kNegInf) {  // no key of this row survived so far
            std::fill(row, row + n, acc(0));
            continue;
          }
          const acc corr = std::exp(mrow[r] - m_new);  // 0 when mrow was -inf; NaN stays
          lrow[r] = lrow[r] * corr + exp_row_sum(row, n, m_new);
          if (corr != acc(1)) scale_row(O + r * Dv, Dv, corr);
          mrow[r] = m_new;
        }
        if (has_dropout) {
          dropout_tile<acc>(S, nullptr, nullptr, n, m, n, p.dropout, b, h, i0, j0,
                            qpos.pos.data(), kpos.pos.data());
        }
        if constexpr (kDot) {
          const int64_t n2 = (n + 1) / 2;
          to_bf16_rows_avx512(S, m, n, n, reinterpret_cast<uint16_t*>(p2), 2 * n2);
          gemm_bcast_bf16_avx512(m, Dv, n2, 1.f, p2, n2, 1, v2.data() + (slot * Sk2 + j0 / 2) * Dv,
                                 Dv, 1.f, O, Dv);
        } else {
          gemm_bcast(m, Dv, n, acc(1), S, n, 1, Vh + j0 * ldv, ldv, acc(1), O, Dv);
        }
      }

      out_t* oh = out + ((b * Hq + h) * Sq + i0) * Dv;
      double* lh = lse + (b * Hq + h) * Sq + i0;
      for (int64_t r = 0; r < m; ++r) {
        // l == 0: no key survived, out = O * 0 (NaN where 0 * NaN in V made O NaN, as in
        // math) and lse = -inf. A NaN l (a NaN or +inf score) makes out and lse NaN.
        const acc l = lrow[r];
        const acc inv = l == acc(0) ? acc(0) : acc(1) / l;
        for (int64_t c = 0; c < Dv; ++c) oh[r * Dv + c] = static_cast<out_t>(O[r * Dv + c] * inv);
        // In double: in float32, m + log(l) loses log(l) when |m| >> 1e7 (attn_params.h).
        lh[r] = l == acc(0) ? -std::numeric_limits<double>::infinity()
                            : double(mrow[r]) + std::log(double(l));
      }
    }
  });
}

}  // namespace

template <typename scalar_t, typename out_t>
void attn_fwd_kernel(const AttnFwdParams& p) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    if (use_avx512_bf16()) return fwd_impl<scalar_t, out_t, true>(p);
  }
  fwd_impl<scalar_t, out_t, false>(p);
}

template void attn_fwd_kernel<float, float>(const AttnFwdParams&);
template void attn_fwd_kernel<double, double>(const AttnFwdParams&);
template void attn_fwd_kernel<double, float>(const AttnFwdParams&);
template void attn_fwd_kernel<c10::BFloat16, c10::BFloat16>(const AttnFwdParams&);
template void attn_fwd_kernel<c10::BFloat16, float>(const AttnFwdParams&);
template void attn_fwd_kernel<c10::Half, c10::Half>(const AttnFwdParams&);
template void attn_fwd_kernel<c10::Half, float>(const AttnFwdParams&);

}  // namespace ring_attn::cpu

// Tile shapes of the tensor-core kernels, one specialisation per instantiated head dim.
//
// None of these sizes was measured: this session had no GPU. They start from
// FlashAttention-2's published sm80 choices for each head dim (flash_fwd_launch_template.h /
// flash_bwd_launch_template.h) adapted to our warp layout, and are to be tuned on an
// A100/H100 (benchmarks/). The constraints they must respect are checked by static_asserts.
//
// Warp layout. Forward: every warp owns 16 query rows (one m16 mma row block) and all
// kBlockN keys of the tile, so softmax statistics never leave a warp; kBlockM = 16 warps.
// FA2 gives each of 4 warps 32 rows (kBlockM 128); we reach kBlockM 128 with 8 warps of 16
// rows, which keeps one accumulator row block per thread (half the O registers of FA2's
// layout, the price being twice the K/V ldmatrix traffic per mma: the first thing to tune).
// Backward: see bwd_kernel.cuh (three warp layouts over one block, joined through smem).
#pragma once
#include "cuda/tile_config.h"

namespace ring_attn {
namespace cuda {

template <int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_>
struct FwdTraits {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kNThreads = kNWarps * 32;
  static constexpr int kStride = kHeadDim + kSmemPad;  // smem row stride, elements
  // sQ [kBlockM][kStride], then sK and sV, two stages each [kBlockN][kStride].
  static constexpr int kSmemElems = (kBlockM + 4 * kBlockN) * kStride;
  static_assert(kBlockM == 16 * kNWarps, "forward: each warp owns 16 query rows");
  static_assert(kBlockN % 16 == 0 && kHeadDim % 16 == 0, "mma k16 / paired n8 tiles");
};

// The tile of each head dim comes from tile_config.h (variant 0: preferred; variant 1: the
// smaller tile for GPUs with 99 KB of smem per block).
// hd64:  FA2 uses 128 x 128 with 4 warps. We take 128 x 64 (8 warps): a 64-key tile halves
//        the S registers (32 per thread); 54 KB of smem.
// hd96:  FA2 uses 128 x 64 with 4 warps; same tile here with 8 warps (78 KB smem).
// hd128: FA2 uses 128 x 64 (non-causal 128 x 32 on some GPUs) with 4 warps; 128 x 64 with
//        8 warps here (102 KB smem), 128 x 32 (68 KB) under 99 KB.
// hd192: FA2 uses 128 x 64 with 8 warps on sm80; same here (150 KB), 128 x 16 (75 KB)
//        under 99 KB.
// hd256: FA2 uses 128 x 64 with 8 warps on sm80; O alone is 128 fp32 registers per thread
//        at hd256, so we take kBlockN 32 to bound S and smem (132 KB, fits the 163 KB sm80
//        limit with double-buffered K/V), 128 x 16 (99 KB) under 99 KB.
// Occupancy is register-limited to one 8-warp CTA per SM for every configuration, not set
// by smem: ptxas -v (CUDA 13.0, bf16 and fp16 alike, 0 bytes spilled) reports, sm_80 / sm_90,
// 180 / 179 registers at hd64, 212 / 207 at hd96, 226 / 229 at hd128, 254 / 247 at hd192,
// 250 / 242 at hd256, and for the 99 KB tiles 186 / 184 (hd128), 204 / 212 (hd192),
// 238 / 238 (hd256), with the band, documents, softcap, the precomputed key spans
// (block_spans.cu) and the narrow copies of load_tile (fwd_kernel.cuh's q_span_pad says
// how they stayed under 255). 256 threads x 180 registers (allocated in 8s: 184) =
// 47,104 of an SM's 65,536, so a second CTA never fits, even where smem would allow it
// (hd64: 54 KB).
// The compute_90 PTX assembles for sm_100 and sm_120 with 176-252 registers, 0 spilled
// (the backward: up to 255 at hd256, 0 spilled).
template <int kHeadDim, int kVariant>
struct FwdConfig {
  static constexpr TileConfig kTile = fwd_tiles(kHeadDim).c[kVariant];
  static_assert(kVariant < fwd_tiles(kHeadDim).n, "no such forward tile variant");
  static_assert(kTile.stages == 2, "the forward's K/V ring has two stages");
  using T = FwdTraits<kHeadDim, kTile.block_m, kTile.block_n, kTile.n_warps>;
  static_assert(T::kSmemElems * 2 == fwd_smem_bytes(kHeadDim, kTile, 2),
                "tile_config.h's smem formula must match the kernel's layout");
};

template <int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_, int kStages_>
struct BwdTraits {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;   // queries per inner step
  static constexpr int kBlockN = kBlockN_;   // keys per CTA (the dK/dV rows it owns)
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kNThreads = kNWarps * 32;
  static constexpr int kStages = kStages_;   // query-block buffers (2: next one prefetched)
  static constexpr int kStride = kHeadDim + kSmemPad;   // sQ, sdO, sK, sV rows
  static constexpr int kPStride = kBlockN + kSmemPad;   // sP, sdS rows ([query][key])
  // Phase 1 (S = Q K^T, dP = dO V^T): warps tile [kBlockM x kBlockN] as
  // (kBlockM/16) x kWarpsN1, each 16 queries x kN1 keys.
  static constexpr int kWarpsM1 = kBlockM / 16;
  static constexpr int kWarpsN1 = kNWarps / kWarpsM1;
  static constexpr int kN1 = kBlockN / kWarpsN1;
  // Phase 2 (dV += P^T dO, dK += dS^T Q): warps tile [kBlockN x kHeadDim] as
  // (kBlockN/16) x kWarpsD2, each 16 keys x kD2 columns (accumulated over all queries).
  static constexpr int kWarpsN2 = kBlockN / 16;
  static constexpr int kWarpsD2 = kNWarps / kWarpsN2;
  static constexpr int kD2 = kHeadDim / kWarpsD2;
  // Phase 3 (dQ += dS K): warps tile [kBlockM x kHeadDim] as (kBlockM/16) x kWarpsD3.
  static constexpr int kWarpsM3 = kBlockM / 16;
  static constexpr int kWarpsD3 = kNWarps / kWarpsM3;
  static constexpr int kD3 = kHeadDim / kWarpsD3;
  // Bytes (bwd_kernel.cuh's layout): per stage sQ, sdO [kBlockM][kStride] and the rows'
  // double lse and float delta; sK, sV [kBlockN][kStride]; sP, sdS [kBlockM][kPStride];
  // then float sLseHi, sLseLo [kBlockM] (the float64 lse split in two floats, split_lse
  // in utils.cuh). Every array before the lse starts at a multiple of 16 bytes.
  static constexpr int kSmemElems =
      (2 * kStages * kBlockM + 2 * kBlockN) * kStride + 2 * kBlockM * kPStride;
  static constexpr int kSmemBytes = kSmemElems * 2 + kStages * kBlockM * (8 + 4) + 2 * kBlockM * 4;
  static_assert(kStages == 1 || kStages == 2, "one or two query-block stages");
  static_assert(kNThreads >= kBlockM, "thread r copies and splits row r's lse");
  static_assert(kWarpsM1 * kWarpsN1 == kNWarps && kN1 % 16 == 0, "phase-1 warp layout");
  static_assert(kWarpsN2 * kWarpsD2 == kNWarps && kD2 % 16 == 0, "phase-2 warp layout");
  static_assert(kWarpsM3 * kWarpsD3 == kNWarps && kD3 % 16 == 0, "phase-3 warp layout");
  static_assert(kBlockM % 16 == 0 && kBlockN % 16 == 0, "mma tiles");
};

// Every head dim: 64 queries x 64 keys with 8 warps, the query block (Q, dO, lse, delta)
// double-buffered (variant 0). FA2's sm80 backward (flash_bwd_launch_template.h) uses 8
// warps with 128 x 128 at hd64, 64 x 128 at hd96 and hd128 (64 x 64 where the GPU has
// < 144 KB smem per block) and 64 x 64 at hd256, double-buffering Q where it fits. Our
// 64-key CTA gives each warp 16 keys x kHeadDim/2 columns of dK and dV: 2 x 32 fp32
// registers at hd128, 2 x 64 at hd256, which leaves room for the transient S/dP (16 + 16)
// and dQ (<= 32) fragments. Smem with two stages (tile_config.h has the bytes): 74 KB at
// hd64, 98 KB at hd96, 122 KB at hd128, 170 KB at hd192, 218 KB at hd256 (sm_90's 227 KB
// takes all; sm_80's 163 KB up to hd128; 99 KB GPUs hd64 and hd96). Where two do not fit,
// one stage of the same tile (variant 1: 87.3 KB at hd128, 119.3 KB at hd192, 151.3 KB at
// hd256); under 99 KB at hd192 / hd256 the small tiles (variant 2): 64 x 32 with 8 warps
// (86.3 KB) and 32 x 32 with 4 warps (71.6 KB; an 8-warp layout needs at least 64 x 32,
// 110.3 KB). A 128-key CTA (FA2's choice) is the next step to try on a GPU.
// ptxas -v (CUDA 13.0, bf16 and fp16 alike), sm_80 / sm_90, two stages: 178 / 180
// registers at hd64, 210 / 216 at hd96, 239 / 241 at hd128, 233 / 235 at hd192, 255 / 255
// at hd256; one stage 238 / 241 (hd128), 240 / 242 (hd192), 255 / 255 (hd256); small tiles
// 166 / 166 (hd192) and 237 / 238 (hd256, 4 warps). 0 bytes spilled except the one-stage
// hd256 kernel (A100's hd256): 4 bytes, the group's head bound h_end, stored once before
// the loop and reloaded once per query head at the head change (SASS: one LDL behind the
// branch taken when a head's last block is done), never in the mma phases. Before double
// buffering the backward used 156 / 176 (hd64) to 252 / 247 (hd256); the loop over (head,
// query block) items costs 10-20 registers, which changes no occupancy: one 8-warp CTA per
// SM everywhere (register-limited; two would need <= 128 registers), and one 4-warp CTA
// for hd256 under 99 KB (smem-limited: 2 x 73,344 B > 100 KB per SM).
// __launch_bounds__(kNThreads, 1): without the minimum of 1 CTA per SM, ptxas capped the
// hd192 64 x 32 tile at 128 registers (aiming at 2 CTAs) and spilled 66 bytes.
template <int kHeadDim, int kVariant>
struct BwdConfig {
  static constexpr TileConfig kTile = bwd_tiles(kHeadDim).c[kVariant];
  static_assert(kVariant < bwd_tiles(kHeadDim).n, "no such backward tile variant");
  using T = BwdTraits<kHeadDim, kTile.block_m, kTile.block_n, kTile.n_warps, kTile.stages>;
  static_assert(T::kSmemBytes == bwd_smem_bytes(kHeadDim, kTile, 2),
                "tile_config.h's smem formula must match the kernel's layout");
};

}  // namespace cuda
}  // namespace ring_attn

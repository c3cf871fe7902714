// Tile configurations of the tensor-core kernels and the rule that picks one for a GPU.
//
// Plain constexpr C++ (no CUDA, no torch): kernel_traits.h builds its traits from these
// tables, launch.cu picks a configuration with select_tile() from the GPU's
// sharedMemPerBlockOptin, and csrc/ring_attn.cpp exposes the same function as the op
// ring_attn::_cuda_tile_config so the CPU test suite checks the choice for every GPU's
// limit (tests/test_cuda_tile_config.py) without a GPU.
//
// Shared memory per block that a kernel may opt in to (cudaDeviceProp::
// sharedMemPerBlockOptin): sm_80/87 166,912 B (163 KB); sm_86/89/120/121 101,376 B (99 KB);
// sm_90/100/103 232,448 B (227 KB). Every head dim has a preferred tile (variant 0, the
// H100 choice) and, where that exceeds a smaller GPU's limit, fallbacks (variants 1, 2):
// the backward's single-stage tile (*_1stage.cu) for A100 where two stages do not fit,
// and a smaller tile (*_small.cu) so RTX 3090/4090/5090, A10, A40, L4 and L40S run too.
// Each variant is a separate instantiation (csrc/cuda/inst/).
#pragma once

namespace ring_attn {
namespace cuda {

// Smem rows are padded by 8 elements (16 bytes): consecutive rows then start 16 bytes
// apart modulo 128, so the 8 row addresses of one ldmatrix hit 8 distinct 16-byte bank
// groups (no conflicts) without an XOR swizzle. Cost: 8/128 = 6% more smem at hd128.
constexpr int kSmemPad = 8;

struct TileConfig {
  int block_m;   // query rows per CTA (forward) / per inner step (backward)
  int block_n;   // keys per inner step (forward) / per CTA (backward)
  int n_warps;
  // smem stages of the operands streamed through the loop, so the next block's copy runs
  // during this block's compute: K/V in the forward (always 2), the query block (Q, dO,
  // lse, delta) in the backward (2, or 1 where two do not fit: then every query block
  // waits for its own copy).
  int stages;
};

// Forward: sQ [block_m] rows, then sK and sV with `stages` (2) stages each ([block_n] rows).
constexpr int fwd_smem_bytes(int head_dim, const TileConfig& t, int elem_bytes) {
  return (t.block_m + 2 * t.stages * t.block_n) * (head_dim + kSmemPad) * elem_bytes;
}

// Backward (bwd_kernel.cuh's layout): per stage sQ, sdO [block_m] rows of (head_dim + pad),
// the rows' float64 lse and float delta (12 bytes a row); then sK, sV [block_n] rows; sP,
// sdS [block_m][block_n + pad]; then float sLseHi, sLseLo [block_m] (the lse of the block
// being computed, split in two floats).
constexpr int bwd_smem_bytes(int head_dim, const TileConfig& t, int elem_bytes) {
  return t.stages * (2 * t.block_m * (head_dim + kSmemPad) * elem_bytes + t.block_m * (8 + 4)) +
         2 * t.block_n * (head_dim + kSmemPad) * elem_bytes +
         2 * t.block_m * (t.block_n + kSmemPad) * elem_bytes + 2 * t.block_m * 4;
}

constexpr int kMaxTileVariants = 3;

// The candidates of one (head dim, direction), preferred first. n == 0: head dim unknown.
struct TileCandidates {
  int n;
  TileConfig c[kMaxTileVariants];
};

// Forward (bytes at 2-byte elements; why each size: kernel_traits.h). K/V: 2 stages.
//   hd64  128x64 8w  55,296      hd96 128x64 8w  79,872
//   hd128 128x64 8w 104,448  ->  128x32 8w  69,632 under 99 KB
//   hd192 128x64 8w 153,600  ->  128x16 8w  76,800 (128x32 needs 102,400: 1 KB too many)
//   hd256 128x32 8w 135,168  ->  128x16 8w 101,376 (exactly the 99 KB limit)
constexpr TileCandidates fwd_tiles(int head_dim) {
  switch (head_dim) {
    case 64: return {1, {{128, 64, 8, 2}, {}, {}}};
    case 96: return {1, {{128, 64, 8, 2}, {}, {}}};
    case 128: return {2, {{128, 64, 8, 2}, {128, 32, 8, 2}, {}}};
    case 192: return {2, {{128, 64, 8, 2}, {128, 16, 8, 2}, {}}};
    case 256: return {2, {{128, 32, 8, 2}, {128, 16, 8, 2}, {}}};
    default: return {0, {{}, {}, {}}};
  }
}

// Backward: the query block (Q, dO, lse, delta) double-buffered (2 stages) wherever it
// fits; the single-stage tile of the same shape next, then a smaller one for 99 KB GPUs.
// Which GPU takes which (sm_80/87 163 KB, sm_86/89/120/121 99 KB, sm_90/100/103 227 KB):
//   hd64  64x64 8w 2st  75,776 (all)
//   hd96  64x64 8w 2st 100,352 (all: 1,024 B under 99 KB)
//   hd128 64x64 8w 2st 124,928 (sm_80, sm_90) -> 1st  89,344 (99 KB)
//   hd192 64x64 8w 2st 174,080 (sm_90)        -> 1st 122,112 (sm_80)
//                                             -> 64x32 8w 1st  88,320 (99 KB; 2 stages:
//                                                140,288)
//   hd256 64x64 8w 2st 223,232 (sm_90)        -> 1st 154,880 (sm_80)
//                                             -> 32x32 4w 1st  73,344 (99 KB; 2 stages:
//                                                107,520; 64x32 needs 112,896 with one,
//                                                the 8-warp layouts need kBlockM * kBlockN
//                                                >= 8 * 16 * 16)
// On sm_80 at hd192, 64x64 with one stage is kept (the tile A100s ran before double
// buffering) rather than 64x32 with two (140,288): halving the key block doubles the Q/dO
// reads and dQ atomics per key, which no measurement has weighed against the overlap yet.
constexpr TileCandidates bwd_tiles(int head_dim) {
  switch (head_dim) {
    case 64: return {1, {{64, 64, 8, 2}, {}, {}}};
    case 96: return {1, {{64, 64, 8, 2}, {}, {}}};
    case 128: return {2, {{64, 64, 8, 2}, {64, 64, 8, 1}, {}}};
    case 192: return {3, {{64, 64, 8, 2}, {64, 64, 8, 1}, {64, 32, 8, 1}}};
    case 256: return {3, {{64, 64, 8, 2}, {64, 64, 8, 1}, {32, 32, 4, 1}}};
    default: return {0, {{}, {}, {}}};
  }
}

constexpr TileCandidates tiles(int head_dim, bool backward) {
  return backward ? bwd_tiles(head_dim) : fwd_tiles(head_dim);
}

constexpr int tile_smem_bytes(int head_dim, bool backward, const TileConfig& t, int elem_bytes) {
  return backward ? bwd_smem_bytes(head_dim, t, elem_bytes) : fwd_smem_bytes(head_dim, t, elem_bytes);
}

// The variant (index into tiles()) to launch: the first candidate whose shared memory
// fits `smem_limit` bytes per block. -1: unknown head dim or element size; -2: nothing
// fits (the caller reports the smallest candidate's need).
constexpr int select_tile(int head_dim, int elem_bytes, bool backward, long long smem_limit) {
  if (elem_bytes != 2) return -1;  // tensor-core tiles exist for bfloat16 / float16 only
  const TileCandidates t = tiles(head_dim, backward);
  if (t.n == 0) return -1;
  for (int i = 0; i < t.n; ++i) {
    if (tile_smem_bytes(head_dim, backward, t.c[i], elem_bytes) <= smem_limit) return i;
  }
  return -2;
}

}  // namespace cuda
}  // namespace ring_attn

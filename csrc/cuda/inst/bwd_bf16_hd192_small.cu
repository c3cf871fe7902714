// One instantiation per file (bounds nvcc time and memory): backward, bf16, head dim 192:
// the 64 x 32 tile for GPUs with 99 KB of smem per block (tile_config.h).
#include "cuda/bwd_kernel.cuh"

template cudaError_t ring_attn::cuda::run_bwd_tc<__nv_bfloat16, 192, 2>(
    const ring_attn::AttnBwdParams&, const ring_attn::Span*, float*, bool, cudaStream_t);

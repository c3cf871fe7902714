// One instantiation per file (bounds nvcc time and memory): forward, fp16, head dim 128:
// the 128 x 32 tile for GPUs with 99 KB of smem per block (tile_config.h).
#include "cuda/fwd_kernel.cuh"

template cudaError_t ring_attn::cuda::run_fwd_tc<__half, 128, 1>(
    const ring_attn::AttnFwdParams&, const ring_attn::Span*, bool, cudaStream_t);

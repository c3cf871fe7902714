// One instantiation per file (bounds nvcc time and memory): backward, bf16, head dim 192:
// the 64 x 64 tile with one query-block stage, for GPUs where two do not fit (tile_config.h).
#include "cuda/bwd_kernel.cuh"

template cudaError_t ring_attn::cuda::run_bwd_tc<__nv_bfloat16, 192, 1>(
    const ring_attn::AttnBwdParams&, const ring_attn::Span*, float*, bool, cudaStream_t);

// One instantiation per file (bounds nvcc time and memory): forward, bf16, head dim 96.
#include "cuda/fwd_kernel.cuh"

template cudaError_t ring_attn::cuda::run_fwd_tc<__nv_bfloat16, 96, 0>(
    const ring_attn::AttnFwdParams&, const ring_attn::Span*, bool, cudaStream_t);

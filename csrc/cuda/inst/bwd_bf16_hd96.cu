// One instantiation per file (bounds nvcc time and memory): backward, bf16, head dim 96.
#include "cuda/bwd_kernel.cuh"

template cudaError_t ring_attn::cuda::run_bwd_tc<__nv_bfloat16, 96, 0>(
    const ring_attn::AttnBwdParams&, const ring_attn::Span*, float*, bool, cudaStream_t);

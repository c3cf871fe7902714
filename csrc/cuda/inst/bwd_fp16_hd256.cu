// One instantiation per file (bounds nvcc time and memory): backward, fp16, head dim 256.
#include "cuda/bwd_kernel.cuh"

template cudaError_t ring_attn::cuda::run_bwd_tc<__half, 256, 0>(
    const ring_attn::AttnBwdParams&, const ring_attn::Span*, float*, bool, cudaStream_t);

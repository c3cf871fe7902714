// One instantiation per file (bounds nvcc time and memory): forward, fp16, head dim 256.
#include "cuda/fwd_kernel.cuh"

template cudaError_t ring_attn::cuda::run_fwd_tc<__half, 256, 0>(
    const ring_attn::AttnFwdParams&, const ring_attn::Span*, bool, cudaStream_t);

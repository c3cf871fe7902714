// SIMT (CUDA-core) forward and backward for double inputs: small kernels, one file per dtype.
#include "cuda/simt_kernel.cuh"

template cudaError_t ring_attn::cuda::run_fwd_simt<double>(const ring_attn::AttnFwdParams&, bool,
                                                           cudaStream_t);
template cudaError_t ring_attn::cuda::run_bwd_simt<double>(const ring_attn::AttnBwdParams&, bool,
                                                           cudaStream_t);

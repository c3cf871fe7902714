// Host entry points of the CUDA kernels, declared for launch.cu and defined (explicitly
// instantiated) in csrc/cuda/inst/*.cu, one heavy instantiation per file. Host-only: no
// device code and no torch types, so launch.cu never compiles a kernel body.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common/attn_params.h"

namespace ring_attn {
namespace cuda {

// Tensor cores (bf16 / fp16, sm_80+); kHeadDim in {64, 96, 128, 192, 256} must be
// >= max(D, Dv); kVariant indexes tile_config.h's candidates (select_tile()).
template <typename Elem, int kHeadDim, int kVariant>
cudaError_t run_fwd_tc(const AttnFwdParams& p, bool out_fp32, cudaStream_t stream);

// dq_accum: zeroed float32 [B, Hq, Sq, D] that receives dQ (already scaled); dk/dv are
// written in place (float32 when grad_fp32, else Elem), summed over each KV group.
template <typename Elem, int kHeadDim, int kVariant>
cudaError_t run_bwd_tc(const AttnBwdParams& p, float* dq_accum, bool grad_fp32,
                       cudaStream_t stream);

// SIMT path for float32 and float64 (any head dim <= 256): exact in the input precision,
// slower than tensor cores. out / grads in float32 when out_fp32 / grad_fp32, else T.
template <typename T>
cudaError_t run_fwd_simt(const AttnFwdParams& p, bool out_fp32, cudaStream_t stream);
template <typename T>
cudaError_t run_bwd_simt(const AttnBwdParams& p, bool grad_fp32, cudaStream_t stream);

}  // namespace cuda
}  // namespace ring_attn

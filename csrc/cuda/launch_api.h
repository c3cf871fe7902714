// Host entry points of the CUDA kernels, declared for launch.cu and defined (explicitly
// instantiated) in csrc/cuda/inst/*.cu, one heavy instantiation per file. Host-only: no
// device code and no torch types, so launch.cu never compiles a kernel body.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common/attn_params.h"
#include "common/visibility.h"

namespace ring_attn {
namespace cuda {

// Tensor cores (bf16 / fp16, sm_80+); kHeadDim in {64, 96, 128, 192, 256} must be
// >= max(D, Dv); kVariant indexes tile_config.h's candidates (select_tile()).
// k_spans: run_block_spans' output for the key tiles (block_n of the variant), or nullptr
// (the kernel computes each tile's spans itself).
template <typename Elem, int kHeadDim, int kVariant>
cudaError_t run_fwd_tc(const AttnFwdParams& p, const Span* k_spans, bool out_fp32,
                       cudaStream_t stream);

// dq_accum: zeroed float32 [B, Hq, Sq, D] that receives dQ (already scaled); dk/dv are
// written in place (float32 when grad_fp32, else Elem), summed over each KV group.
// q_spans: run_block_spans' output for the query blocks (block_m of the variant), or
// nullptr.
template <typename Elem, int kHeadDim, int kVariant>
cudaError_t run_bwd_tc(const AttnBwdParams& p, const Span* q_spans, float* dq_accum,
                       bool grad_fp32, cudaStream_t stream);

// Spans of the blocks of `block` positions of a sequence of n (positions pos[i], or
// offset + i without a map; documents doc[i], or none): out[2 b] the position span and
// out[2 b + 1] the document span of block b, ceil(n / block) blocks (block_spans.cu).
cudaError_t run_block_spans(const int64_t* pos, int64_t offset, const int32_t* doc, int n,
                            int block, Span* out, cudaStream_t stream);

// SIMT path for float32 and float64 (any head dim <= 256): exact in the input precision,
// slower than tensor cores. out / grads in float32 when out_fp32 / grad_fp32, else T.
template <typename T>
cudaError_t run_fwd_simt(const AttnFwdParams& p, bool out_fp32, cudaStream_t stream);
template <typename T>
cudaError_t run_bwd_simt(const AttnBwdParams& p, bool grad_fp32, cudaStream_t stream);

}  // namespace cuda
}  // namespace ring_attn

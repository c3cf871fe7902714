// The position and document spans (min/max, utils.cuh's block_spans) of every block of
// one side's sequence, computed once per call into a workspace that launch.cu allocates
// ([n_blocks][2] Span: position span, then document span), for the side whose blocks
// the tensor-core kernels classify in their loops: the key tiles in the forward (every
// query-block CTA walks all of them), the query blocks in the backward (every key-block
// CTA walks all of them, once per query head of its group). Without it each CTA recomputed
// each block's spans: with a position map or documents that is a strided warp loop over
// the block's positions and documents and 2 x 5 shuffles, per block, per CTA (and per
// head in the backward); with the workspace it is two 16-byte loads. Without a map and
// without documents the spans are two additions (offset + first, offset + last) and no
// workspace is used.
#include "cuda/launch_api.h"
#include "cuda/utils.cuh"

namespace ring_attn {
namespace cuda {

namespace {

// One warp per block (block_spans is warp-collective: every lane of a warp takes the
// same early exit).
__global__ void block_spans_kernel(const int64_t* __restrict__ pos, int64_t offset,
                                   const int32_t* __restrict__ doc, int n, int block,
                                   int n_blocks, Span* __restrict__ out) {
  const int w = static_cast<int>((blockIdx.x * blockDim.x + threadIdx.x) / 32);
  const int lane = threadIdx.x % 32;
  if (w >= n_blocks) return;
  const BlockSpans s = spans_of_block(nullptr, pos, offset, doc, w, block, n, lane);
  if (lane == 0) {
    out[2 * w] = s.pos;
    out[2 * w + 1] = s.doc;
  }
}

}  // namespace

cudaError_t run_block_spans(const int64_t* pos, int64_t offset, const int32_t* doc, int n,
                            int block, Span* out, cudaStream_t stream) {
  const int n_blocks = ceil_div(n, block);
  if (n_blocks == 0) return cudaSuccess;
  constexpr int kWarps = 8;
  block_spans_kernel<<<ceil_div(n_blocks, kWarps), kWarps * 32, 0, stream>>>(
      pos, offset, doc, n, block, n_blocks, out);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace ring_attn

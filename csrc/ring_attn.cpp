// The op contract of ring_attn, declared once. Each backend registers its kernels with
// TORCH_LIBRARY_IMPL(ring_attn, <Backend>, m) in its own file; attn_fwd's autograd kernel
// is csrc/api/autograd.cpp, sdpa's implementation csrc/api/attention.cpp; Python
// registers only the fake (shape) kernels (ring_attn/ops.py). Python and C++ callers
// (the C++ API, csrc/include/ring_attn/) reach the same kernels through the dispatcher. No Python here: the same file is
// compiled into the Python extension (python_module.cpp adds the module) and into the
// C++ library of the CMake build.
#include <torch/library.h>

#include <string>
#include <vector>

#include "cpu/cpu_isa.h"
#include "cuda/tile_config.h"

namespace {

// ring_attn::_cpu_isa: the instruction-set path the CPU kernels take in this process
// (cpu/cpu_isa.h), its supported alternatives (what RING_ATTN_CPU_ISA may name, lowest
// first), and whether the CPU has AMX-BF16 (detected only; such CPUs run avx512_bf16).
std::tuple<std::string, std::vector<std::string>, bool> cpu_isa_info() {
  return {ring_attn::cpu::isa_name(ring_attn::cpu::cpu_isa()),
          ring_attn::cpu::supported_isas(), ring_attn::cpu::cpu_has_amx()};
}

// ring_attn::_cuda_tile_config: the tile the CUDA tensor-core kernels would launch for
// (head_dim, dtype, direction) on a GPU allowing smem_limit bytes of shared memory per
// block (sharedMemPerBlockOptin): [block_m, block_n, n_warps, smem_bytes, variant, stages]
// (stages: K/V buffers in the forward, query-block buffers in the backward). The very
// function launch.cu calls (cuda/tile_config.h), available in every build, so the CPU
// test suite covers each GPU's limit.
std::vector<int64_t> cuda_tile_config(int64_t head_dim, c10::ScalarType dtype, bool backward,
                                      int64_t smem_limit) {
  TORCH_CHECK(dtype == c10::kBFloat16 || dtype == c10::kHalf,
              "ring_attn: _cuda_tile_config: dtype must be bfloat16 or float16 (the "
              "tensor-core kernels; float32/float64 use the SIMT kernels, no smem tiles), got ",
              dtype);
  using namespace ring_attn::cuda;
  const int hd = static_cast<int>(head_dim);
  const TileCandidates t = tiles(hd, backward);
  TORCH_CHECK(head_dim == hd && t.n > 0,
              "ring_attn: _cuda_tile_config: head_dim must be one of the instantiated "
              "64, 96, 128, 192, 256, got ", head_dim);
  const int v = select_tile(hd, 2, backward, smem_limit);
  TORCH_CHECK(v >= 0, "ring_attn: the ", backward ? "backward" : "forward",
              " tensor-core kernel at head dim ", hd, " needs at least ",
              tile_smem_bytes(hd, backward, t.c[t.n - 1], 2),
              " bytes of shared memory per block, but smem_limit is ", smem_limit);
  const TileConfig& c = t.c[v];
  return {c.block_m, c.block_n, c.n_warps, tile_smem_bytes(hd, backward, c, 2), v, c.stages};
}

}  // namespace

TORCH_LIBRARY(ring_attn, m) {
  // Local blockwise attention of one (query block, key block) pair, positions global.
  //   q [B, Hq, Sq, D], k [B, Hk, Sk, D], v [B, Hk, Sk, Dv]; Hq % Hk == 0 (GQA).
  //   attn_mask: 4-D, bool or floating, broadcastable to [B, Hq, Sq, Sk].
  //   q_pos [Sq] / k_pos [Sk] int64 global positions, else q_offset + i / k_offset + j.
  //   is_causal keeps key j for query i iff kpos(j) <= qpos(i).
  //   seed: int64 scalar tensor, required when dropout_p > 0.
  //   Returns out [B, Hq, Sq, Dv] (q's dtype, or float32 if out_fp32) and lse [B, Hq, Sq]
  //   in float64 for every dtype (common/attn_params.h: a row masked by a huge finite
  //   value keeps its log(n)); rows with no key left have out = 0 and lse = -inf. A
  //   floating attn_mask is read in the accumulation dtype (float64 for float64 q, else
  //   float32).
  //   cu_seqlens_q / cu_seqlens_k (both or neither): 1-D int32/int64 cumulative document
  //   lengths in the coordinates of q_pos / k_pos; query i and key j must lie in the same
  //   document d (cu[d] <= pos < cu[d + 1], the same d on both sides); a position outside
  //   [cu[0], cu[-1]) lies in no document and sees nothing. No [Sq, Sk] mask is built.
  //   window_left / window_right: keep key j iff qpos - left <= kpos <= qpos + right on
  //   global positions (-1: unbounded); is_causal is window_right = 0.
  //   softcap > 0: scores become softcap * tanh(score / softcap) before the mask.
  //   dropout_head_offset: the global index of q's head 0 in the dropout RNG key.
  m.def(
      "attn_fwd(Tensor q, Tensor k, Tensor v, Tensor? attn_mask=None, Tensor? q_pos=None, "
      "Tensor? k_pos=None, int q_offset=0, int k_offset=0, bool is_causal=False, "
      "float scale=1.0, float dropout_p=0.0, Tensor? seed=None, bool out_fp32=False, "
      "Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None, int window_left=-1, "
      "int window_right=-1, float softcap=0.0, int dropout_head_offset=0) "
      "-> (Tensor out, Tensor lse)");
  // Gradients of attn_fwd given the (possibly ring-global) out and lse it should use.
  //   lse is converted to float64 (the backward splits it per row into hi + lo).
  //   dlse (optional) is the gradient flowing into lse; it folds into delta:
  //   delta = rowsum(dout * out) - dlse, dS = P * (dP - delta).
  //   Returns dq, dk, dv shaped like q, k, v (dk/dv summed over each KV group's query
  //   heads), in the inputs' dtype or float32 if grad_fp32.
  m.def(
      "attn_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? dlse=None, Tensor? attn_mask=None, Tensor? q_pos=None, Tensor? k_pos=None, "
      "int q_offset=0, int k_offset=0, bool is_causal=False, float scale=1.0, "
      "float dropout_p=0.0, Tensor? seed=None, bool grad_fp32=False, "
      "Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None, int window_left=-1, "
      "int window_right=-1, float softcap=0.0, int dropout_head_offset=0) "
      "-> (Tensor dq, Tensor dk, Tensor dv)");
  // The exact (out, lse) merge, in place (csrc/include/ring_attn/merge.h): acc_out and
  // acc_lse (float64) absorb a partial (out, lse) over other keys. One device-generic
  // implementation (csrc/api/merge.cpp) for the Python ring and C++ callers.
  m.def("merge_(Tensor(a!) acc_out, Tensor(b!) acc_lse, Tensor out, Tensor lse) -> ()");
  // 0-D bool: a row with |lse| > 2^33 receives a non-zero gradient (merge.h).
  m.def("_saturated_rows(Tensor lse, Tensor dout) -> Tensor");
  // torch's scaled_dot_product_attention on the kernels (csrc/api/attention.cpp): query
  // [..., L, E], key [..., S, E], value [..., S, Ev] with broadcast batch dims, heads
  // broadcast from one or grouped (enable_gqa), attn_mask (bool, float32 or query's dtype)
  // broadcastable to [..., L, S], scale None -> 1/sqrt(E), the window and softcap of
  // attn_fwd (top-left aligned positions). seed: None draws one from torch's default
  // generator when dropout_p > 0. Differentiable through attn_fwd's autograd.
  m.def(
      "sdpa(Tensor query, Tensor key, Tensor value, Tensor? attn_mask=None, "
      "float dropout_p=0.0, bool is_causal=False, float? scale=None, bool enable_gqa=False, "
      "int window_left=-1, int window_right=-1, float softcap=0.0, Tensor? seed=None) "
      "-> Tensor");
  // sdpa's argument checks alone (same rules, same errors), for callers that compute
  // otherwise (the simulated ring).
  m.def(
      "_sdpa_check(Tensor query, Tensor key, Tensor value, Tensor? attn_mask=None, "
      "float dropout_p=0.0, bool is_causal=False, float? scale=None, bool enable_gqa=False, "
      "int window_left=-1, int window_right=-1, float softcap=0.0) -> ()");
  // Introspection for tests and benchmarks (no tensors): the functions above.
  m.def("_cpu_isa() -> (str isa, str[] supported, bool amx)", &cpu_isa_info);
  m.def("_cuda_tile_config(int head_dim, ScalarType dtype, bool backward, int smem_limit) "
        "-> int[]",
        &cuda_tile_config);
}

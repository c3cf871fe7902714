// TORCH_LIBRARY_IMPL(ring_attn, CUDA, m): the CUDA implementations of attn_fwd / attn_bwd.
//
// Checks, mask broadcasting, allocation and delta live in csrc/attn_host.cpp (shared with
// the CPU backend); this file adds the CUDA-only checks, the device guard and stream, and
// maps (dtype, head dim) to the kernel instantiations of csrc/cuda/inst/:
//   bfloat16 / float16  tensor-core kernels (sm_80+), head dim padded up to the smallest
//                       compiled instantiation >= max(D, Dv) (64, 96, 128, 192, 256), the
//                       tile picked from the GPU's smem per block (tile_config.h); with a
//                       band or documents and a position map or documents, the spans of
//                       the blocks the kernel classifies computed once (block_spans.cu)
//   float32 / float64   SIMT kernels in the input precision (simt_kernel.cuh): float64 is
//                       supported on CUDA, correct but slow (no tensor-core fp64 path)
// Head dims above 256 are rejected with a clear error on every dtype. delta and a float
// mask come from attn_host.cpp in the accumulation dtype: float32 for every kernel here
// except the float64 SIMT one, which reads them as double; lse is float64 for every dtype
// (attn_params.h), written and read as double by every kernel.
//
// RING_ATTN_HEAD_DIMS (setup.py) may limit the compiled head dims; setup.py then defines
// RING_ATTN_HEAD_DIMS_LIMITED and RING_ATTN_HAS_HD<N> for each compiled N, and only those
// instantiations are referenced here (so the extension links).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <string>
#include <type_traits>

#include "attn_host.h"
#include "cuda/launch_api.h"
#include "common/visibility.h"
#include "cuda/tile_config.h"

#ifndef RING_ATTN_HEAD_DIMS_LIMITED
#define RING_ATTN_HAS_HD64 1
#define RING_ATTN_HAS_HD96 1
#define RING_ATTN_HAS_HD128 1
#define RING_ATTN_HAS_HD192 1
#define RING_ATTN_HAS_HD256 1
#endif

namespace ring_attn::cuda {
namespace {

using OptTensor = std::optional<at::Tensor>;

constexpr int64_t kMaxHeadDim = 256;

// The head dims this build compiled, ascending.
constexpr int kCompiledHeadDims[] = {
#ifdef RING_ATTN_HAS_HD64
    64,
#endif
#ifdef RING_ATTN_HAS_HD96
    96,
#endif
#ifdef RING_ATTN_HAS_HD128
    128,
#endif
#ifdef RING_ATTN_HAS_HD192
    192,
#endif
#ifdef RING_ATTN_HAS_HD256
    256,
#endif
    0};  // sentinel (keeps the array non-empty when no head dim was compiled)

std::string compiled_head_dims() {
  std::string s;
  for (int hd : kCompiledHeadDims) {
    if (hd == 0) break;
    s += (s.empty() ? "" : ", ") + std::to_string(hd);
  }
  return s.empty() ? "none" : s;
}

int pick_head_dim(int64_t D, int64_t Dv) {
  const int64_t need = std::max(D, Dv);
  for (int hd : kCompiledHeadDims) {
    if (hd != 0 && hd >= need) return hd;
  }
  TORCH_CHECK(false, "ring_attn: no CUDA kernel compiled for head dim max(D, Dv) = ", need,
              "; this build has head dims {", compiled_head_dims(),
              "} (rebuild without RING_ATTN_HEAD_DIMS, or include a dim >= ", need, ")");
}

// The virtual architectures nvcc compiled this file for (__CUDA_ARCH_LIST__, e.g.
// "800,900"; every .cu of the extension gets the same -gencode flags), for the error below.
#define RING_ATTN_STR2(...) #__VA_ARGS__
#define RING_ATTN_STR(...) RING_ATTN_STR2(__VA_ARGS__)
#ifdef __CUDA_ARCH_LIST__
constexpr const char* kBuildArchList = RING_ATTN_STR(__CUDA_ARCH_LIST__);
#else
constexpr const char* kBuildArchList = "";
#endif

// "800,900" -> "8.0, 9.0".
std::string build_archs() {
  std::string out, num;
  auto flush = [&] {
    if (num.size() >= 2) {
      const int v = std::stoi(num);
      out += (out.empty() ? "" : ", ") + std::to_string(v / 100) + "." + std::to_string(v / 10 % 10);
    }
    num.clear();
  };
  for (const char* c = kBuildArchList; *c; ++c) {
    if (*c >= '0' && *c <= '9') num += *c;
    else flush();
  }
  flush();
  return out.empty() ? "unknown" : out;
}

__global__ void arch_probe_kernel() {}

// Whether this build holds code the current GPU can run (SASS for its major version at or
// below its minor one, or PTX of an older arch to JIT). Without it every launch fails with
// the CUDA runtime's "no kernel image is available for execution on the device", which
// names neither the GPU nor the build; cudaFuncGetAttributes on an empty kernel of the
// same build answers the question once per device.
void check_arch() {
  static std::atomic<bool> ok[64];  // static storage: all false
  const int dev = at::cuda::current_device();
  if (dev < 64 && ok[dev].load(std::memory_order_relaxed)) return;
  cudaFuncAttributes attr;
  const cudaError_t err = cudaFuncGetAttributes(&attr, arch_probe_kernel);
  if (err == cudaErrorNoKernelImageForDevice || err == cudaErrorInvalidDeviceFunction) {
    (void)cudaGetLastError();  // clear the runtime's last error for the caller
    const auto* prop = at::cuda::getCurrentDeviceProperties();
    TORCH_CHECK(false, "ring_attn: this build has no CUDA code that runs on ", prop->name,
                " (compute capability ", prop->major, ".", prop->minor,
                "); it was compiled for compute capabilities {", build_archs(),
                "} (TORCH_CUDA_ARCH_LIST at build time; SASS runs only on its own major "
                "version, PTX ('+PTX') also on newer GPUs). Rebuild with "
                "TORCH_CUDA_ARCH_LIST=\"", prop->major, ".", prop->minor, "\"");
  }
  C10_CUDA_CHECK(err);
  if (dev < 64) ok[dev].store(true, std::memory_order_relaxed);
}

// The tile variant (tile_config.h) for head dim hd on the current GPU, or a clear error
// when even the smallest tile needs more shared memory than the GPU gives one block.
// RING_ATTN_SMEM_LIMIT (bytes) lowers the limit assumed, so an A100/H100 can run the
// 99 KB tiles that RTX/L4/L40S-class GPUs use (tests/test_cuda_kernels.py does).
int pick_tile(int hd, bool backward) {
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  long long limit = static_cast<long long>(prop->sharedMemPerBlockOptin);
  if (const char* env = std::getenv("RING_ATTN_SMEM_LIMIT")) {
    const long long cap = std::atoll(env);
    TORCH_CHECK(cap > 0, "ring_attn: RING_ATTN_SMEM_LIMIT must be a positive number of "
                "bytes, got '", env, "'");
    limit = std::min(limit, cap);
  }
  const int v = select_tile(hd, 2, backward, limit);
  if (v >= 0) return v;
  const TileCandidates t = tiles(hd, backward);
  TORCH_CHECK(t.n > 0, "ring_attn: internal error, no tile configuration for head dim ", hd);
  TORCH_CHECK(false, "ring_attn: the ", backward ? "backward" : "forward",
              " tensor-core kernel at head dim ", hd, " needs at least ",
              tile_smem_bytes(hd, backward, t.c[t.n - 1], 2),
              " bytes of shared memory per block, but ", prop->name, " (compute capability ",
              prop->major, ".", prop->minor, ") allows ", limit);
}

// Every kernel here writes and reads lse as double (attn_params.h); a float32 buffer
// (attn_host.cpp before lse became float64) would be overrun by the forward's 8-byte
// stores, so the host's allocation is checked, not assumed.
void check_lse_double(const at::Tensor& lse) {
  TORCH_CHECK(lse.scalar_type() == at::kDouble && lse.is_contiguous(),
              "ring_attn: internal error, the CUDA kernels need a contiguous float64 lse "
              "from attn_host.cpp, got ", lse.scalar_type());
}

void check_cuda_shape(const AttnShape& s, const at::Tensor& q) {
  TORCH_CHECK(s.D <= kMaxHeadDim && s.Dv <= kMaxHeadDim,
              "ring_attn: CUDA kernels support head dims up to ", kMaxHeadDim, ", got D = ", s.D,
              ", Dv = ", s.Dv);
  TORCH_CHECK(s.Sq <= INT32_MAX && s.Sk <= INT32_MAX,
              "ring_attn: CUDA kernels need sequence lengths below 2^31, got Sq = ", s.Sq,
              ", Sk = ", s.Sk);
  TORCH_CHECK(s.B <= 65535 && s.Hq <= 65535,
              "ring_attn: CUDA kernels need batch and heads <= 65535 (grid limits), got B = ",
              s.B, ", Hq = ", s.Hq);
  if (q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf) {
    const auto* prop = at::cuda::getCurrentDeviceProperties();
    TORCH_CHECK(prop->major >= 8, "ring_attn: bfloat16/float16 CUDA kernels need compute "
                "capability 8.0+ (mma.sync bf16, cp.async), got ", prop->major, ".", prop->minor);
  }
}

// Calls f(std::integral_constant<int, HD>{}) for the compiled tensor-core head dim hd
// (pick_head_dim's result); one switch serves both directions.
template <typename F>
cudaError_t with_head_dim(int hd, F&& f) {
  switch (hd) {
#ifdef RING_ATTN_HAS_HD64
    case 64: return f(std::integral_constant<int, 64>{});
#endif
#ifdef RING_ATTN_HAS_HD96
    case 96: return f(std::integral_constant<int, 96>{});
#endif
#ifdef RING_ATTN_HAS_HD128
    case 128: return f(std::integral_constant<int, 128>{});
#endif
#ifdef RING_ATTN_HAS_HD192
    case 192: return f(std::integral_constant<int, 192>{});
#endif
#ifdef RING_ATTN_HAS_HD256
    case 256: return f(std::integral_constant<int, 256>{});
#endif
    default: break;
  }
  TORCH_CHECK(false, "ring_attn: internal error, head dim ", hd, " not compiled");
  return cudaErrorInvalidValue;
}

// Calls f(std::integral_constant<int, V>{}) for the tile variant v in [kV, kN) (pick_tile's
// result, always below tiles().n), so each (head dim, variant) names its instantiation.
template <int kV, int kN, typename F>
cudaError_t with_variant(int v, F&& f) {
  if constexpr (kV + 1 < kN) {
    if (v != kV) return with_variant<kV + 1, kN>(v, f);
  }
  return f(std::integral_constant<int, kV>{});
}

// The spans of the blocks a kernel's loop classifies (block_spans.cu), computed once for
// the call into a workspace: the key tiles in the forward, the query blocks in the
// backward. Only with a band or documents (else nothing is classified) and a position map
// or documents on that side (else the kernel's offset arithmetic is cheaper than a load).
// The returned tensor owns the workspace; undefined when none is needed.
at::Tensor block_spans_workspace(const AttnMaskParams& m, bool keys, int64_t n, int block,
                                 const at::Device& dev, cudaStream_t st) {
  const int64_t* pos = keys ? m.k_pos : m.q_pos;
  const int32_t* doc = keys ? m.k_doc : m.q_doc;
  if (!has_visibility_rule(m) || (pos == nullptr && doc == nullptr)) return {};
  const int64_t n_blocks = (n + block - 1) / block;
  // Span is two int64 (lo, hi); two Spans (position, document) per block.
  at::Tensor ws = at::empty({n_blocks, 4}, at::TensorOptions().dtype(at::kLong).device(dev));
  C10_CUDA_CHECK(run_block_spans(pos, keys ? m.k_offset : m.q_offset, doc, static_cast<int>(n),
                                 block, reinterpret_cast<Span*>(ws.data_ptr<int64_t>()), st));
  return ws;
}

const Span* spans_ptr(const at::Tensor& ws) {
  return ws.defined() ? reinterpret_cast<const Span*>(ws.data_ptr<int64_t>()) : nullptr;
}

template <typename Elem>
cudaError_t fwd_tc(int hd, const AttnFwdParams& p, const at::Device& dev, bool out_fp32,
                   cudaStream_t st) {
  const int variant = pick_tile(hd, /*backward=*/false);
  const at::Tensor k_spans = block_spans_workspace(
      p.mask, /*keys=*/true, p.shape.Sk, tiles(hd, false).c[variant].block_n, dev, st);
  return with_head_dim(hd, [&](auto HD) -> cudaError_t {
    constexpr int kHD = decltype(HD)::value;
    return with_variant<0, fwd_tiles(kHD).n>(variant, [&](auto V) -> cudaError_t {
      return run_fwd_tc<Elem, kHD, decltype(V)::value>(p, spans_ptr(k_spans), out_fp32, st);
    });
  });
}

template <typename Elem>
cudaError_t bwd_tc(int hd, const AttnBwdParams& p, const at::Device& dev, float* dq_accum,
                   bool grad_fp32, cudaStream_t st) {
  const int variant = pick_tile(hd, /*backward=*/true);
  const at::Tensor q_spans = block_spans_workspace(
      p.mask, /*keys=*/false, p.shape.Sq, tiles(hd, true).c[variant].block_m, dev, st);
  return with_head_dim(hd, [&](auto HD) -> cudaError_t {
    constexpr int kHD = decltype(HD)::value;
    return with_variant<0, bwd_tiles(kHD).n>(variant, [&](auto V) -> cudaError_t {
      return run_bwd_tc<Elem, kHD, decltype(V)::value>(p, spans_ptr(q_spans), dq_accum,
                                                       grad_fp32, st);
    });
  });
}

std::tuple<at::Tensor, at::Tensor> attn_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptTensor& attn_mask,
    const OptTensor& q_pos, const OptTensor& k_pos, int64_t q_offset, int64_t k_offset,
    bool is_causal, double scale, double dropout_p, const OptTensor& seed, bool out_fp32,
    const OptTensor& cu_seqlens_q, const OptTensor& cu_seqlens_k, int64_t window_left,
    int64_t window_right, double softcap,
    int64_t dropout_head_offset) {
  const c10::cuda::CUDAGuard guard(q.device());
  check_arch();
  const FwdArgs args{q, k, v, attn_mask, q_pos, k_pos, q_offset, k_offset,
                     is_causal, scale, dropout_p, seed, cu_seqlens_q,
                     cu_seqlens_k, window_left, window_right, softcap,
                     dropout_head_offset};
  PreparedFwd prep = prepare_fwd(args, out_fp32, c10::DeviceType::CUDA);
  const AttnFwdParams& p = prep.params;
  check_cuda_shape(p.shape, prep.q);
  check_lse_double(prep.lse);
  if (p.shape.B == 0 || p.shape.Hq == 0 || p.shape.Sq == 0) return {prep.out, prep.lse};
  const bool of32 = prep.out.scalar_type() == at::kFloat;
  const cudaStream_t st = at::cuda::getCurrentCUDAStream();
  cudaError_t err;
  switch (prep.q.scalar_type()) {
    case at::kBFloat16:
      err = fwd_tc<__nv_bfloat16>(pick_head_dim(p.shape.D, p.shape.Dv), p, q.device(), of32, st);
      break;
    case at::kHalf:
      err = fwd_tc<__half>(pick_head_dim(p.shape.D, p.shape.Dv), p, q.device(), of32, st);
      break;
    case at::kFloat: err = run_fwd_simt<float>(p, of32, st); break;
    case at::kDouble: err = run_fwd_simt<double>(p, of32, st); break;
    default: TORCH_CHECK(false, "ring_attn: unsupported dtype ", prep.q.scalar_type());
  }
  C10_CUDA_CHECK(err);
  return {prep.out, prep.lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attn_bwd_cuda(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const OptTensor& dlse,
    const OptTensor& attn_mask, const OptTensor& q_pos, const OptTensor& k_pos,
    int64_t q_offset, int64_t k_offset, bool is_causal, double scale, double dropout_p,
    const OptTensor& seed, bool grad_fp32, const OptTensor& cu_seqlens_q,
    const OptTensor& cu_seqlens_k, int64_t window_left, int64_t window_right, double softcap,
    int64_t dropout_head_offset) {
  const c10::cuda::CUDAGuard guard(q.device());
  check_arch();
  const FwdArgs args{q, k, v, attn_mask, q_pos, k_pos, q_offset, k_offset,
                     is_causal, scale, dropout_p, seed, cu_seqlens_q,
                     cu_seqlens_k, window_left, window_right, softcap,
                     dropout_head_offset};
  PreparedBwd prep = prepare_bwd(dout, out, lse, dlse, args, grad_fp32, c10::DeviceType::CUDA);
  const AttnBwdParams& p = prep.params;
  const AttnShape& s = p.shape;
  check_cuda_shape(s, prep.q);
  check_lse_double(prep.lse);
  if (s.B * s.Hq * s.Sq == 0 || s.B * s.Hk * s.Sk == 0) {
    // No query or no key: every gradient is an (empty or) zero sum.
    prep.dq.zero_();
    prep.dk.zero_();
    prep.dv.zero_();
    return {prep.dq, prep.dk, prep.dv};
  }
  const bool g32 = prep.dq.scalar_type() == at::kFloat;
  const cudaStream_t st = at::cuda::getCurrentCUDAStream();
  cudaError_t err;
  const auto dt = prep.q.scalar_type();
  if (dt == at::kBFloat16 || dt == at::kHalf) {
    // dQ is accumulated with fp32 atomics (one add per key block); under grad_fp32 the
    // output itself is the accumulator, otherwise a float32 buffer converted at the end.
    at::Tensor dq_accum = g32 ? prep.dq.zero_() : at::zeros(prep.dq.sizes(), prep.dq.options().dtype(at::kFloat));
    const int hd = pick_head_dim(s.D, s.Dv);
    float* dqa = dq_accum.data_ptr<float>();
    err = dt == at::kBFloat16 ? bwd_tc<__nv_bfloat16>(hd, p, q.device(), dqa, g32, st)
                              : bwd_tc<__half>(hd, p, q.device(), dqa, g32, st);
    C10_CUDA_CHECK(err);
    if (!g32) prep.dq.copy_(dq_accum);
  } else {
    err = dt == at::kFloat ? run_bwd_simt<float>(p, g32, st) : run_bwd_simt<double>(p, g32, st);
    C10_CUDA_CHECK(err);
  }
  return {prep.dq, prep.dk, prep.dv};
}

}  // namespace
}  // namespace ring_attn::cuda

TORCH_LIBRARY_IMPL(ring_attn, CUDA, m) {
  m.impl("attn_fwd", &ring_attn::cuda::attn_fwd_cuda);
  m.impl("attn_bwd", &ring_attn::cuda::attn_bwd_cuda);
}

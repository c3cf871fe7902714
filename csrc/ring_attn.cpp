// The op contract of ring_attn, declared once. Each backend registers its kernels with
// TORCH_LIBRARY_IMPL(ring_attn, <Backend>, m) in its own file; Python registers the fake
// (shape) kernels and autograd in ring_attn/ops.py.
#include <Python.h>
#include <torch/library.h>

// An empty module: importing ring_attn._C loads this library, whose static initialisers
// register the ops. No pybind11 symbols are needed, which keeps an abi3 wheel possible.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(ring_attn, m) {
  // Local blockwise attention of one (query block, key block) pair, positions global.
  //   q [B, Hq, Sq, D], k [B, Hk, Sk, D], v [B, Hk, Sk, Dv]; Hq % Hk == 0 (GQA).
  //   attn_mask: 4-D, bool or floating, broadcastable to [B, Hq, Sq, Sk].
  //   q_pos [Sq] / k_pos [Sk] int64 global positions, else q_offset + i / k_offset + j.
  //   is_causal keeps key j for query i iff kpos(j) <= qpos(i).
  //   seed: int64 scalar tensor, required when dropout_p > 0.
  //   Returns out [B, Hq, Sq, Dv] (q's dtype, or float32 if out_fp32) and lse [B, Hq, Sq]
  //   in the accumulation dtype: float64 for float64 q, float32 for every other dtype
  //   (so float64 is float64-accurate end to end); rows with no key left have out = 0
  //   and lse = -inf. A floating attn_mask is read in the accumulation dtype as well.
  m.def(
      "attn_fwd(Tensor q, Tensor k, Tensor v, Tensor? attn_mask=None, Tensor? q_pos=None, "
      "Tensor? k_pos=None, int q_offset=0, int k_offset=0, bool is_causal=False, "
      "float scale=1.0, float dropout_p=0.0, Tensor? seed=None, bool out_fp32=False) "
      "-> (Tensor out, Tensor lse)");
  // Gradients of attn_fwd given the (possibly ring-global) out and lse it should use.
  //   lse is converted to the accumulation dtype (float64 for float64 q, else float32).
  //   dlse (optional) is the gradient flowing into lse; it folds into delta:
  //   delta = rowsum(dout * out) - dlse, dS = P * (dP - delta).
  //   Returns dq, dk, dv shaped like q, k, v (dk/dv summed over each KV group's query
  //   heads), in the inputs' dtype or float32 if grad_fp32.
  m.def(
      "attn_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? dlse=None, Tensor? attn_mask=None, Tensor? q_pos=None, Tensor? k_pos=None, "
      "int q_offset=0, int k_offset=0, bool is_causal=False, float scale=1.0, "
      "float dropout_p=0.0, Tensor? seed=None, bool grad_fp32=False) "
      "-> (Tensor dq, Tensor dk, Tensor dv)");
}

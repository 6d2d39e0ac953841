// The one TORCH_LIBRARY block: schemas of every CUDA op, declared once. Implementations are registered
// per op in csrc/bindings/<op>.cpp (TORCH_LIBRARY_IMPL(pd_kernels, CUDA, m)); fake (meta)
// implementations in Python (pd_kernels/ops/<op>.py, @cuda_fake). The public pd_kernels::<op> ops are
// Python custom ops in the same namespace that call these for backend="cuda".
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(pd_kernels, m) {
  m.def("paged_kv_write_cuda(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor slot_mapping) -> ()");
  m.def("token_confidence_cuda(Tensor logits, Tensor(a!) token, Tensor(b!) conf, Tensor? suppress_ids, "
        "Tensor? seed_t, Tensor? offset_t, Tensor? threshold, int seed, int offset, int kind, float temperature) -> ()");
  m.def("commit_spans_cuda(Tensor token, Tensor conf, Tensor row_dst, Tensor span_rows, Tensor(a!) tokens, "
        "Tensor(b!) masks_left, Tensor(c!) step, Tensor num_steps, Tensor(d!) deferred, Tensor(e!) arrivals, "
        "Tensor(f!) committed, Tensor(g!) all_done, int policy, float tau, int mask_id) -> ()");
}

// Lets an ahead-of-time build be imported as `pd_kernels._C` (its import runs the registrations above).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&def);
}

// The Python module lpqld_fast._C. Importing it runs the static
// TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL registrations of every op file,
// which make the ops available as torch.ops.lpqld.<name>.
#include <Python.h>
#include <torch/library.h>

// Every op's schema is in csrc/<op>.cpp (TORCH_LIBRARY_FRAGMENT); its kernels register with
// TORCH_LIBRARY_IMPL in csrc/cpu/ and csrc/cuda/. The namespace itself is declared once here.
TORCH_LIBRARY(lpqld, m) {
  // Not a tensor op: limit / statistics of the CPU output pool (csrc/cpu/output_pool.cpp).
  m.def("_cpu_output_pool(int limit=-1) -> int[]");
}

static struct PyModuleDef lpqld_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&lpqld_module); }

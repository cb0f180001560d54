// The Python module lpqld_fast._C. Importing it runs the static
// TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL registrations of every op file,
// which make the ops available as torch.ops.lpqld.<name>.
#include <Python.h>
#include <torch/library.h>

// Every op file adds its schema with TORCH_LIBRARY_FRAGMENT(lpqld, m); the
// namespace itself is declared once here.
TORCH_LIBRARY(lpqld, m) {}

static struct PyModuleDef lpqld_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&lpqld_module); }

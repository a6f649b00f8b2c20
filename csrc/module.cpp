// The Python module staged_fast._C: importing it loads the operators registered with TORCH_LIBRARY
// (grow_cpu.cpp, grow_cuda.cu), which are then called as torch.ops.staged_fast.<op>. The module itself
// only says how it was built, so it uses Python's C API rather than pybind11: torch/extension.h (pybind11
// and the whole C++ frontend) was most of the build's compile time.
#include <Python.h>

namespace {

PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_C",
    "staged_fast fused growth kernels; use torch.ops.staged_fast.grow_tiles_ (see staged_fast.ops)", -1, nullptr,
};

#ifdef STAGED_FAST_WITH_CUDA
constexpr bool kWithCuda = true;
#else
constexpr bool kWithCuda = false;
#endif
#ifdef _OPENMP
constexpr bool kWithOpenmp = true;
#else
constexpr bool kWithOpenmp = false;
#endif

}  // namespace

// setup.py builds the extension as staged_fast._C, so Python looks for PyInit__C.
PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  if (PyModule_AddObjectRef(module, "with_cuda", kWithCuda ? Py_True : Py_False) < 0 ||
      PyModule_AddObjectRef(module, "with_openmp", kWithOpenmp ? Py_True : Py_False) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}

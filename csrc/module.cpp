// The Python module staged_fast._C: importing it loads the operators registered with TORCH_LIBRARY
// (grow_cpu.cpp, grow_cuda.cu), which are then called as torch.ops.staged_fast.<op>.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "staged_fast fused growth kernels; use torch.ops.staged_fast.grow_tiles_ (see staged_fast.ops)";
#ifdef STAGED_FAST_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
#ifdef _OPENMP
  m.attr("with_openmp") = true;
#else
  m.attr("with_openmp") = false;
#endif
}

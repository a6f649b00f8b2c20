// CUDA implementation of staged_fast::grow_tiles_ (schema in grow_cpu.cpp, index map in
// staged_fast/growth/index_maps.py, formula in grow_tiles.h).
//
// One launch per parameter writes its grown value and its grown Adam state: thread (x, y) owns column
// x of the tiles of destination row y, reads each source element once per tensor (into a register) and
// writes it to every column half of that row; warps read and write consecutive addresses.
#include <torch/extension.h>

#include <cuda_runtime.h>
// A CUDA build of torch ships c10/cuda with its generated cmake macros; a CPU build ships the c10/cuda
// headers without them (so they do not compile). The nvcc compile-only check on a CPU-torch machine
// takes the fallback: the legacy default stream (torch's current stream unless a side stream is set)
// and a manual device switch. Real builds (CUDAExtension needs a CUDA torch) take the c10 path.
#if __has_include(<c10/cuda/impl/cuda_cmake_macros.h>)
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#define STAGED_FAST_C10_CUDA 1
#endif

#include "grow_op.h"

namespace staged_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxTensors = 4;

template <typename T>
struct TensorSet {
  const T* src[kMaxTensors];
  T* dst[kMaxTensors];
  float scale[kMaxTensors];
  int n;
};

template <typename T>
__global__ void grow_tiles_kernel(TensorSet<T> p, const float* __restrict__ noise, Tiling t) {
  using Acc = at::opmath_type<T>;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= t.cols) return;
  const int64_t R = t.rows, C = t.cols, rows = t.dst_rows(), dcols = t.dst_cols();
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    const int64_t g = row / (t.row_halves * R);
    const int64_t rem = row - g * t.row_halves * R;
    const int64_t rh = rem / R;
    const int64_t r = rem - rh * R;
    const int64_t s_off = (g * R + r) * C + c;
    const int64_t d_off = row * dcols + c;
    for (int i = 0; i < p.n; ++i) {
      const Acc scale = static_cast<Acc>(p.scale[i]);
      const Acc x = scale != Acc(0) ? static_cast<Acc>(p.src[i][s_off]) * scale : Acc(0);
      const bool noisy = i == 0 && noise != nullptr;
      const Acc e = noisy ? static_cast<Acc>(noise[((g * t.row_halves + rh) * R + r) * C + c]) : Acc(0);
      for (int64_t ch = 0; ch < t.col_halves; ++ch) {
        const bool diagonal = !t.block_diagonal || ch == rh;
        Acc v;
        if (noisy) v = diagonal ? x - e : e;
        else v = diagonal ? x : Acc(0);
        p.dst[i][d_off + ch * C] = static_cast<T>(v);
      }
    }
  }
}

template <typename T>
void launch(const std::vector<int64_t>& idx, at::TensorList src, at::TensorList dst, at::ArrayRef<double> scale,
            const float* noise, const Tiling& t, cudaStream_t stream) {
  TensorSet<T> p{};
  p.n = static_cast<int>(idx.size());
  for (int k = 0; k < p.n; ++k) {
    p.src[k] = static_cast<const T*>(src[idx[k]].data_ptr());
    p.dst[k] = static_cast<T*>(dst[idx[k]].data_ptr());
    p.scale[k] = static_cast<float>(scale[idx[k]]);
  }
  const dim3 block(kThreads);
  const dim3 grid(static_cast<unsigned>((t.cols + kThreads - 1) / kThreads),
                  static_cast<unsigned>(std::min<int64_t>(t.dst_rows(), 65535)));
  grow_tiles_kernel<T><<<grid, block, 0, stream>>>(p, noise, t);
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, "grow_tiles_ (CUDA): launch failed: ", cudaGetErrorString(err));
}

void grow_tiles_cuda(at::TensorList src, at::TensorList dst, at::ArrayRef<double> scale, int64_t groups, int64_t rows,
                     int64_t cols, int64_t row_halves, int64_t col_halves, bool block_diagonal,
                     const c10::optional<at::Tensor>& noise) {
  const Tiling t = make_tiling(groups, rows, cols, row_halves, col_halves, block_diagonal);
  check_grow_args(src, dst, scale, t, noise);
  for (double s : scale) {
    TORCH_CHECK(static_cast<double>(static_cast<float>(s)) == s, "grow_tiles_ (CUDA): scale ", s,
                " is not exact in float32");
  }
#ifdef STAGED_FAST_C10_CUDA
  const c10::cuda::CUDAGuard guard(dst[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
#else
  struct DeviceSwitch {  // restores the caller's device on exit, like CUDAGuard
    int previous = 0;
    explicit DeviceSwitch(int device) { cudaGetDevice(&previous); cudaSetDevice(device); }
    ~DeviceSwitch() { cudaSetDevice(previous); }
  } guard(dst[0].device().index());
  const cudaStream_t stream = nullptr;  // legacy default stream
#endif
  const float* nz = (noise.has_value() && noise->defined()) ? noise->data_ptr<float>() : nullptr;
  // Tensors of one dtype share a launch; noise goes with tensor 0 (the parameter), which leads its set.
  std::vector<bool> done(src.size(), false);
  for (size_t i = 0; i < src.size(); ++i) {
    if (done[i]) continue;
    std::vector<int64_t> idx;
    for (size_t j = i; j < src.size(); ++j) {
      if (!done[j] && dst[j].scalar_type() == dst[i].scalar_type()) {
        idx.push_back(static_cast<int64_t>(j));
        done[j] = true;
      }
    }
    const float* set_noise = i == 0 ? nz : nullptr;
    switch (dst[i].scalar_type()) {
      case at::kFloat: launch<float>(idx, src, dst, scale, set_noise, t, stream); break;
      case at::kDouble: launch<double>(idx, src, dst, scale, set_noise, t, stream); break;
      case at::kHalf: launch<at::Half>(idx, src, dst, scale, set_noise, t, stream); break;
      case at::kBFloat16: launch<at::BFloat16>(idx, src, dst, scale, set_noise, t, stream); break;
      default: TORCH_CHECK(false, "grow_tiles_: unsupported dtype ", dst[i].scalar_type());
    }
  }
}

}  // namespace
}  // namespace staged_fast

TORCH_LIBRARY_IMPL(staged_fast, CUDA, m) { m.impl("grow_tiles_", &staged_fast::grow_tiles_cuda); }

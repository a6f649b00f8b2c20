// CUDA implementation of staged_fast::grow_tiles_ (schema in grow_cpu.cpp, index map in
// staged_fast/growth/index_maps.py, formula in grow_tiles.h).
//
// One launch per parameter writes its grown value and its grown Adam state: thread (x, y) owns VEC
// consecutive columns x*VEC.. of the tiles of destination row row_begin + y (the destinations hold rows
// [row_begin, row_end) only: all of them, or one rank's FSDP shard), reads each source element once per
// tensor (into registers) and writes it to every column half of that row; warps read and write
// consecutive addresses. Memory-bound, so: 16-byte loads and stores (VEC = 16 / sizeof(T)) whenever
// the column count and every pointer allow it, else one element per thread; 32-bit index arithmetic
// when every offset fits (the common case; int64 beyond 2^31 elements).
#include <torch/library.h>  // TORCH_LIBRARY_IMPL only: this file binds no Python (module.cpp does)

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
#elif defined(STAGED_FAST_WITH_CUDA)
// setup.py's CUDAExtension build: the fallback there would ignore torch's current stream without a word
#error "staged_fast: c10/cuda/impl/cuda_cmake_macros.h not found: build the CUDA kernels against a CUDA build of torch"
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

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

template <typename T, int VEC, typename Index>
__global__ void grow_tiles_kernel(TensorSet<T> p, const float* __restrict__ noise, Tiling t, RowRange range) {
  using Acc = at::opmath_type<T>;
  using V = Vec<T, VEC>;
  const Index R = static_cast<Index>(t.rows), C = static_cast<Index>(t.cols);
  const Index c = (static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (c >= C) return;
  const Index row_begin = static_cast<Index>(range.begin), row_end = static_cast<Index>(range.end);
  const Index dcols = static_cast<Index>(t.dst_cols());
  const Index row_halves = static_cast<Index>(t.row_halves), col_halves = static_cast<Index>(t.col_halves);
  for (Index row = row_begin + blockIdx.y; row < row_end; row += gridDim.y) {
    const Index g = row / (row_halves * R);
    const Index rem = row - g * row_halves * R;
    const Index rh = rem / R;
    const Index r = rem - rh * R;
    const Index s_off = (g * R + r) * C + c;
    const Index d_off = (row - row_begin) * dcols + c;
    for (int i = 0; i < p.n; ++i) {
      const Acc scale = static_cast<Acc>(p.scale[i]);
      const V xs = *reinterpret_cast<const V*>(p.src[i] + s_off);
      const bool noisy = i == 0 && noise != nullptr;
      Acc x[VEC], e[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        x[k] = scale != Acc(0) ? static_cast<Acc>(xs.v[k]) * scale : Acc(0);
        e[k] = noisy ? static_cast<Acc>(noise[((g * row_halves + rh) * R + r) * C + c + k]) : Acc(0);
      }
      for (Index ch = 0; ch < col_halves; ++ch) {
        const bool diagonal = !t.block_diagonal || ch == rh;
        V out;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          Acc v;
          if (noisy) v = diagonal ? x[k] - e[k] : e[k];
          else v = diagonal ? x[k] : Acc(0);
          out.v[k] = static_cast<T>(v);
        }
        *reinterpret_cast<V*>(p.dst[i] + d_off + ch * C) = out;
      }
    }
  }
}

template <typename T, int VEC, typename Index>
void launch_with(const TensorSet<T>& p, const float* noise, const Tiling& t, const RowRange& range,
                 cudaStream_t stream) {
  const int64_t threads_x = (t.cols / VEC + kThreads - 1) / kThreads;
  const dim3 block(kThreads);
  const dim3 grid(static_cast<unsigned>(threads_x), static_cast<unsigned>(std::min<int64_t>(range.size(), 65535)));
  grow_tiles_kernel<T, VEC, Index><<<grid, block, 0, stream>>>(p, noise, t, range);
}

template <typename T>
void launch(const std::vector<int64_t>& idx, at::TensorList src, at::TensorList dst, at::ArrayRef<double> scale,
            const float* noise, const Tiling& t, const RowRange& range, cudaStream_t stream) {
  TensorSet<T> p{};
  p.n = static_cast<int>(idx.size());
  constexpr int kVec = 16 / sizeof(T) > 0 ? 16 / sizeof(T) : 1;
  bool aligned = t.cols % kVec == 0;
  for (int k = 0; k < p.n; ++k) {
    p.src[k] = static_cast<const T*>(src[idx[k]].data_ptr());
    p.dst[k] = static_cast<T*>(dst[idx[k]].data_ptr());
    p.scale[k] = static_cast<float>(scale[idx[k]]);
    aligned = aligned && reinterpret_cast<uintptr_t>(p.src[k]) % 16 == 0 && reinterpret_cast<uintptr_t>(p.dst[k]) % 16 == 0;
  }
  // Largest offset the kernel forms: below a whole destination's element count (a row range's, the
  // noise's and the source's offsets are smaller).
  const bool fits32 = t.dst_numel() < (int64_t(1) << 31) - kThreads * kVec;
  if (aligned && fits32) launch_with<T, kVec, int32_t>(p, noise, t, range, stream);
  else if (aligned) launch_with<T, kVec, int64_t>(p, noise, t, range, stream);
  else if (fits32) launch_with<T, 1, int32_t>(p, noise, t, range, stream);
  else launch_with<T, 1, int64_t>(p, noise, t, range, stream);
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, "grow_tiles_ (CUDA): launch failed: ", cudaGetErrorString(err));
}

void grow_tiles_cuda(at::TensorList src, at::TensorList dst, at::ArrayRef<double> scale, int64_t groups, int64_t rows,
                     int64_t cols, int64_t row_halves, int64_t col_halves, bool block_diagonal,
                     const c10::optional<at::Tensor>& noise, int64_t row_begin, c10::optional<int64_t> row_end) {
  const Tiling t = make_tiling(groups, rows, cols, row_halves, col_halves, block_diagonal);
  const RowRange range = make_row_range(t, row_begin, row_end);
  check_grow_args(src, dst, scale, t, range, noise);
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
  if (range.size() == 0) return;  // an empty shard: nothing to write (and a grid of 0 rows is invalid)
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
      case at::kFloat: launch<float>(idx, src, dst, scale, set_noise, t, range, stream); break;
      case at::kDouble: launch<double>(idx, src, dst, scale, set_noise, t, range, stream); break;
      case at::kHalf: launch<at::Half>(idx, src, dst, scale, set_noise, t, range, stream); break;
      case at::kBFloat16: launch<at::BFloat16>(idx, src, dst, scale, set_noise, t, range, stream); break;
      default: TORCH_CHECK(false, "grow_tiles_: unsupported dtype ", dst[i].scalar_type());
    }
  }
}

}  // namespace
}  // namespace staged_fast

TORCH_LIBRARY_IMPL(staged_fast, CUDA, m) { m.impl("grow_tiles_", &staged_fast::grow_tiles_cuda); }

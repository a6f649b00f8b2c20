// CPU (OpenMP) implementation of staged_fast::grow_tiles_ and the operator's schema (TORCH_LIBRARY).
//
// One pass: the work is split into (destination row, column chunk) items; each item writes that slice
// of every tensor given (parameter, exp_avg, exp_avg_sq) straight into its preallocated destination.
#include <torch/library.h>

#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "grow_op.h"

namespace staged_fast {
namespace {

constexpr int64_t kChunk = 1 << 14;  // columns per work item: 64 KiB of fp32, enough to amortize the loop

using RowFn = void (*)(const void*, void*, const float*, const Tiling&, double, int64_t, int64_t, int64_t);

template <typename T>
void row_fn(const void* src, void* dst, const float* noise, const Tiling& t, double scale, int64_t row, int64_t c0,
            int64_t c1) {
  using Acc = at::opmath_type<T>;
  grow_row<T, Acc>(static_cast<const T*>(src), static_cast<T*>(dst), noise, t, static_cast<Acc>(scale), row, c0, c1);
}

RowFn pick_row_fn(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return row_fn<float>;
    case at::kDouble: return row_fn<double>;
    case at::kHalf: return row_fn<at::Half>;
    case at::kBFloat16: return row_fn<at::BFloat16>;
    default: TORCH_CHECK(false, "grow_tiles_: unsupported dtype ", dtype);
  }
}

void grow_tiles_cpu(at::TensorList src, at::TensorList dst, at::ArrayRef<double> scale, int64_t groups, int64_t rows,
                    int64_t cols, int64_t row_halves, int64_t col_halves, bool block_diagonal,
                    const c10::optional<at::Tensor>& noise) {
  const Tiling t = make_tiling(groups, rows, cols, row_halves, col_halves, block_diagonal);
  check_grow_args(src, dst, scale, t, noise);
  const int64_t n = static_cast<int64_t>(src.size());
  std::vector<RowFn> fns;
  std::vector<const void*> s;
  std::vector<void*> d;
  for (int64_t i = 0; i < n; ++i) {
    fns.push_back(pick_row_fn(dst[i].scalar_type()));
    s.push_back(src[i].data_ptr());
    d.push_back(dst[i].data_ptr());
  }
  const float* nz = (noise.has_value() && noise->defined()) ? noise->data_ptr<float>() : nullptr;
  const int64_t chunks = (t.cols + kChunk - 1) / kChunk;
  const int64_t items = t.dst_rows() * chunks;
  const bool parallel = t.dst_numel() * n >= (1 << 16);  // small tensors: threads cost more than they save
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t item = 0; item < items; ++item) {
    const int64_t row = item / chunks, chunk = item - row * chunks;
    const int64_t c0 = chunk * kChunk, c1 = std::min(t.cols, c0 + kChunk);
    for (int64_t i = 0; i < n; ++i) fns[i](s[i], d[i], i == 0 ? nz : nullptr, t, scale[i], row, c0, c1);
  }
}

}  // namespace
}  // namespace staged_fast

TORCH_LIBRARY(staged_fast, m) {
  // Writes the width/depth-grown form of each src[i] (scaled by scale[i]) into the preallocated dst[i];
  // the tiling (groups, rows, cols, row_halves, col_halves, block_diagonal) is defined in
  // staged_fast/growth/index_maps.py. noise (float32 (groups, row_halves, rows, cols)) splits the block
  // rows of the first tensor into [W - E, E].
  m.def(
      "grow_tiles_(Tensor[] src, Tensor(a!)[] dst, float[] scale, int groups, int rows, int cols, "
      "int row_halves, int col_halves, bool block_diagonal, Tensor? noise) -> ()");
}

TORCH_LIBRARY_IMPL(staged_fast, CPU, m) { m.impl("grow_tiles_", &staged_fast::grow_tiles_cpu); }

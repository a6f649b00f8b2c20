// CPU (OpenMP) implementation of staged_fast::grow_tiles_ and the operator's schema (TORCH_LIBRARY).
//
// One pass: the work is split into (destination row, column chunk) items; each item writes that slice
// of every tensor given (parameter, exp_avg, exp_avg_sq) straight into its preallocated destination,
// which holds the destination rows [row_begin, row_end) (default: all of them).
#include <torch/library.h>

#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "grow_op.h"

namespace staged_fast {
namespace {

constexpr int64_t kChunk = 1 << 14;  // columns per work item: 64 KiB of fp32, enough to amortize the loop

// dst: the destination buffer (rows [rows.begin, rows.end)); row: a global destination row in that range.
using RowFn = void (*)(const void*, void*, const float*, const Tiling&, const RowRange&, double, int64_t, int64_t,
                       int64_t);

template <typename T>
void row_fn(const void* src, void* dst, const float* noise, const Tiling& t, const RowRange& rows, double scale,
            int64_t row, int64_t c0, int64_t c1) {
  using Acc = at::opmath_type<T>;
  T* dst_row = static_cast<T*>(dst) + (row - rows.begin) * t.dst_cols();
  grow_row<T, Acc>(static_cast<const T*>(src), dst_row, noise, t, static_cast<Acc>(scale), row, c0, c1);
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
                    const c10::optional<at::Tensor>& noise, int64_t row_begin, c10::optional<int64_t> row_end) {
  const Tiling t = make_tiling(groups, rows, cols, row_halves, col_halves, block_diagonal);
  const RowRange range = make_row_range(t, row_begin, row_end);
  check_grow_args(src, dst, scale, t, range, noise);
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
  const int64_t items = range.size() * chunks;
  const bool parallel = range.size() * t.dst_cols() * n >= (1 << 16);  // small: threads cost more than they save
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t item = 0; item < items; ++item) {
    const int64_t local = item / chunks, chunk = item - local * chunks;
    const int64_t c0 = chunk * kChunk, c1 = std::min(t.cols, c0 + kChunk);
    for (int64_t i = 0; i < n; ++i)
      fns[i](s[i], d[i], i == 0 ? nz : nullptr, t, range, scale[i], range.begin + local, c0, c1);
  }
}

}  // namespace
}  // namespace staged_fast

TORCH_LIBRARY(staged_fast, m) {
  // Writes the width/depth-grown form of each src[i] (scaled by scale[i]) into the preallocated dst[i];
  // the tiling (groups, rows, cols, row_halves, col_halves, block_diagonal) is defined in
  // staged_fast/growth/index_maps.py. noise (float32 (groups, row_halves, rows, cols)) splits the block
  // rows of the first tensor into [W - E, E]. row_begin/row_end: dst[i] holds only the destination rows
  // [row_begin, row_end) of the flattened-2D destination (groups*row_halves*rows x col_halves*cols), e.g.
  // one rank's FSDP shard; src and noise stay whole. Default: every row.
  m.def(
      "grow_tiles_(Tensor[] src, Tensor(a!)[] dst, float[] scale, int groups, int rows, int cols, "
      "int row_halves, int col_halves, bool block_diagonal, Tensor? noise, int row_begin=0, int? row_end=None) -> ()");
}

TORCH_LIBRARY_IMPL(staged_fast, CPU, m) { m.impl("grow_tiles_", &staged_fast::grow_tiles_cpu); }

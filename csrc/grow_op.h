// Argument checks of staged_fast::grow_tiles_, shared by the CPU and the CUDA implementation.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include "grow_tiles.h"

namespace staged_fast {
// Internal linkage: each translation unit (g++ for grow_cpu.cpp, nvcc's host pass for grow_cuda.cu) keeps
// its own copy. As plain `inline` functions the linker kept one of the two for both, and a CUDA build
// on the H200 (torch 2.11, nvcc 13.0) crashed (SIGSEGV) when the CPU kernel's argument check threw
// (tests/test_ext_ops.py::test_bad_arguments_raise). That sharing is the suspected cause, removed here;
// the fix has not yet been re-run on a GPU (benchmarks/RESULTS.md).
namespace {

inline Tiling make_tiling(int64_t groups, int64_t rows, int64_t cols, int64_t row_halves, int64_t col_halves,
                          bool block_diagonal) {
  Tiling t{groups, rows, cols, row_halves, col_halves, block_diagonal};
  TORCH_CHECK(t.valid(), "grow_tiles_: invalid tiling groups=", groups, " rows=", rows, " cols=", cols,
              " row_halves=", row_halves, " col_halves=", col_halves, " (sizes > 0, halves 1 or 2)");
  return t;
}

// Destination rows [row_begin, row_end) (row_end absent: every row) of the tiling's t.dst_rows().
inline RowRange make_row_range(const Tiling& t, int64_t row_begin, const c10::optional<int64_t>& row_end) {
  RowRange r{row_begin, row_end.has_value() ? *row_end : t.dst_rows()};
  TORCH_CHECK(r.valid_for(t), "grow_tiles_: invalid destination row range [", r.begin, ", ", r.end,
              "): the tiling has ", t.dst_rows(), " destination rows (0 <= row_begin <= row_end <= rows)");
  return r;
}

// src[i] -> dst[i] with scale[i]; noise (float32, (G, RH, R, C)) applies to the first pair only. dst[i]
// holds destination rows [rows.begin, rows.end) only; src[i] and noise are whole.
inline void check_grow_args(const at::TensorList& src, const at::TensorList& dst, const at::ArrayRef<double>& scale,
                            const Tiling& t, const RowRange& rows, const c10::optional<at::Tensor>& noise) {
  TORCH_CHECK(!src.empty() && src.size() <= 4, "grow_tiles_: give 1 to 4 tensors (param, exp_avg, exp_avg_sq, "
              "max_exp_avg_sq), got ", src.size());
  TORCH_CHECK(src.size() == dst.size() && src.size() == scale.size(),
              "grow_tiles_: src, dst and scale must have the same length, got ", src.size(), ", ", dst.size(), ", ",
              scale.size());
  const auto device = dst[0].device();
  for (size_t i = 0; i < src.size(); ++i) {
    TORCH_CHECK(src[i].device() == device && dst[i].device() == device,
                "grow_tiles_: all tensors must be on one device (", device, ")");
    TORCH_CHECK(src[i].scalar_type() == dst[i].scalar_type(), "grow_tiles_: src[", i, "] is ", src[i].scalar_type(),
                " but dst[", i, "] is ", dst[i].scalar_type());
    TORCH_CHECK(src[i].is_contiguous() && dst[i].is_contiguous(), "grow_tiles_: tensors must be contiguous");
    for (const at::Tensor* x : {&src[i], &dst[i]}) {  // a storage freed (resized to 0) under a live tensor
      TORCH_CHECK(x->storage().nbytes() >= static_cast<size_t>((x->storage_offset() + x->numel()) * x->itemsize()),
                  "grow_tiles_: a tensor's storage holds ", x->storage().nbytes(), " bytes, fewer than its ",
                  x->numel(), " elements need (was its memory released?)");
    }
    TORCH_CHECK(src[i].numel() == t.src_numel(), "grow_tiles_: src[", i, "] has ", src[i].numel(),
                " elements, the tiling needs ", t.src_numel());
    TORCH_CHECK(dst[i].numel() == rows.size() * t.dst_cols(), "grow_tiles_: dst[", i, "] has ", dst[i].numel(),
                " elements, the tiling writes ", rows.size() * t.dst_cols(), " (rows [", rows.begin, ", ", rows.end,
                ") of ", t.dst_cols(), ")");
    TORCH_CHECK(at::isFloatingType(dst[i].scalar_type()), "grow_tiles_: floating tensors only, got ",
                dst[i].scalar_type());
    const char* s0 = static_cast<const char*>(src[i].data_ptr());
    const char* d0 = static_cast<const char*>(dst[i].data_ptr());
    TORCH_CHECK(d0 + dst[i].nbytes() <= s0 || s0 + src[i].nbytes() <= d0, "grow_tiles_: dst[", i,
                "] overlaps src[", i, "]");
  }
  if (noise.has_value() && noise->defined()) {
    TORCH_CHECK(noise->scalar_type() == at::kFloat && noise->is_contiguous() && noise->device() == device,
                "grow_tiles_: noise must be a contiguous float32 tensor on ", device);
    TORCH_CHECK(noise->numel() == t.groups * t.row_halves * t.rows * t.cols,
                "grow_tiles_: noise must have groups*row_halves*rows*cols elements");
    TORCH_CHECK(t.block_diagonal, "grow_tiles_: noise splits block rows [W - E, E]; the tiling is not block-diagonal");
  }
}

}  // namespace
}  // namespace staged_fast

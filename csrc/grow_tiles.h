// Tile-growth core shared by the CPU (OpenMP) kernel, the CUDA kernel's host checks and the C++ unit
// test. Torch-free on purpose: the unit test builds it without libtorch.
//
// A call may write only destination rows [row_begin, row_end) of the flattened-2D destination
// (t.dst_rows() x t.dst_cols()) into a buffer holding just those rows; the source and the noise stay whole.
//
// The index map is defined once, in staged_fast/growth/index_maps.py; this header implements it:
// source viewed as (G, R, C), destination as (G, RH, R, CH, C); tile (g, rh, ch) is
//   diagonal (rh == ch, or !block_diagonal):  scale * src[g]   (- noise[g, rh] when noise is given)
//   off-diagonal:                             +0.0             (+ noise[g, rh] when noise is given)
// scale == 0 writes +0.0 without reading the source (so -0.0 / NaN sources do not leak).
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define SF_HOST_DEVICE __host__ __device__
#else
#define SF_HOST_DEVICE
#endif

namespace staged_fast {

struct Tiling {
  int64_t groups, rows, cols, row_halves, col_halves;
  bool block_diagonal;

  SF_HOST_DEVICE int64_t dst_rows() const { return groups * row_halves * rows; }
  SF_HOST_DEVICE int64_t dst_cols() const { return col_halves * cols; }
  SF_HOST_DEVICE int64_t src_numel() const { return groups * rows * cols; }
  SF_HOST_DEVICE int64_t dst_numel() const { return dst_rows() * dst_cols(); }
  SF_HOST_DEVICE bool valid() const {
    return groups > 0 && rows > 0 && cols > 0 && (row_halves == 1 || row_halves == 2) &&
           (col_halves == 1 || col_halves == 2);
  }
};

// The destination rows one call writes: [begin, end) with 0 <= begin <= end <= t.dst_rows().
struct RowRange {
  int64_t begin, end;

  SF_HOST_DEVICE int64_t size() const { return end - begin; }
  SF_HOST_DEVICE bool valid_for(const Tiling& t) const { return 0 <= begin && begin <= end && end <= t.dst_rows(); }
};

// Write columns [c0, c1) of every tile of destination row `row` (0 <= row < t.dst_rows(),
// 0 <= c0 < c1 <= t.cols) of one tensor into `dst_row`, the first of that row's t.dst_cols() elements
// (so a destination may hold only a range of rows: FSDP's shard of a grown tensor); callers split long
// rows into column chunks for parallelism. `src` and `noise` are whole (every row of the tiling).
// Acc is the arithmetic type (float for float/half/bfloat16, double for double), T the storage type.
// Every source and noise element is read once per tile, every destination element written once.
template <typename T, typename Acc>
inline void grow_row(const T* src, T* dst_row, const float* noise, const Tiling& t, Acc scale, int64_t row,
                     int64_t c0, int64_t c1) {
  const int64_t R = t.rows, C = t.cols;
  const int64_t g = row / (t.row_halves * R);
  const int64_t rem = row - g * t.row_halves * R;
  const int64_t rh = rem / R;
  const int64_t r = rem - rh * R;
  const T* s = src + (g * R + r) * C;
  const float* n = noise ? noise + ((g * t.row_halves + rh) * R + r) * C : nullptr;
  T* d = dst_row;
  for (int64_t ch = 0; ch < t.col_halves; ++ch, d += C) {
    const bool diagonal = !t.block_diagonal || ch == rh;
    if (diagonal && scale != Acc(0)) {
      if (n) {
        for (int64_t c = c0; c < c1; ++c) d[c] = static_cast<T>(static_cast<Acc>(s[c]) * scale - static_cast<Acc>(n[c]));
      } else {
        for (int64_t c = c0; c < c1; ++c) d[c] = static_cast<T>(static_cast<Acc>(s[c]) * scale);
      }
    } else if (n) {
      if (diagonal) {  // scale == 0: 0 - E
        for (int64_t c = c0; c < c1; ++c) d[c] = static_cast<T>(Acc(0) - static_cast<Acc>(n[c]));
      } else {
        for (int64_t c = c0; c < c1; ++c) d[c] = static_cast<T>(static_cast<Acc>(n[c]));
      }
    } else {
      for (int64_t c = c0; c < c1; ++c) d[c] = static_cast<T>(Acc(0));
    }
  }
}

}  // namespace staged_fast

// C++ unit test of the tile-growth core (grow_tiles.h), run by ctest; no libtorch needed.
// Checks every tiling kind of staged_fast/growth/index_maps.py on small hand-made tensors, against
// expectations written out element by element. Exit code 0 = pass, 1 = fail (with a message).
#include <cmath>
#include <cstdio>
#include <vector>

#include "grow_tiles.h"

using staged_fast::Tiling;

static int failures = 0;

// Destination rows [begin, end) (default: all) into a buffer holding just those rows.
static std::vector<float> grow(const std::vector<float>& src, const Tiling& t, float scale, const float* noise,
                               int64_t begin = 0, int64_t end = -1) {
  if (end < 0) end = t.dst_rows();
  std::vector<float> dst((end - begin) * t.dst_cols(), -7.f);
  for (int64_t row = begin; row < end; ++row)
    staged_fast::grow_row<float, float>(src.data(), dst.data() + (row - begin) * t.dst_cols(), noise, t, scale, row,
                                        0, t.cols);
  return dst;
}

static void expect(const char* name, const std::vector<float>& got, const std::vector<float>& want) {
  bool ok = got.size() == want.size();
  for (size_t i = 0; ok && i < got.size(); ++i) ok = got[i] == want[i];
  if (!ok) {
    ++failures;
    std::printf("FAIL %s: got", name);
    for (float v : got) std::printf(" %g", v);
    std::printf("\n");
  } else {
    std::printf("ok   %s\n", name);
  }
}

int main() {
  // MATRIX (block diagonal): [[1,2],[3,4]] -> [[1,2,0,0],[3,4,0,0],[0,0,1,2],[0,0,3,4]]
  expect("matrix", grow({1, 2, 3, 4}, Tiling{1, 2, 2, 2, 2, true}, 1.f, nullptr),
         {1, 2, 0, 0, 3, 4, 0, 0, 0, 0, 1, 2, 0, 0, 3, 4});
  // exp_avg_sq scale 1/4
  expect("matrix/4", grow({4, 8, 12, 16}, Tiling{1, 2, 2, 2, 2, true}, 0.25f, nullptr),
         {1, 2, 0, 0, 3, 4, 0, 0, 0, 0, 1, 2, 0, 0, 3, 4});
  // MATRIX with noise E (1, 2, 1, 2): row block rh becomes [W - E_rh, E_rh] / [E_rh, W - E_rh]
  const float noise[] = {0.5f, 0.25f, 1.f, 2.f};
  expect("matrix+noise", grow({1, 2}, Tiling{1, 1, 2, 2, 2, true}, 1.f, noise), {0.5f, 1.75f, 0.5f, 0.25f, 1, 2, 0, 0});
  // QKV_WEIGHT: 3 groups of (1 x 1): q=1, k=2, v=3 -> per group [[x,0],[0,x]]
  expect("qkv", grow({1, 2, 3}, Tiling{3, 1, 1, 2, 2, true}, 1.f, nullptr), {1, 0, 0, 1, 2, 0, 0, 2, 3, 0, 0, 3});
  // QKV_BIAS: [bq, bk, bv] (n = 2 each) -> [bq, bq, bk, bk, bv, bv]
  expect("qkv_bias", grow({1, 2, 3, 4, 5, 6}, Tiling{3, 1, 2, 2, 1, false}, 1.f, nullptr),
         {1, 2, 1, 2, 3, 4, 3, 4, 5, 6, 5, 6});
  // EMBEDDING: (2, 2) -> [W, W] along columns
  expect("embedding", grow({1, 2, 3, 4}, Tiling{1, 2, 2, 1, 2, false}, 1.f, nullptr), {1, 2, 1, 2, 3, 4, 3, 4});
  // VECTOR and LN_F: [b, b] and [b, b] / 2
  expect("vector", grow({1, 2, 3}, Tiling{1, 1, 3, 2, 1, false}, 1.f, nullptr), {1, 2, 3, 1, 2, 3});
  expect("ln_f", grow({1, 2}, Tiling{1, 1, 2, 2, 1, false}, 0.5f, nullptr), {0.5f, 1, 0.5f, 1});
  // COPY with scale 0 writes +0.0 even from -0.0 / NaN sources
  std::vector<float> z = grow({-0.f, 0.f / 0.f}, Tiling{1, 1, 2, 1, 1, false}, 0.f, nullptr);
  expect("zero", z, {0, 0});
  if (std::signbit(z[0])) { ++failures; std::printf("FAIL zero: -0.0 leaked\n"); }
  // Column chunks compose: two half-row calls equal one full-row call.
  {
    Tiling t{1, 1, 4, 2, 2, true};
    std::vector<float> src = {1, 2, 3, 4}, dst(t.dst_numel(), -7.f);
    for (int64_t row = 0; row < t.dst_rows(); ++row) {
      float* d = dst.data() + row * t.dst_cols();
      staged_fast::grow_row<float, float>(src.data(), d, nullptr, t, 1.f, row, 0, 2);
      staged_fast::grow_row<float, float>(src.data(), d, nullptr, t, 1.f, row, 2, 4);
    }
    expect("chunks", dst, grow(src, t, 1.f, nullptr));
  }
  // Row ranges (one FSDP shard of the destination): rows [1, 3) of MATRIX are the middle rows of the whole.
  expect("matrix rows [1,3)", grow({1, 2, 3, 4}, Tiling{1, 2, 2, 2, 2, true}, 1.f, nullptr, 1, 3),
         {3, 4, 0, 0, 0, 0, 1, 2});
  // ... with noise: a range reads the whole noise at its global rows
  expect("matrix+noise rows [1,2)", grow({1, 2}, Tiling{1, 1, 2, 2, 2, true}, 1.f, noise, 1, 2), {1, 2, 0, 0});
  // QKV_BIAS as one element per row (groups 3, rows n, cols 1): rows [3, 5) of [bq, bq, bk, bk, bv, bv]
  expect("qkv_bias column rows [3,5)", grow({1, 2, 3, 4, 5, 6}, Tiling{3, 2, 1, 2, 1, false}, 1.f, nullptr, 3, 5),
         {2, 3});
  // An empty range writes nothing; ranges that tile the rows compose to the whole.
  expect("empty range", grow({1, 2, 3, 4}, Tiling{1, 2, 2, 2, 2, true}, 1.f, nullptr, 2, 2), {});
  {
    const Tiling t{3, 2, 3, 2, 2, true};
    std::vector<float> src(t.src_numel());
    for (size_t i = 0; i < src.size(); ++i) src[i] = float(i + 1);
    std::vector<float> joined = grow(src, t, 0.5f, nullptr, 0, 5), tail = grow(src, t, 0.5f, nullptr, 5, t.dst_rows());
    joined.insert(joined.end(), tail.begin(), tail.end());
    expect("ranges compose", joined, grow(src, t, 0.5f, nullptr));
  }
  if (!(staged_fast::RowRange{0, 4}.valid_for(Tiling{1, 2, 2, 2, 2, true})) ||
      staged_fast::RowRange{2, 5}.valid_for(Tiling{1, 2, 2, 2, 2, true}) ||
      staged_fast::RowRange{3, 2}.valid_for(Tiling{1, 2, 2, 2, 2, true})) {
    ++failures;
    std::printf("FAIL RowRange::valid_for\n");
  }
  std::printf(failures ? "%d FAILED\n" : "all passed\n", failures);
  return failures ? 1 : 0;
}

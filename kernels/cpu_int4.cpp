// x W^T for a linear whose weight stays 4 bits a value on CPU (issue 15): GPTQ / AWQ checkpoints
// (worker/gptq.py's PackedWeight) and GGUF's Q4_0 / Q4_1 blocks (worker/gguf_weights.py), without
// expanding the whole weight in memory at every call as their torch twins do. Compiled into
// kernels/cpu_fused.py's extension (-ffp-contract=off) and bound there.
//
// Each weight is the fp32 value the twin's dequantize makes (the same operations, no fused
// rounding), rounded to x's dtype as the twin's `.to(x.dtype)`; the products are summed in fp32
// with fused multiply-adds in input-row order, which is where the result differs from the twin's
// matmul (by fp32 rounding, as any two BLAS orders differ).

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kCols = 16;  // a panel: 16 output columns of W^T, every input row, expanded at once
constexpr int kTileRows = 8;   // rows of x whose 16 sums stay in registers while a panel streams by

template <typename T>
inline float rounded(float w) {
  return static_cast<float>(static_cast<T>(w));
}

// panel[i, l] = W^T[i, o0 + l] for l < cols (0 past them): the 4-bit value q of input row i (byte
// [i / 2, o] of `values`, row 2r in the low nibble and 2r + 1 in the high one), with its group's
// pair (a, b) (group i / run): (q - a) * b when `zero_first` (GPTQ / AWQ zero and scale; Q4_0 with
// a = 8), else q * a + b (Q4_1 scale and minimum).
template <typename T>
void expand_panel(const uint8_t* values, const float* a, const float* b, int64_t in, int64_t out, int64_t run,
                  bool zero_first, int64_t o0, int64_t cols, float* panel) {
  for (int64_t i = 0; i < in; ++i) {
    const uint8_t* v = values + (i / 2) * out + o0;
    const int shift = static_cast<int>(i & 1) * 4;
    const float* ag = a + (i / run) * out + o0;
    const float* bg = b + (i / run) * out + o0;
    float* p = panel + i * kCols;
    if (cols == kCols && zero_first) {
#pragma omp simd
      for (int64_t l = 0; l < kCols; ++l) p[l] = rounded<T>((static_cast<float>((v[l] >> shift) & 0xF) - ag[l]) * bg[l]);
    } else if (cols == kCols) {
#pragma omp simd
      for (int64_t l = 0; l < kCols; ++l) p[l] = rounded<T>(static_cast<float>((v[l] >> shift) & 0xF) * ag[l] + bg[l]);
    } else {
      for (int64_t l = 0; l < kCols; ++l) {
        const float q = l < cols ? static_cast<float>((v[l] >> shift) & 0xF) : 0.f;
        p[l] = l >= cols ? 0.f : rounded<T>(zero_first ? (q - ag[l]) * bg[l] : q * ag[l] + bg[l]);
      }
    }
  }
}

// y[t, o0 + l] = sum_i x[t, i] panel[i, l] for M rows t and the panel's `cols` columns.
template <typename T, int M>
void tile(const T* const* xr, const float* panel, int64_t in, T* const* yr, int64_t o0, int64_t cols) {
  float acc[M][kCols] = {};
  for (int64_t i = 0; i < in; ++i) {
    const float* w = panel + i * kCols;
    for (int t = 0; t < M; ++t) {
      const float xv = static_cast<float>(xr[t][i]);
#pragma omp simd
      for (int64_t l = 0; l < kCols; ++l) acc[t][l] = std::fma(xv, w[l], acc[t][l]);
    }
  }
  for (int t = 0; t < M; ++t)
    for (int64_t l = 0; l < cols; ++l) yr[t][o0 + l] = static_cast<T>(acc[t][l]);
}

template <typename T>
void tile_rows(const T* const* xr, const float* panel, int64_t in, T* const* yr, int64_t o0, int64_t cols, int m) {
  switch (m) {
    case 1: tile<T, 1>(xr, panel, in, yr, o0, cols); break;
    case 2: tile<T, 2>(xr, panel, in, yr, o0, cols); break;
    case 3: tile<T, 3>(xr, panel, in, yr, o0, cols); break;
    case 4: tile<T, 4>(xr, panel, in, yr, o0, cols); break;
    case 5: tile<T, 5>(xr, panel, in, yr, o0, cols); break;
    case 6: tile<T, 6>(xr, panel, in, yr, o0, cols); break;
    case 7: tile<T, 7>(xr, panel, in, yr, o0, cols); break;
    default: tile<T, kTileRows>(xr, panel, in, yr, o0, cols); break;
  }
}

template <typename T>
void int4_linear_impl(const at::Tensor& x, const at::Tensor& values, const at::Tensor& a, const at::Tensor& b,
                      int64_t run, bool zero_first, at::Tensor& y) {
  const int64_t rows = x.size(0), in = x.size(1), out = values.size(1);
  const int64_t x_stride = x.stride(0), y_stride = y.stride(0);
  const T* xp = x.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  const uint8_t* vp = values.data_ptr<uint8_t>();
  const float* ap = a.data_ptr<float>();
  const float* bp = b.data_ptr<float>();
  const int64_t panels = (out + kCols - 1) / kCols;
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> panel(in * kCols);
    const T* xr[kTileRows];
    T* yr[kTileRows];
    for (int64_t n = begin; n < end; ++n) {
      const int64_t o0 = n * kCols, cols = std::min(kCols, out - o0);
      expand_panel<T>(vp, ap, bp, in, out, run, zero_first, o0, cols, panel.data());
      for (int64_t t0 = 0; t0 < rows; t0 += kTileRows) {
        const int m = static_cast<int>(std::min<int64_t>(kTileRows, rows - t0));
        for (int t = 0; t < m; ++t) {
          xr[t] = xp + (t0 + t) * x_stride;
          yr[t] = yp + (t0 + t) * y_stride;
        }
        tile_rows<T>(xr, panel.data(), in, yr, o0, cols, m);
      }
    }
  });
}

}  // namespace

// y = x W^T into y's columns (y may be a column slice of a wider output: rows strided, columns
// contiguous). x: [rows, in] fp32 / bf16 / fp16; values: uint8 [in / 2, out]; a, b: fp32
// [ceil(in / run), out], the pair of each run of `run` input rows (the last run may be shorter).
void int4_linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& a, const at::Tensor& b,
                 int64_t run, bool zero_first, at::Tensor y) {
  TORCH_CHECK(x.device().is_cpu() && values.device().is_cpu() && y.device().is_cpu(), "int4_linear runs on CPU");
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && (x.size(0) == 0 || (x.stride(1) == 1 && y.stride(1) == 1)),
              "x and y must be [rows, features] with contiguous rows");
  TORCH_CHECK(values.scalar_type() == at::kByte && values.dim() == 2 && values.is_contiguous() &&
                  values.size(0) * 2 == x.size(1),
              "values must be contiguous uint8 [in / 2, out] for x's in");
  TORCH_CHECK(run >= 1, "run must be at least 1");
  const int64_t groups = (x.size(1) + run - 1) / run, out = values.size(1);
  for (const auto* t : {&a, &b}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 2 && t->size(0) == groups &&
                    t->size(1) == out,
                "a and b must be contiguous fp32 [groups, out]");
  }
  TORCH_CHECK(y.size(0) == x.size(0) && y.size(1) == out && y.scalar_type() == x.scalar_type(),
              "y must be [rows, out] in x's dtype");
  switch (x.scalar_type()) {
    case at::kFloat: int4_linear_impl<float>(x, values, a, b, run, zero_first, y); break;
    case at::kBFloat16: int4_linear_impl<at::BFloat16>(x, values, a, b, run, zero_first, y); break;
    case at::kHalf: int4_linear_impl<at::Half>(x, values, a, b, run, zero_first, y); break;
    default: TORCH_CHECK(false, "int4_linear: unsupported dtype ", x.scalar_type());
  }
}

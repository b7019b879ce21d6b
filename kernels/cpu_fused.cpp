// Fused CPU ops for the decode step (issue 10): each replaces a run of small torch ops whose
// dispatch, not their arithmetic, dominated the step on CPU. Built on first use by
// kernels/cpu_fused.py (torch.utils.cpp_extension, -ffp-contract=off so every product and sum is
// rounded as the torch twin rounds it); every op has that twin and a test against it.
//
// Rounding: fp32 tensors compute in fp32; bf16/fp16 tensors compute each step in fp32 and round to
// the tensor's dtype where the torch twin's op would produce a tensor of that dtype.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

template <typename T>
inline T round_to(float x) {
  return static_cast<T>(x);
}

// sum_d a[d] * float(b[d]); a in fp32. Reductions (here, and the accumulation in axpy) have no
// torch-identical order to keep, so they use fused multiply-adds explicitly; elementwise ops don't.
template <typename T>
inline float dot(const float* a, const T* b, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t d = 0; d < n; ++d) acc = std::fma(a[d], static_cast<float>(b[d]), acc);
  return acc;
}

// acc[d] += p * float(v[d]).
template <typename T>
inline void axpy(float* acc, float p, const T* v, int64_t n) {
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) acc[d] = std::fma(p, static_cast<float>(v[d]), acc[d]);
}

// exp(x), written so the compiler vectorizes it (libm's expf is a scalar call): x = n ln2 + r,
// |r| <= ln2 / 2, e^r by a degree-6 polynomial, 2^n by the exponent bits. A few ulp from expf on
// [-87, 88]; x is clamped to that range (below it the result is ~1e-38 instead of a denormal or 0).
inline float exp_approx(float x) {
  x = std::min(std::max(x, -87.f), 88.f);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = std::fma(n, -0.693359375f, std::fma(n, 2.12194440e-4f, x));
  float p = 1.3981999507e-3f;
  p = std::fma(p, r, 8.3334519073e-3f);
  p = std::fma(p, r, 4.1665795894e-2f);
  p = std::fma(p, r, 1.6666665459e-1f);
  p = std::fma(p, r, 5.0000001201e-1f);
  p = std::fma(p, r * r, r + 1.f);
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// x = softmax(x) in place (n >= 1).
inline void softmax_(float* x, int64_t n) {
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; ++j) mx = std::max(mx, x[j]);
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    x[j] = exp_approx(x[j] - mx);
    sum += x[j];
  }
  const float inv = 1.f / sum;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) x[j] *= inv;
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
}

// weight * (x * rsqrt(mean(x^2) + eps)), Llama's rounding (normalised x rounded to the dtype before
// the weight); with offset (Gemma): (x * r) * (offset + weight) in fp32, rounded once.
template <typename T>
void rms_norm_row(const T* x, const T* w, T* out, int64_t n, float eps, float offset) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < n; ++i) {
    const float v = static_cast<float>(x[i]);
    ss += v * v;
  }
  const float r = 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
  if (offset != 0.f) {
    for (int64_t i = 0; i < n; ++i) {
      out[i] = round_to<T>((static_cast<float>(x[i]) * r) * (offset + static_cast<float>(w[i])));
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const T normed = round_to<T>(static_cast<float>(x[i]) * r);
      out[i] = round_to<T>(static_cast<float>(w[i]) * static_cast<float>(normed));
    }
  }
}

// out = rms_norm(h + delta); h is updated in place to h + delta (the residual stream). delta may be
// undefined: then h is only normalised.
at::Tensor add_rms_norm(at::Tensor h, const c10::optional<at::Tensor>& delta, const at::Tensor& weight,
                        double eps, double offset) {
  check_cpu(h, "h");
  TORCH_CHECK(h.dim() == 2 && h.is_contiguous(), "h must be a contiguous [tokens, hidden] tensor");
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == h.size(1) && weight.scalar_type() == h.scalar_type(),
              "weight must be [hidden] of h's dtype");
  const bool add = delta.has_value() && delta->defined();
  if (add) {
    TORCH_CHECK(delta->sizes() == h.sizes() && delta->scalar_type() == h.scalar_type(),
                "delta must match h");
  }
  at::Tensor d = add ? delta->contiguous() : at::Tensor();
  auto out = at::empty_like(h);
  const int64_t rows = h.size(0), n = h.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "add_rms_norm", [&] {
    scalar_t* hp = h.data_ptr<scalar_t>();
    const scalar_t* dp = add ? d.data_ptr<scalar_t>() : nullptr;
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        scalar_t* x = hp + t * n;
        if (dp != nullptr) {
          const scalar_t* y = dp + t * n;
          for (int64_t i = 0; i < n; ++i) {
            x[i] = round_to<scalar_t>(static_cast<float>(x[i]) + static_cast<float>(y[i]));
          }
        }
        rms_norm_row(x, wp, op + t * n, n, static_cast<float>(eps), static_cast<float>(offset));
      }
    });
  });
  return out;
}

// o = silu(g) * u, silu rounded to T first as torch's F.silu(gate) * up rounds it.
template <typename T>
inline void silu_mul_row(const T* g, const T* u, T* o, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float gv = static_cast<float>(g[i]);
    const T act = round_to<T>(gv / (1.f + exp_approx(-gv)));
    o[i] = round_to<T>(static_cast<float>(act) * static_cast<float>(u[i]));
  }
}

// silu(gate) * up over x = [gate | up] ([tokens, 2 * inter]) -> [tokens, inter].
at::Tensor silu_and_mul(const at::Tensor& x) {
  check_cpu(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.size(1) % 2 == 0, "x must be [tokens, 2 * inter], rows contiguous");
  const int64_t rows = x.size(0), inter = x.size(1) / 2, row_stride = x.stride(0);
  auto out = at::empty({rows, inter}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "silu_and_mul", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t* g = xp + t * row_stride;
        const scalar_t* u = g + inter;
        scalar_t* o = op + t * inter;
        silu_mul_row(g, u, o, inter);
      }
    });
  });
  return out;
}

// Rotates q's and k's heads of each qkv row in place (x * cos + rotate_half(x) * sin over the first
// rot dims of each head, as HF's rotate_half does) and writes the token's k and v heads to the paged
// caches at slot_mapping[t] (slot < 0: a padding row, nothing stored).
// qkv: [tokens, (heads + 2 * kv_heads) * head_dim], rows contiguous; cos, sin: [tokens, rot] (any
// middle dims of size 1); caches: [blocks, block_size, kv_heads, head_dim].
void rotary_store(at::Tensor qkv, int64_t heads, int64_t kv_heads, int64_t head_dim, const at::Tensor& cos,
                  const at::Tensor& sin, at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& slot_mapping) {
  check_cpu(qkv, "qkv");
  TORCH_CHECK(qkv.dim() == 2 && qkv.stride(1) == 1, "qkv must be [tokens, width] with contiguous rows");
  TORCH_CHECK(qkv.size(1) == (heads + 2 * kv_heads) * head_dim, "qkv's width does not match the heads");
  const int64_t tokens = qkv.size(0), row_stride = qkv.stride(0);
  const int64_t rot = cos.size(-1);
  TORCH_CHECK(rot <= head_dim && rot % 2 == 0, "rotary dims must be even and at most head_dim");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.numel() == tokens * rot && sin.numel() == tokens * rot,
              "cos and sin must be contiguous [tokens, rot]");
  TORCH_CHECK(cos.scalar_type() == qkv.scalar_type() && sin.scalar_type() == qkv.scalar_type(),
              "cos and sin must have qkv's dtype");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.dim() == 4 &&
                  k_cache.size(2) == kv_heads && k_cache.size(3) == head_dim && v_cache.sizes() == k_cache.sizes(),
              "caches must be contiguous [blocks, block_size, kv_heads, head_dim]");
  TORCH_CHECK(k_cache.scalar_type() == qkv.scalar_type() && v_cache.scalar_type() == qkv.scalar_type(),
              "caches must have qkv's dtype");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.numel() == tokens && slot_mapping.is_contiguous(),
              "slot_mapping must be int64 [tokens]");
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1);
  const int64_t kv_width = kv_heads * head_dim, half = rot / 2;
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t) {
    TORCH_CHECK(slots[t] < num_slots, "slot ", slots[t], " is outside the cache");
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(), "rotary_store", [&] {
    scalar_t* base = qkv.data_ptr<scalar_t>();
    const scalar_t* cp = cos.data_ptr<scalar_t>();
    const scalar_t* sp = sin.data_ptr<scalar_t>();
    scalar_t* kc = k_cache.data_ptr<scalar_t>();
    scalar_t* vc = v_cache.data_ptr<scalar_t>();
    at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
      std::vector<float> tmp(half);
      for (int64_t t = begin; t < end; ++t) {
        scalar_t* row = base + t * row_stride;
        const scalar_t* c = cp + t * rot;
        const scalar_t* s = sp + t * rot;
        for (int64_t h = 0; h < heads + kv_heads; ++h) {
          scalar_t* x = row + h * head_dim;
          for (int64_t i = 0; i < half; ++i) {  // first half: x1 * cos + (-x2) * sin
            const float a = static_cast<float>(round_to<scalar_t>(static_cast<float>(x[i]) * static_cast<float>(c[i])));
            const float b = static_cast<float>(round_to<scalar_t>(-static_cast<float>(x[i + half]) * static_cast<float>(s[i])));
            tmp[i] = static_cast<float>(round_to<scalar_t>(a + b));
          }
          for (int64_t i = 0; i < half; ++i) {  // second half: x2 * cos + x1 * sin
            const float a = static_cast<float>(round_to<scalar_t>(static_cast<float>(x[i + half]) * static_cast<float>(c[i + half])));
            const float b = static_cast<float>(round_to<scalar_t>(static_cast<float>(x[i]) * static_cast<float>(s[i + half])));
            x[i + half] = round_to<scalar_t>(a + b);
          }
          for (int64_t i = 0; i < half; ++i) x[i] = round_to<scalar_t>(tmp[i]);
        }
        const int64_t slot = slots[t];
        if (slot < 0) continue;
        const scalar_t* k = row + heads * head_dim;
        const scalar_t* v = k + kv_width;
        std::copy(k, k + kv_width, kc + slot * kv_width);
        std::copy(v, v + kv_width, vc + slot * kv_width);
      }
    });
  });
}

struct AttendShape {
  int64_t block_size, kv_width, width, group, head_dim, heads, q_stride, window;
  float scale;
};

// Token j of a sequence in a paged cache [blocks, block_size, kv_heads, head_dim] (`cache` may point
// at one head within a row): the block its table names, then the row within the block.
template <typename T>
inline const T* cache_row(const T* cache, const AttendShape& sh, const int64_t* table, int64_t j) {
  return cache + (table[j / sh.block_size] * sh.block_size + j % sh.block_size) * sh.kv_width;
}

// One (sequence, KV head): its `group` query heads against the sequence's keys. D: head_dim known at
// compile time (64, 128: fully unrolled dots), or 0 (read from the shape).
template <typename T, int D>
void attend_item(const AttendShape& sh, const T* q_row, const T* k_head, const T* v_head, const int64_t* table,
                 int64_t len, T* o_row, std::vector<float>& qf, std::vector<float>& acc, std::vector<float>& scores) {
  const int64_t hd = D > 0 ? D : sh.head_dim, group = sh.group;
  const int64_t first = sh.window > 0 ? std::max<int64_t>(0, len - sh.window) : 0;
  const int64_t n = len - first;
  if (n <= 0) {
    std::fill(o_row, o_row + group * hd, round_to<T>(0.f));
    return;
  }
  scores.resize(group * n);
  for (int64_t i = 0; i < group * hd; ++i) qf[i] = static_cast<float>(q_row[i]);
  for (int64_t j = first; j < len; ++j) {
    const T* k = cache_row(k_head, sh, table, j);
    for (int64_t g = 0; g < group; ++g) scores[g * n + (j - first)] = dot(qf.data() + g * hd, k, hd) * sh.scale;
  }
  for (int64_t g = 0; g < group; ++g) softmax_(scores.data() + g * n, n);
  std::fill(acc.begin(), acc.begin() + group * hd, 0.f);
  for (int64_t j = first; j < len; ++j) {
    const T* v = cache_row(v_head, sh, table, j);
    for (int64_t g = 0; g < group; ++g) axpy(acc.data() + g * hd, scores[g * n + (j - first)], v, hd);
  }
  for (int64_t i = 0; i < group * hd; ++i) o_row[i] = round_to<T>(acc[i]);
}

// Up to four query heads of one KV head against one key: each head's 64 or 128 products summed in
// eight lanes, the heads' chains independent and the key's values loaded once for all of them.
template <typename T, int CH, int D>
inline void dots_heads(const float* q, const T* k, float scale, float* scores, int64_t n) {
  constexpr int L = 8;
  float acc[CH][L] = {};
  for (int d0 = 0; d0 < D; d0 += L) {
    for (int g = 0; g < CH; ++g) {
#pragma omp simd
      for (int l = 0; l < L; ++l) acc[g][l] = std::fma(q[g * D + d0 + l], static_cast<float>(k[d0 + l]), acc[g][l]);
    }
  }
  for (int g = 0; g < CH; ++g) {
    float sum = 0.f;
    for (int l = 0; l < L; ++l) sum += acc[g][l];
    scores[g * n] = sum * scale;
  }
}

// Up to four query heads of one KV head: out[g] = sum_j p[g][j] v_j, in key order (each element's
// sum is the chain of fused multiply-adds axpy makes), the heads' sums held together across keys.
template <typename T, int CH, int D, typename RowAt>
inline void values_heads(const float* p, int64_t n, int64_t first, const RowAt& row_at, int64_t offset, float* out) {
  float acc[CH][D] = {};
  for (int64_t j = 0; j < n; ++j) {
    const T* v = row_at(first + j) + offset;
    for (int g = 0; g < CH; ++g) {
      const float pj = p[g * n + j];
#pragma omp simd
      for (int d = 0; d < D; ++d) acc[g][d] = std::fma(pj, static_cast<float>(v[d]), acc[g][d]);
    }
  }
  for (int g = 0; g < CH; ++g) std::copy(acc[g], acc[g] + D, out + g * D);
}

// One sequence, all its heads: each key's row of every KV head is read once, front to back (a block
// holds block_size such rows contiguously), and each KV head's query heads go through it together,
// four at a time (dots_heads, values_heads). head_dim unknown at compile time (D = 0): one head at a
// time with dot and axpy.
template <typename T, int D>
void attend_seq(const AttendShape& sh, const T* q_row, const T* kc, const T* vc,
                const int64_t* table, int64_t len, T* o_row, std::vector<float>& qf, std::vector<float>& acc,
                std::vector<float>& scores) {
  const int64_t hd = D > 0 ? D : sh.head_dim, heads = sh.heads, group = sh.group, kv_heads = heads / group;
  const int64_t first = sh.window > 0 ? std::max<int64_t>(0, len - sh.window) : 0;
  const int64_t n = len - first;
  if (n <= 0) {
    std::fill(o_row, o_row + heads * hd, round_to<T>(0.f));
    return;
  }
  scores.resize(heads * n);
  for (int64_t i = 0; i < heads * hd; ++i) qf[i] = static_cast<float>(q_row[i]);
  const auto k_at = [&](int64_t j) { return cache_row(kc, sh, table, j); };
  const auto v_at = [&](int64_t j) { return cache_row(vc, sh, table, j); };
  for (int64_t j = first; j < len; ++j) {
    const T* k = k_at(j);
    for (int64_t kh = 0; kh < kv_heads; ++kh) {
      for (int64_t g0 = 0; g0 < group; g0 += 4) {
        const int64_t h = kh * group + g0;
        float* out = scores.data() + h * n + (j - first);
        const float* q = qf.data() + h * hd;
        if constexpr (D > 0) {
          switch (std::min<int64_t>(4, group - g0)) {
            case 1: dots_heads<T, 1, D>(q, k + kh * D, sh.scale, out, n); break;
            case 2: dots_heads<T, 2, D>(q, k + kh * D, sh.scale, out, n); break;
            case 3: dots_heads<T, 3, D>(q, k + kh * D, sh.scale, out, n); break;
            default: dots_heads<T, 4, D>(q, k + kh * D, sh.scale, out, n); break;
          }
        } else {
          for (int64_t g = 0; g < std::min<int64_t>(4, group - g0); ++g) {
            out[g * n] = dot(q + g * hd, k + kh * hd, hd) * sh.scale;
          }
        }
      }
    }
  }
  for (int64_t h = 0; h < heads; ++h) softmax_(scores.data() + h * n, n);
  if constexpr (D > 0) {
    for (int64_t kh = 0; kh < kv_heads; ++kh) {
      for (int64_t g0 = 0; g0 < group; g0 += 4) {
        const int64_t h = kh * group + g0;
        const float* p = scores.data() + h * n;
        float* out = acc.data() + h * D;
        switch (std::min<int64_t>(4, group - g0)) {
          case 1: values_heads<T, 1, D>(p, n, first, v_at, kh * D, out); break;
          case 2: values_heads<T, 2, D>(p, n, first, v_at, kh * D, out); break;
          case 3: values_heads<T, 3, D>(p, n, first, v_at, kh * D, out); break;
          default: values_heads<T, 4, D>(p, n, first, v_at, kh * D, out); break;
        }
      }
    }
  } else {
    std::fill(acc.begin(), acc.begin() + heads * hd, 0.f);
    for (int64_t j = first; j < len; ++j) {
      const T* v = v_at(j);
      for (int64_t h = 0; h < heads; ++h) axpy(acc.data() + h * hd, scores[h * n + (j - first)], v + (h / group) * hd, hd);
    }
  }
  for (int64_t i = 0; i < heads * hd; ++i) o_row[i] = round_to<T>(acc[i]);
}

// Decode attention over the paged cache: one query token per sequence, the newest position of its
// sequence (seq_lens[s] - 1); keys j < seq_lens[s] (and j > position - window when window > 0). A
// sequence of length 0 (a padding row of a decode graph's bucket) attends to nothing: zeros.
// q: [seqs, heads * head_dim] (rows may be strided, e.g. qkv's q part); caches as above;
// block_tables: [seqs, width] int64; returns [seqs, heads * head_dim].
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& block_tables, const at::Tensor& seq_lens, int64_t heads,
                            double scale, int64_t window) {
  check_cpu(q, "q");
  TORCH_CHECK(q.dim() == 2 && q.stride(1) == 1, "q must be [seqs, heads * head_dim] with contiguous rows");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "caches must be contiguous [blocks, block_size, kv_heads, head_dim]");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "caches must have q's dtype");
  const int64_t seqs = q.size(0), block_size = k_cache.size(1), kv_heads = k_cache.size(2), head_dim = k_cache.size(3);
  TORCH_CHECK(q.size(1) == heads * head_dim && heads % kv_heads == 0, "q's width does not match the heads");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && block_tables.dim() == 2 && block_tables.size(0) == seqs &&
                  block_tables.is_contiguous(),
              "block_tables must be contiguous int64 [seqs, width]");
  TORCH_CHECK(seq_lens.scalar_type() == at::kLong && seq_lens.numel() == seqs && seq_lens.is_contiguous(),
              "seq_lens must be int64 [seqs]");
  const int64_t width = block_tables.size(1), group = heads / kv_heads, num_blocks = k_cache.size(0);
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  for (int64_t s = 0; s < seqs; ++s) {
    TORCH_CHECK(lens[s] <= width * block_size, "sequence ", s, " has length ", lens[s], " outside its block table");
    for (int64_t b = 0; b < (lens[s] + block_size - 1) / block_size; ++b) {
      const int64_t block = tables[s * width + b];
      TORCH_CHECK(block >= 0 && block < num_blocks, "block ", block, " is outside the cache");
    }
  }
  auto out = at::empty({seqs, heads * head_dim}, q.options());
  const float fscale = static_cast<float>(scale);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "decode_attention", [&] {
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kc = k_cache.data_ptr<scalar_t>();
    const scalar_t* vc = v_cache.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t q_stride = q.stride(0), kv_width = kv_heads * head_dim;
    const AttendShape shape{block_size, kv_width, width, group, head_dim, heads, q_stride, window, fscale};
    if (seqs >= 2 * at::get_num_threads()) {  // enough sequences to keep every thread busy: one each
      at::parallel_for(0, seqs, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> qf(heads * head_dim), acc(heads * head_dim), scores;
        for (int64_t s = begin; s < end; ++s) {
          const scalar_t* q_row = qp + s * q_stride;
          scalar_t* o_row = op + s * heads * head_dim;
          if (head_dim == 64) {
            attend_seq<scalar_t, 64>(shape, q_row, kc, vc, tables + s * width, lens[s], o_row, qf, acc, scores);
          } else if (head_dim == 128) {
            attend_seq<scalar_t, 128>(shape, q_row, kc, vc, tables + s * width, lens[s], o_row, qf, acc, scores);
          } else {
            attend_seq<scalar_t, 0>(shape, q_row, kc, vc, tables + s * width, lens[s], o_row, qf, acc, scores);
          }
        }
      });
      return;
    }
    at::parallel_for(0, seqs * kv_heads, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> qf(group * head_dim), acc(group * head_dim), scores;
      for (int64_t item = begin; item < end; ++item) {
        const int64_t s = item / kv_heads, kh = item % kv_heads;
        const scalar_t* q_row = qp + s * q_stride + kh * group * head_dim;
        scalar_t* o_row = op + s * heads * head_dim + kh * group * head_dim;
        const scalar_t* k_head = kc + kh * head_dim;
        const scalar_t* v_head = vc + kh * head_dim;
        if (head_dim == 64) {
          attend_item<scalar_t, 64>(shape, q_row, k_head, v_head, tables + s * width, lens[s], o_row, qf, acc, scores);
        } else if (head_dim == 128) {
          attend_item<scalar_t, 128>(shape, q_row, k_head, v_head, tables + s * width, lens[s], o_row, qf, acc, scores);
        } else {
          attend_item<scalar_t, 0>(shape, q_row, k_head, v_head, tables + s * width, lens[s], o_row, qf, acc, scores);
        }
      }
    });
  });
  return out;
}

// LoRA for a step of few rows, each row with its own slot (0: no adapter) — the decode case, where
// torch's batched matmuls over 1-row problems cost more in dispatch than in bytes. For each row t
// with slot s and rank r = ranks[s]: v = x[t] a[s][:, :r*n] (a: [slots, in, max_rank * n], rank k of
// slice i in column k * n + i), then for each slice i, y[t, offsets[i] + o] += sum_k v[k * n + i] *
// b[s, k, starts[i] + o] (b: [slots, max_rank, sum(outs)]): worker/lora.py's torch layout, where
// both stages stream contiguous rows of the weights. v is rounded to the weights' dtype, the delta
// to the weights' and then y's, as the torch path's matmuls round them.
// The shrink of lora_item when the item's columns are 1-3 whole tiles (rank 16 over up to three
// slices): every tile's sums are held at once, so each row of A is read once, front to back, not
// once per tile. The same chain of fused multiply-adds per value, so the same results.
template <typename T, typename W, int M, int NT>
inline void shrink_tiles(const T* const* xr, const W* as, int64_t in, int64_t a_cols, float* v) {
  constexpr int C = NT * 16;
  float acc[M][C] = {};
  for (int64_t j = 0; j < in; ++j) {
    const W* aj = as + j * a_cols;
    for (int t = 0; t < M; ++t) {
      const float xv = static_cast<float>(xr[t][j]);
#pragma omp simd
      for (int l = 0; l < C; ++l) acc[t][l] = std::fma(xv, static_cast<float>(aj[l]), acc[t][l]);
    }
  }
  for (int t = 0; t < M; ++t)
    for (int l = 0; l < C; ++l) v[t * a_cols + l] = static_cast<float>(round_to<W>(acc[t][l]));
}

// Up to M rows that share one slot: each 16-column tile of v and of the delta is accumulated for
// all M rows in registers, so each weight vector is loaded once per item, not once per row.
template <typename T, typename W, int M>
void lora_item(const T* const* xr, T* const* yr, const W* as, const W* bs, int64_t in, int64_t a_cols, int64_t r,
               int64_t n, int64_t b_cols, const std::vector<int64_t>& outs, const std::vector<int64_t>& starts,
               const std::vector<int64_t>& offsets, float* v) {
  constexpr int L = 16;
  const int64_t cols = r * n;
  int64_t c0 = 0;
  if (cols == L || cols == 2 * L || cols == 3 * L) {  // shrink, A read once: see shrink_tiles
    if (cols == L) shrink_tiles<T, W, M, 1>(xr, as, in, a_cols, v);
    if (cols == 2 * L) shrink_tiles<T, W, M, 2>(xr, as, in, a_cols, v);
    if (cols == 3 * L) shrink_tiles<T, W, M, 3>(xr, as, in, a_cols, v);
    c0 = cols;
  }
  for (; c0 + L <= cols; c0 += L) {  // shrink: v[t] = x[t] a[:, :cols]
    float acc[M][L] = {};
    for (int64_t j = 0; j < in; ++j) {
      const W* a16 = as + j * a_cols + c0;
      for (int t = 0; t < M; ++t) {
        const float xv = static_cast<float>(xr[t][j]);
#pragma omp simd
        for (int l = 0; l < L; ++l) acc[t][l] = std::fma(xv, static_cast<float>(a16[l]), acc[t][l]);
      }
    }
    for (int t = 0; t < M; ++t)
      for (int l = 0; l < L; ++l) v[t * a_cols + c0 + l] = static_cast<float>(round_to<W>(acc[t][l]));
  }
  for (int t = 0; t < M && c0 < cols; ++t) {  // columns past the last full tile
    float* vt = v + t * a_cols;
    std::fill(vt + c0, vt + cols, 0.f);
    for (int64_t j = 0; j < in; ++j) axpy(vt + c0, static_cast<float>(xr[t][j]), as + j * a_cols + c0, cols - c0);
    for (int64_t c = c0; c < cols; ++c) vt[c] = static_cast<float>(round_to<W>(vt[c]));
  }
  for (int64_t i = 0; i < n; ++i) {  // expand: y[t, slice i] += v[t, rank k of slice i] b[k, slice i]
    const W* bi = bs + starts[i];
    int64_t o0 = 0;
    for (; o0 + L <= outs[i]; o0 += L) {
      float acc[M][L] = {};
      for (int64_t k = 0; k < r; ++k) {
        const W* b16 = bi + k * b_cols + o0;
        for (int t = 0; t < M; ++t) {
          const float p = v[t * a_cols + k * n + i];
#pragma omp simd
          for (int l = 0; l < L; ++l) acc[t][l] = std::fma(p, static_cast<float>(b16[l]), acc[t][l]);
        }
      }
      for (int t = 0; t < M; ++t) {
        T* yo = yr[t] + offsets[i] + o0;
        for (int l = 0; l < L; ++l) {
          const float d = static_cast<float>(round_to<T>(static_cast<float>(round_to<W>(acc[t][l]))));
          yo[l] = round_to<T>(static_cast<float>(yo[l]) + d);
        }
      }
    }
    for (int t = 0; t < M; ++t) {  // outputs past the last full tile
      for (int64_t o = o0; o < outs[i]; ++o) {
        float d = 0.f;
        for (int64_t k = 0; k < r; ++k) d = std::fma(v[t * a_cols + k * n + i], static_cast<float>(bi[k * b_cols + o]), d);
        T* yo = yr[t] + offsets[i] + o;
        *yo = round_to<T>(static_cast<float>(*yo) + static_cast<float>(round_to<T>(static_cast<float>(round_to<W>(d)))));
      }
    }
  }
}

// LoRA for a step of few rows, each row with its own slot (0: no adapter) — the decode case, where
// torch's batched matmuls over 1-row problems cost more in dispatch than in bytes. For each row t
// with slot s and rank r = ranks[s]: v = x[t] a[s][:, :r*n] (a: [slots, in, max_rank * n], rank k of
// slice i in column k * n + i), then for each slice i, y[t, offsets[i] + o] += sum_k v[k * n + i] *
// b[s, k, starts[i] + o] (b: [slots, max_rank, sum(outs)]): worker/lora.py's torch layout, where
// both stages stream contiguous rows of the weights. Rows of one slot go in items of up to 8
// (lora_item). v is rounded to the weights' dtype, the delta to the weights' and then y's, as the
// torch path's matmuls round them.
template <typename T, typename W>
void lora_rows_impl(const at::Tensor& x, at::Tensor& y, const at::Tensor& a, const at::Tensor& b,
                    const int64_t* slots, const int64_t* ranks, const std::vector<int64_t>& outs,
                    const std::vector<int64_t>& offsets) {
  constexpr int64_t kMaxItemRows = 8;
  const int64_t rows = x.size(0), in = x.size(1), n = static_cast<int64_t>(outs.size());
  const int64_t a_cols = a.size(2), max_rank = b.size(1), b_cols = b.size(2);
  const int64_t x_stride = x.stride(0), y_stride = y.stride(0);
  std::vector<int64_t> starts(n, 0);
  for (int64_t i = 1; i < n; ++i) starts[i] = starts[i - 1] + outs[i - 1];
  // items: runs of up to kMaxItemRows rows of one slot, in row order within each slot
  std::vector<std::vector<int64_t>> items;
  {
    std::vector<int64_t> order;
    for (int64_t t = 0; t < rows; ++t)
      if (slots[t] != 0 && ranks[slots[t]] > 0) order.push_back(t);
    std::stable_sort(order.begin(), order.end(), [&](int64_t p, int64_t q) { return slots[p] < slots[q]; });
    for (size_t i = 0; i < order.size(); ++i) {
      if (items.empty() || slots[items.back().front()] != slots[order[i]] ||
          static_cast<int64_t>(items.back().size()) == kMaxItemRows) {
        items.emplace_back();
      }
      items.back().push_back(order[i]);
    }
  }
  const T* xp = x.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  const W* ap = a.data_ptr<W>();
  const W* bp = b.data_ptr<W>();
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> v(kMaxItemRows * a_cols);
    for (int64_t it = begin; it < end; ++it) {
      const auto& item = items[it];
      const int64_t s = slots[item.front()], r = ranks[s];
      const T* xr[kMaxItemRows];
      T* yr[kMaxItemRows];
      for (size_t t = 0; t < item.size(); ++t) {
        xr[t] = xp + item[t] * x_stride;
        yr[t] = yp + item[t] * y_stride;
      }
      const W* as = ap + s * in * a_cols;
      const W* bs = bp + s * max_rank * b_cols;
      switch (item.size()) {
        case 1: lora_item<T, W, 1>(xr, yr, as, bs, in, a_cols, r, n, b_cols, outs, starts, offsets, v.data()); break;
        case 2: lora_item<T, W, 2>(xr, yr, as, bs, in, a_cols, r, n, b_cols, outs, starts, offsets, v.data()); break;
        case 3: lora_item<T, W, 3>(xr, yr, as, bs, in, a_cols, r, n, b_cols, outs, starts, offsets, v.data()); break;
        case 4: lora_item<T, W, 4>(xr, yr, as, bs, in, a_cols, r, n, b_cols, outs, starts, offsets, v.data()); break;
        case 5: lora_item<T, W, 5>(xr, yr, as, bs, in, a_cols, r, n, b_cols, outs, starts, offsets, v.data()); break;
        case 6: lora_item<T, W, 6>(xr, yr, as, bs, in, a_cols, r, n, b_cols, outs, starts, offsets, v.data()); break;
        case 7: lora_item<T, W, 7>(xr, yr, as, bs, in, a_cols, r, n, b_cols, outs, starts, offsets, v.data()); break;
        default: lora_item<T, W, 8>(xr, yr, as, bs, in, a_cols, r, n, b_cols, outs, starts, offsets, v.data()); break;
      }
    }
  });
}

void lora_rows(const at::Tensor& x, at::Tensor y, const at::Tensor& a, const at::Tensor& b,
               const at::Tensor& row_slots, const at::Tensor& slot_ranks, std::vector<int64_t> outs,
               std::vector<int64_t> offsets) {
  check_cpu(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && y.dim() == 2 && y.stride(1) == 1 && y.size(0) == x.size(0),
              "x and y must be [rows, features] with contiguous rows");
  TORCH_CHECK(a.is_contiguous() && b.is_contiguous() && a.dim() == 3 && b.dim() == 3 && a.size(0) == b.size(0) &&
                  a.size(1) == x.size(1) && a.scalar_type() == b.scalar_type(),
              "a must be [slots, in, max_rank * slices] and b [slots, max_rank, out], contiguous, one dtype");
  const int64_t n = static_cast<int64_t>(outs.size()), num_slots = a.size(0), max_rank = b.size(1);
  TORCH_CHECK(n >= 1 && static_cast<int64_t>(offsets.size()) == n && a.size(2) == max_rank * n,
              "one offset per slice, and a's columns must be max_rank * slices");
  int64_t total = 0;
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(outs[i] >= 0 && offsets[i] >= 0 && offsets[i] + outs[i] <= y.size(1), "slice ", i, " lies outside y");
    total += outs[i];
  }
  TORCH_CHECK(total <= b.size(2), "the slices need more columns than b has");
  TORCH_CHECK(row_slots.scalar_type() == at::kLong && row_slots.numel() == x.size(0) && row_slots.is_contiguous(),
              "row_slots must be int64 [rows]");
  TORCH_CHECK(slot_ranks.scalar_type() == at::kLong && slot_ranks.numel() == num_slots && slot_ranks.is_contiguous(),
              "slot_ranks must be int64 [slots]");
  const int64_t* slots = row_slots.data_ptr<int64_t>();
  const int64_t* ranks = slot_ranks.data_ptr<int64_t>();
  for (int64_t t = 0; t < x.size(0); ++t) {
    TORCH_CHECK(slots[t] >= 0 && slots[t] < num_slots, "row ", t, " has slot ", slots[t], " outside the stack");
    TORCH_CHECK(slots[t] == 0 || (ranks[slots[t]] >= 0 && ranks[slots[t]] <= max_rank), "slot ", slots[t],
                " has a rank outside 0..max_rank");
  }
  TORCH_CHECK(y.scalar_type() == x.scalar_type(), "y must have x's dtype");
  const auto xt = x.scalar_type(), wt = a.scalar_type();
  if (xt == at::kFloat && wt == at::kFloat) {
    lora_rows_impl<float, float>(x, y, a, b, slots, ranks, outs, offsets);
  } else if (xt == at::kBFloat16 && wt == at::kBFloat16) {
    lora_rows_impl<at::BFloat16, at::BFloat16>(x, y, a, b, slots, ranks, outs, offsets);
  } else if (xt == at::kBFloat16 && wt == at::kFloat) {
    lora_rows_impl<at::BFloat16, float>(x, y, a, b, slots, ranks, outs, offsets);
  } else if (xt == at::kHalf && wt == at::kFloat) {
    lora_rows_impl<at::Half, float>(x, y, a, b, slots, ranks, outs, offsets);
  } else if (xt == at::kHalf && wt == at::kHalf) {
    lora_rows_impl<at::Half, at::Half>(x, y, a, b, slots, ranks, outs, offsets);
  } else {
    TORCH_CHECK(false, "lora_rows: unsupported dtypes ", xt, " and ", wt);
  }
}

// 512-bit vectors for a long streaming loop where the target has them (gcc's -march=native tuning
// prefers 256 bits; for the short dot products of attention that is the faster choice).
#if defined(__AVX512F__) && defined(__GNUC__) && !defined(__clang__)
#define LORAX_WIDE_VECTORS __attribute__((target("prefer-vector-width=512")))
#else
#define LORAX_WIDE_VECTORS
#endif

// One row of greedy_logsumexp: its first maximal logit's index and its logsumexp.
LORAX_WIDE_VECTORS void greedy_row(const float* x, int64_t vocab, int64_t* id, float* norm) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  // Lane-wise maxima and probes (0 unless a logit is NaN or infinite: x - x), folded at the end;
  // gcc leaves a max reduction over one scalar unvectorised.
  constexpr int64_t L = 16;
  float lane_max[L], lane_probe[L];
  std::fill(lane_max, lane_max + L, -kInf);
  std::fill(lane_probe, lane_probe + L, 0.f);
  int64_t j0 = 0;
  for (; j0 + L <= vocab; j0 += L) {
#pragma omp simd
    for (int64_t l = 0; l < L; ++l) {
      lane_max[l] = std::max(lane_max[l], x[j0 + l]);
      lane_probe[l] += x[j0 + l] - x[j0 + l];
    }
  }
  float mx = -kInf, probe = 0.f;
  for (int64_t l = 0; l < L; ++l) {
    mx = std::max(mx, lane_max[l]);
    probe += lane_probe[l];
  }
  for (; j0 < vocab; ++j0) {
    mx = std::max(mx, x[j0]);
    probe += x[j0] - x[j0];
  }
  int64_t first = 0;
  if (probe != 0.f) {
    for (int64_t j = 0; j < vocab; ++j) {
      if (x[j] != x[j]) {  // torch: the first NaN wins, and the norm is NaN
        *id = j;
        *norm = std::numeric_limits<float>::quiet_NaN();
        return;
      }
    }
  }
  if (mx == -kInf) {  // every token masked out
    *id = 0;
    *norm = -kInf;
    return;
  }
  constexpr int64_t C = 64;  // the first maximum, chunk by chunk, each chunk's test vectorised
  for (; first + C <= vocab; first += C) {
    int64_t hit = 0;
#pragma omp simd reduction(+ : hit)
    for (int64_t l = 0; l < C; ++l) hit += x[first + l] == mx;
    if (hit) break;
  }
  while (x[first] != mx) ++first;
  *id = first;
  if (mx == kInf) {
    *norm = kInf;
    return;
  }
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < vocab; ++j) sum += exp_approx(x[j] - mx);
  *norm = mx + std::log(sum);
}

// Greedy rows of fp32 logits [rows, vocab]: each row's first maximal logit (torch.argmax) and its
// logsumexp (max + log(sum(exp(x - max))), as torch.logsumexp), reading each row twice instead of
// torch's six passes and [rows, vocab] temporaries. As torch: a row holding NaN answers its first
// NaN and a NaN norm; an all -inf row answers 0 and -inf; a +inf logit answers itself and +inf.
std::vector<at::Tensor> greedy_logsumexp(const at::Tensor& logits) {
  check_cpu(logits, "logits");
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous() && logits.scalar_type() == at::kFloat && logits.size(1) > 0,
              "logits must be contiguous fp32 [rows, vocab > 0]");
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  auto ids = at::empty({rows}, logits.options().dtype(at::kLong));
  auto norms = at::empty({rows}, logits.options());
  const float* lp = logits.data_ptr<float>();
  int64_t* ip = ids.data_ptr<int64_t>();
  float* np = norms.data_ptr<float>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) greedy_row(lp + r * vocab, vocab, ip + r, np + r);
  });
  return {ids, norms};
}

}  // namespace

// kernels/cpu_int4.cpp
void int4_linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& a, const at::Tensor& b,
                 int64_t run, bool zero_first, at::Tensor y);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("add_rms_norm", &add_rms_norm, "h += delta (in place); returns rms_norm(h)");
  m.def("silu_and_mul", &silu_and_mul, "silu(gate) * up over [gate | up]");
  m.def("rotary_store", &rotary_store, "rotary on qkv's q and k heads in place; k and v into the paged caches");
  m.def("decode_attention", &decode_attention, "one-token-per-sequence attention over the paged caches");
  m.def("greedy_logsumexp", &greedy_logsumexp, "each row's argmax and logsumexp (greedy sampling)");
  m.def("lora_rows", &lora_rows, "y += each row's LoRA delta, rows of few adapters each (decode)");
  m.def("int4_linear", &int4_linear, "y = x W^T, W kept 4 bits a value with a pair per group (GPTQ, AWQ, GGUF Q4)");
}

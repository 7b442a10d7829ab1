// lmforge::decode_attention: one new query per row against its cached keys and values, in float32.
//
//   out[b, h] = sum_j p_j v[b, h/G, j]     p = softmax_j(q[b, h] . k[b, h/G, j] / sqrt(D)) over allowed j
//
// The same softmax(q k^T / sqrt(D)) v as SDPA for one query (grouped-query heads share their key/value head).
// Written with torch ops, inductor materialised the (B, K, G, L, D) products of a decode step and reduced them
// in passes: ~82 us a layer for SmolLM2 over 256 cached columns on 2 cores, a fifth of the whole step. Here
// columns not allowed (not written yet, left padding, outside a sliding window) are skipped, not read: a cache
// sized to a bucket costs what its written columns do.
//
// Head sizes of 2, 4 or 8 vectors take the vector path (AVX-512: 32, 64, 128; AVX2: 16, 32, 64): the query heads
// that share a key/value head (as many as fit in registers) read each key and value once, in three passes over
// the allowed columns: scores, their exponentials a vector at a time, and the weighted sum of values kept in
// registers. For 8 rows of SmolLM2 over 200 columns (2 cores) a layer took 41-53 us this way on AVX-512 and
// 126-156 us in the plain loop (a head at a time: a horizontal sum, a scalar exp and a store-and-reload of the
// output per column); 76 against 143 us built for AVX2. One row: 10-14 against 19-28 us (AVX2: 14 against 25).
// Other head sizes take the plain loop.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

struct Columns {  // one row's allowed columns
  const int32_t* index;
  int64_t count;
};

using Attend = void (*)(const float*, const float*, const float*, int64_t, int64_t, Columns, float, float*, float*);

// A vector of the vector path is a register: 16 floats with AVX-512, 8 with AVX2 (16-float vectors there were
// pairs, the accumulators spilled, and took 3x the plain loop's time), which has half as many registers (16
// against 32), so a task keeps half as many vectors in them. GCC's vector extensions: one source for both.
#if defined(__AVX512F__)
constexpr int64_t W = 16;
constexpr int kHeld = 16;  // vectors of queries (and of sums) a task keeps in registers
#else
constexpr int64_t W = 8;
constexpr int kHeld = 8;
#endif
using vf = float __attribute__((vector_size(W * sizeof(float))));
using vi = int32_t __attribute__((vector_size(W * sizeof(int32_t))));

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }

inline vf splat(float x) { return vf{} + x; }

template <class To, class From>
inline To bits(From v) {
  static_assert(sizeof(To) == sizeof(From));
  To r;
  std::memcpy(&r, &v, sizeof r);
  return r;
}

inline float sum(vf v) {
  using v4 = float __attribute__((vector_size(4 * sizeof(float))));
  v4 s4{};
  for (int64_t i = 0; i < W; i += 4) {  // unrolled: whole 128-bit lanes, added
    v4 part;
    std::memcpy(&part, reinterpret_cast<const char*>(&v) + i * sizeof(float), sizeof part);
    s4 += part;
  }
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

// e^x for x <= 0 (a score minus the largest), to ~1e-7 relative (Cephes' expf polynomial); below -87, 2^-126
// instead of a smaller value or 0 (a weight of 1e-38 next to the largest's 1).
inline vf exp_nonpositive(vf x) {
  x = x < -87.f ? splat(-87.f) : x;
  const vf magic = splat(12582912.f);  // 1.5 * 2^23: adding it rounds to an integer, held in the low bits
  const vf t = x * 1.44269504088896341f + magic;
  const vf n = t - magic;  // round(x / ln 2)
  const vf r = x - n * 0.693359375f - n * -2.12194440e-4f;
  vf y = splat(1.9875691500e-4f);
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.f;
  const vi two_to_n = ((bits<vi>(t) - bits<vi>(magic)) + 127) << 23;
  return y * bits<vf>(two_to_n);
}

// NH query heads (q: NH x D contiguous, D = 16 * C) over one key/value head's allowed columns -> y (NH x D).
// score: NH x the count rounded up to 16, scratch.
template <int NH, int C>
void attend(const float* q, const float* keys, const float* values, int64_t k_step, int64_t v_step, Columns cols,
            float scale, float* score, float* y) {
  constexpr int64_t D = C * W;
  const int64_t n = cols.count, stride = (n + W - 1) / W * W;
  if (n == 0) {  // no allowed column: NaN, as SDPA's
    std::fill(y, y + NH * D, std::numeric_limits<float>::quiet_NaN());
    return;
  }
  vf qv[NH][C];
  for (int h = 0; h < NH; ++h)
    for (int c = 0; c < C; ++c) qv[h][c] = load(q + h * D + c * W) * scale;
  for (int64_t i = 0; i < n; ++i) {  // scores
    const float* key = keys + cols.index[i] * k_step;
    vf kv[C];
    for (int c = 0; c < C; ++c) kv[c] = load(key + c * W);
    for (int h = 0; h < NH; ++h) {
      vf a = qv[h][0] * kv[0];
      for (int c = 1; c < C; ++c) a += qv[h][c] * kv[c];
      score[h * stride + i] = sum(a);
    }
  }
  vi lane;
  for (int l = 0; l < W; ++l) lane[l] = l;
  float inverse[NH];
  for (int h = 0; h < NH; ++h) {  // the exponentials, 16 columns at a time; the tail's lanes are 0
    float* s = score + h * stride;
    for (int64_t i = n; i < stride; ++i) s[i] = -std::numeric_limits<float>::infinity();
    vf best = load(s);
    for (int64_t i = W; i < stride; i += W) {
      const vf v = load(s + i);
      best = v > best ? v : best;
    }
    float top = best[0];
    for (int l = 1; l < W; ++l) top = std::max(top, best[l]);
    vf total{};
    for (int64_t i = 0; i < stride; i += W) {
      vf p = exp_nonpositive(load(s + i) - top);
      p = lane + static_cast<int32_t>(i) < static_cast<int32_t>(n) ? p : vf{};
      total += p;
      store(s + i, p);
    }
    inverse[h] = 1.f / sum(total);
  }
  vf acc[NH][C] = {};
  for (int64_t i = 0; i < n; ++i) {  // the weighted sum of values
    const float* value = values + cols.index[i] * v_step;
    vf vv[C];
    for (int c = 0; c < C; ++c) vv[c] = load(value + c * W);
    for (int h = 0; h < NH; ++h) {
      const vf p = splat(score[h * stride + i]);
      for (int c = 0; c < C; ++c) acc[h][c] += p * vv[c];
    }
  }
  for (int h = 0; h < NH; ++h)
    for (int c = 0; c < C; ++c) store(y + h * D + c * W, acc[h][c] * inverse[h]);
}

// attend<NH, C> where its NH x C query vectors fit in the registers kept for them (else nullptr: the plain loop)
template <int NH, int C>
constexpr Attend fitting() {
  if constexpr (NH * C <= kHeld)
    return attend<NH, C>;
  else
    return nullptr;
}

template <int C>
Attend attend_for(int64_t heads) {
  switch (heads) {
    case 1: return fitting<1, C>();
    case 2: return fitting<2, C>();
    case 3: return fitting<3, C>();
    case 4: return fitting<4, C>();
    default: return nullptr;
  }
}

// the vector path's function for NH heads of D values (nullptr: the plain loop)
Attend vector_path(int64_t heads, int64_t D) {
  switch (D % W == 0 ? D / W : 0) {
    case 2: return attend_for<2>(heads);
    case 4: return attend_for<4>(heads);
    case 8: return attend_for<8>(heads);
    default: return nullptr;
  }
}

inline float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// one query head, any D (the plain loop)
void attend_plain(const float* qv, const float* keys, const float* values, int64_t k_step, int64_t v_step,
                  Columns cols, int64_t D, float scale, float* score, float* y) {
  float best = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < cols.count; ++i) {
    score[i] = dot(qv, keys + cols.index[i] * k_step, D) * scale;
    best = std::max(best, score[i]);
  }
  for (int64_t d = 0; d < D; ++d) y[d] = 0.f;
  float total = 0.f;
  for (int64_t i = 0; i < cols.count; ++i) {
    const float p = std::exp(score[i] - best);
    total += p;
    const float* vj = values + cols.index[i] * v_step;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) y[d] += p * vj[d];
  }
  const float inverse = 1.f / total;  // no allowed column: 0 / 0, NaN
  for (int64_t d = 0; d < D; ++d) y[d] *= inverse;
}

// q (B, H, D) contiguous; k, v (B, K, L, D) with each column's D values contiguous, any other strides (a cache, a
// slice of its columns); allowed (B, L) bool, any strides -> (B, H * D). A row with no allowed column gets NaN, as
// SDPA's does. (Strides are read, not assumed: a size-1 dimension's stride can be anything.)
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& allowed) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat && q.is_contiguous(), "q: contiguous (B, H, D) float32");
  TORCH_CHECK(k.dim() == 4 && k.scalar_type() == at::kFloat && k.sizes() == v.sizes() &&
                  v.scalar_type() == at::kFloat,
              "k, v: (B, K, L, D) float32");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), K = k.size(1), L = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(3) == D && K > 0 && H % K == 0, "k, v: (B, K, L, D) with H a multiple of K");
  TORCH_CHECK((k.stride(3) == 1 && v.stride(3) == 1) || D == 1, "k, v: each column's D values contiguous");
  TORCH_CHECK(allowed.dim() == 2 && allowed.scalar_type() == at::kBool && allowed.size(0) == B &&
                  allowed.size(1) == L,
              "allowed: (B, L) bool");
  TORCH_CHECK(L < std::numeric_limits<int32_t>::max(), "k, v: fewer than 2^31 columns");
  at::Tensor out = at::empty({B, H * D}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const bool* ap = allowed.data_ptr<bool>();
  float* op = out.data_ptr<float>();
  const int64_t group = H / K;
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  std::vector<int32_t> index(B * L);  // each row's allowed columns, in order
  std::vector<int64_t> count(B, 0);
  for (int64_t b = 0; b < B; ++b) {
    int32_t* list = index.data() + b * L;
    for (int64_t j = 0; j < L; ++j)
      if (ap[b * allowed.stride(0) + j * allowed.stride(1)]) list[count[b]++] = static_cast<int32_t>(j);
  }
  // A task is a block of query heads that share a key/value head: as many as fit in registers, fewer when the
  // tasks would not keep every thread busy (one row of SmolLM2: 3 key/value heads on 2 threads).
  int64_t block = std::min<int64_t>(group, 4);
  while (block > 1 && (vector_path(block, D) == nullptr || group % block ||
                       B * K * (group / block) < 2 * at::get_num_threads()))
    --block;
  const Attend fast = vector_path(block, D);
  const int64_t tasks = B * H / block, stride = (L + W - 1) / W * W;
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> score(block * stride);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t * block / H, h = t * block % H, kv = h / group;
      const float* keys = kp + b * k.stride(0) + kv * k.stride(1);
      const float* values = vp + b * v.stride(0) + kv * v.stride(1);
      const Columns cols{index.data() + b * L, count[b]};
      const float* qv = qp + (b * H + h) * D;
      float* y = op + (b * H + h) * D;
      if (fast != nullptr)
        fast(qv, keys, values, k.stride(2), v.stride(2), cols, scale, score.data(), y);
      else
        attend_plain(qv, keys, values, k.stride(2), v.stride(2), cols, D, scale, score.data(), y);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lmforge, m) { m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor allowed) -> Tensor"); }

TORCH_LIBRARY_IMPL(lmforge, CPU, m) { m.impl("decode_attention", &decode_attention); }

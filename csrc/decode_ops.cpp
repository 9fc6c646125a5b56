// MLX ops + primitives for the fused decode ops (see decode_ops.h).
//
// Each op mirrors the arithmetic of MLX's own fallback graph for the CPU:
// float32 where the fallback computes in float32, and a rounding to the
// input dtype wherever the fallback stores an intermediate in that dtype,
// so float32 results differ from mx.fast only by summation order (and the
// libm cos/sin/exp against MLX's vectorized ones).
#include "decode_ops.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "mlx/types/half_types.h"

#include "op_utils.h"
#include "thread_pool.h"

namespace chess_mlx {

namespace {

using namespace op_utils;

// Inlined into the per-ISA copies below (CHESS_MLX_CPU_CLONES).
#if defined(__GNUC__)
#define CHESS_MLX_INLINE inline __attribute__((always_inline))
#else
#define CHESS_MLX_INLINE inline
#endif

// Attention reads this many K/V bytes or more before it splits its heads
// over the thread pool.
constexpr int64_t kMinParallelAttentionBytes = 256 * 1024;

template <typename T>
inline float rounded(float v) {
  return static_cast<float>(static_cast<T>(v));
}

// sum of term(e) over e < n, in kLanes partial sums: a serial sum would not
// vectorize without -ffast-math.
template <typename Term>
CHESS_MLX_INLINE float sum_in_lanes(int64_t n, Term term) {
  constexpr int kLanes = 8;
  float lanes[kLanes] = {};
  int64_t e = 0;
  for (; e + kLanes <= n; e += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      lanes[l] += term(e + l);
    }
  }
  float total = 0.0f;
  for (int l = 0; l < kLanes; ++l) {
    total += lanes[l];
  }
  for (; e < n; ++e) {
    total += term(e);
  }
  return total;
}

// Calls fn.template operator()<T>() with T the C++ type of dtype d.
template <typename Fn>
void with_dtype(mx::Dtype d, Fn&& fn) {
  if (d == mx::float32) {
    fn.template operator()<float>();
  } else if (d == mx::float16) {
    fn.template operator()<mx::float16_t>();
  } else {
    fn.template operator()<mx::bfloat16_t>();
  }
}

template <typename T>
void rms_norm_rows(
    const T* x,
    const T* w,
    T* y,
    int64_t rows,
    int64_t n,
    float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * n;
    const float ss = sum_in_lanes(n, [xr](int64_t i) {
      const float v = static_cast<float>(xr[i]);
      return v * v;
    });
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(n) + eps);
    for (int64_t j = 0; j < n; ++j) {
      const float normed = rounded<T>(static_cast<float>(xr[j]) * inv);
      y[r * n + j] = static_cast<T>(normed * static_cast<float>(w[j]));
    }
  }
}

template <typename T>
void rope_rows(
    const T* x,
    const float* inv_freqs,
    T* y,
    int64_t rows,
    int64_t d,
    int64_t half,
    int offset,
    float scale,
    bool traditional) {
  // The fallback stores cos/sin and every product in the input dtype.
  const float position = static_cast<float>(offset) * scale;
  std::vector<float> cs(half), sn(half);
  for (int64_t i = 0; i < half; ++i) {
    const float theta = position * inv_freqs[i];
    cs[i] = rounded<T>(std::cos(theta));
    sn[i] = rounded<T>(std::sin(theta));
  }
  const int64_t dims = 2 * half;
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * d;
    T* yr = y + r * d;
    for (int64_t i = 0; i < half; ++i) {
      const int64_t a = traditional ? 2 * i : i;
      const int64_t b = traditional ? 2 * i + 1 : i + half;
      const float x1 = static_cast<float>(xr[a]);
      const float x2 = static_cast<float>(xr[b]);
      yr[a] = static_cast<T>(rounded<T>(x1 * cs[i]) - rounded<T>(x2 * sn[i]));
      yr[b] = static_cast<T>(rounded<T>(x1 * sn[i]) + rounded<T>(x2 * cs[i]));
    }
    for (int64_t j = dims; j < d; ++j) {
      yr[j] = xr[j];
    }
  }
}

// e^-a for a >= 0, within about 2 ulp: Cephes' range reduction and degree-6
// polynomial, in plain float and integer ops so that a loop of it
// vectorizes. a is clamped to 86 (e^-86 is a normal float just above
// FLT_MIN), a nan too: callers keep nan in their own arithmetic.
CHESS_MLX_INLINE float exp_neg(float a) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;
  constexpr float kLn2Lo = -2.12194440e-4f;
  constexpr float kRound = 12582912.0f; // 1.5 * 2^23: adding it rounds
  // min(a, 86) on the bits (a >= 0 orders them; a nan becomes 86): g++
  // does not if-convert a float min under -ftrapping-math
  constexpr uint32_t kMaxBits = 0x42AC0000u; // 86.0f
  const uint32_t ab = std::bit_cast<uint32_t>(a);
  const float x = -std::bit_cast<float>(ab < kMaxBits ? ab : kMaxBits);
  const float t = x * kLog2e + kRound;
  const float n = t - kRound; // round(x * log2(e)), in [-124, 0]
  const float r = (x - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = (p * r * r + r) + 1.0f;
  // times 2^n: n added to the exponent field (the low bits of t, less those
  // of kRound, are n in two's complement)
  const uint32_t n_bits = std::bit_cast<uint32_t>(t) - std::bit_cast<uint32_t>(kRound);
  return std::bit_cast<float>(std::bit_cast<uint32_t>(e) + (n_bits << 23));
}

template <typename T>
CHESS_MLX_INLINE void silu_values(const T* x, T* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    constexpr uint32_t kOneBits = 0x3F800000u; // 1.0f
    const float v = static_cast<float>(x[i]);
    const float e = exp_neg(std::fabs(v));
    const float r = 1.0f / (1.0f + e); // sigmoid(|v|)
    // sigmoid(v) = r for v >= 0, e * r below; picked by the sign bit
    // (an integer mask: g++ does not if-convert float selects)
    const uint32_t neg = 0u - (std::bit_cast<uint32_t>(v) >> 31);
    const float f = std::bit_cast<float>(
        (std::bit_cast<uint32_t>(e) & neg) | (kOneBits & ~neg));
    y[i] = static_cast<T>(v * rounded<T>(f * r));
  }
}

struct AttentionJob {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  int64_t heads; // query heads
  int64_t rep; // query heads per KV head
  int64_t s; // keys
  int64_t d; // key/query head size
  int64_t dv; // value head size
  int64_t k_strides[3]; // batch, KV head, key (elements)
  int64_t v_strides[3];
  float scale;
  int64_t items; // batch * heads
  void (*run)(const AttentionJob&, int64_t, int64_t);
};

// Query heads [i0, i1) of the flattened (batch, head) index. Consecutive
// heads that share a KV head (up to kShare at once) are done together, so
// each K and V row is read once for all of them, not once per head.
template <typename T>
CHESS_MLX_INLINE void attention_items(const AttentionJob& j, int64_t i0, int64_t i1) {
  constexpr int64_t kShare = 8;
  const T* q = static_cast<const T*>(j.q);
  const T* k = static_cast<const T*>(j.k);
  const T* v = static_cast<const T*>(j.v);
  T* out = static_cast<T*>(j.out);
  const int64_t s = std::max<int64_t>(j.s, 1);
  std::vector<float> qs(kShare * j.d), scores(kShare * s), acc(kShare * j.dv);
  const float scale = rounded<T>(j.scale);
  for (int64_t item = i0; item < i1;) {
    const int64_t b = item / j.heads;
    const int64_t g = (item % j.heads) / j.rep;
    const int64_t group_end = b * j.heads + (g + 1) * j.rep;
    const int64_t n = std::min({i1, group_end, item + kShare}) - item;
    for (int64_t e = 0; e < n * j.d; ++e) {
      qs[e] = rounded<T>(scale * static_cast<float>(q[item * j.d + e]));
    }
    const T* kb = k + b * j.k_strides[0] + g * j.k_strides[1];
    float top[kShare];
    std::fill(top, top + kShare, -INFINITY);
    for (int64_t t = 0; t < j.s; ++t) {
      const T* kt = kb + t * j.k_strides[2];
      for (int64_t h = 0; h < n; ++h) {
        const float* qh = qs.data() + h * j.d;
        const float score = rounded<T>(sum_in_lanes(
            j.d, [qh, kt](int64_t e) { return qh[e] * static_cast<float>(kt[e]); }));
        scores[h * s + t] = score;
        top[h] = std::max(top[h], score);
      }
    }
    float total[kShare];
    for (int64_t h = 0; h < n; ++h) {
      float* sh = scores.data() + h * s;
      for (int64_t t = 0; t < j.s; ++t) {
        sh[t] = exp_neg(top[h] - sh[t]); // vectorizes, unlike std::exp
      }
      total[h] = sum_in_lanes(j.s, [sh](int64_t t) { return sh[t]; });
    }
    std::fill(acc.begin(), acc.end(), 0.0f);
    const T* vb = v + b * j.v_strides[0] + g * j.v_strides[1];
    for (int64_t t = 0; t < j.s; ++t) {
      const T* vt = vb + t * j.v_strides[2];
      for (int64_t h = 0; h < n; ++h) {
        const float p = rounded<T>(scores[h * s + t] / total[h]);
        float* ah = acc.data() + h * j.dv;
        for (int64_t e = 0; e < j.dv; ++e) {
          ah[e] += p * static_cast<float>(vt[e]);
        }
      }
    }
    for (int64_t e = 0; e < n * j.dv; ++e) {
      out[item * j.dv + e] = static_cast<T>(acc[e]);
    }
    item += n;
  }
}

// float32 (the CPU's decode dtype) in copies for AVX-512 and AVX2 beside
// the baseline one, picked once at load time by the CPU (GCC on x86-64);
// the templates above inline into each copy. The copies are picked through
// an ifunc, hence glibc.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && \
    defined(__GLIBC__)
#define CHESS_MLX_CPU_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CHESS_MLX_CPU_CLONES
#endif

CHESS_MLX_CPU_CLONES void attention_items_f32(
    const AttentionJob& j,
    int64_t i0,
    int64_t i1) {
  attention_items<float>(j, i0, i1);
}

CHESS_MLX_CPU_CLONES void silu_f32(const float* x, float* y, int64_t n) {
  silu_values(x, y, n);
}

void attention_task(void* ctx, int t, int ntasks) {
  auto* j = static_cast<AttentionJob*>(ctx);
  const int64_t i0 = j->items * t / ntasks;
  const int64_t i1 = j->items * (t + 1) / ntasks;
  j->run(*j, i0, i1);
}

// K or V as (pointer, strides of its first three axes); a copy when its
// last axis is not contiguous.
const void* kv_view(
    const mx::array& a,
    std::vector<char>& buf,
    int64_t strides[3]) {
  if (a.strides()[3] == 1 || a.shape(3) <= 1) {
    for (int i = 0; i < 3; ++i) {
      strides[i] = a.strides()[i];
    }
    return a.data<char>();
  }
  const void* p = materialize(operand(a), buf);
  strides[2] = a.shape(3);
  strides[1] = strides[2] * a.shape(2);
  strides[0] = strides[1] * a.shape(1);
  return p;
}

} // namespace

///////////////////////////////////////////////////////////////////////////////
// Ops
///////////////////////////////////////////////////////////////////////////////

mx::array rms_norm(
    const mx::array& x,
    const mx::array& w,
    float eps,
    mx::StreamOrDevice s) {
  constexpr const char* op = "rms_norm";
  mx::Stream st = cpu_stream(op, s);
  check_float_dtype(op, "x", x);
  if (x.ndim() < 1 || w.ndim() != 1 || w.shape(0) != x.shape(-1)) {
    fail(
        op,
        "w must have shape (n,) for x of shape (..., n), got " +
            shape_str(w) + " and " + shape_str(x));
  }
  if (w.dtype() != x.dtype()) {
    fail(op, "w must have the same dtype as x");
  }
  return mx::array(
      x.shape(), x.dtype(), std::make_shared<RmsNormOne>(st, eps), {x, w});
}

mx::array silu(const mx::array& x, mx::StreamOrDevice s) {
  constexpr const char* op = "silu";
  mx::Stream st = cpu_stream(op, s);
  check_float_dtype(op, "x", x);
  return mx::array(x.shape(), x.dtype(), std::make_shared<Silu>(st), {x});
}

mx::array rope_one(
    const mx::array& x,
    const mx::array& inv_freqs,
    int offset,
    float scale,
    bool traditional,
    mx::StreamOrDevice s) {
  constexpr const char* op = "rope_one";
  mx::Stream st = cpu_stream(op, s);
  check_float_dtype(op, "x", x);
  if (inv_freqs.dtype() != mx::float32 || inv_freqs.ndim() != 1 ||
      x.ndim() < 1 || 2 * inv_freqs.shape(0) > x.shape(-1)) {
    fail(
        op,
        "inv_freqs must be float32 of shape (dims / 2,) with dims <= " +
            std::string("the last axis of x, got ") + shape_str(inv_freqs) +
            " for x of shape " + shape_str(x));
  }
  return mx::array(
      x.shape(),
      x.dtype(),
      std::make_shared<RopeOne>(st, offset, scale, traditional),
      {x, inv_freqs});
}

mx::array attention_one(
    const mx::array& q,
    const mx::array& k,
    const mx::array& v,
    float scale,
    mx::StreamOrDevice s) {
  constexpr const char* op = "attention_one";
  mx::Stream st = cpu_stream(op, s);
  check_float_dtype(op, "q", q);
  if (k.dtype() != q.dtype() || v.dtype() != q.dtype()) {
    fail(op, "k and v must have the same dtype as q");
  }
  if (q.ndim() != 4 || q.shape(1) != 1 || k.ndim() != 4 || v.ndim() != 4) {
    fail(
        op,
        "q must be (B, 1, Hq, D) and k, v (B, Hkv, S, D), got " +
            shape_str(q) + ", " + shape_str(k) + " and " + shape_str(v));
  }
  const int hkv = k.shape(1);
  if (k.shape(0) != q.shape(0) || k.shape(3) != q.shape(3) ||
      v.shape(0) != k.shape(0) || v.shape(1) != hkv ||
      v.shape(2) != k.shape(2) || hkv == 0 || q.shape(2) % hkv != 0) {
    fail(
        op,
        "q (B, 1, Hq, D), k (B, Hkv, S, D) and v (B, Hkv, S, Dv) disagree "
        "(or Hq is not a multiple of Hkv): " +
            shape_str(q) + ", " + shape_str(k) + ", " + shape_str(v));
  }
  mx::Shape out_shape = q.shape();
  out_shape.back() = v.shape(3);
  return mx::array(
      std::move(out_shape),
      q.dtype(),
      std::make_shared<AttentionOne>(st, scale),
      {q, k, v});
}

///////////////////////////////////////////////////////////////////////////////
// Primitives
///////////////////////////////////////////////////////////////////////////////

void RmsNormOne::eval_cpu(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  auto& y = outputs[0];
  auto& encoder = prepare(stream(), inputs, y);
  encoder.dispatch([xo = operand(inputs[0]),
                    wo = operand(inputs[1]),
                    y_ptr = y.data<void>(),
                    n = static_cast<int64_t>(inputs[0].shape(-1)),
                    dtype = y.dtype(),
                    eps = eps_]() {
    if (n == 0 || xo.size == 0) {
      return;
    }
    std::vector<char> xbuf, wbuf;
    const void* xp = materialize(xo, xbuf);
    const void* wp = materialize(wo, wbuf);
    with_dtype(dtype, [&]<typename T>() {
      rms_norm_rows(
          static_cast<const T*>(xp), static_cast<const T*>(wp),
          static_cast<T*>(y_ptr), xo.size / n, n, eps);
    });
  });
}

void Silu::eval_cpu(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  auto& y = outputs[0];
  auto& encoder = prepare(stream(), inputs, y);
  encoder.dispatch(
      [xo = operand(inputs[0]), y_ptr = y.data<void>(), dtype = y.dtype()]() {
        std::vector<char> xbuf;
        const void* xp = materialize(xo, xbuf);
        with_dtype(dtype, [&]<typename T>() {
          if constexpr (std::is_same_v<T, float>) {
            silu_f32(static_cast<const float*>(xp), static_cast<float*>(y_ptr), xo.size);
          } else {
            silu_values(static_cast<const T*>(xp), static_cast<T*>(y_ptr), xo.size);
          }
        });
      });
}

void RopeOne::eval_cpu(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  auto& y = outputs[0];
  auto& encoder = prepare(stream(), inputs, y);
  encoder.dispatch([xo = operand(inputs[0]),
                    fo = operand(inputs[1]),
                    y_ptr = y.data<void>(),
                    d = static_cast<int64_t>(inputs[0].shape(-1)),
                    half = static_cast<int64_t>(inputs[1].shape(0)),
                    dtype = y.dtype(),
                    offset = offset_,
                    scale = scale_,
                    traditional = traditional_]() {
    if (d == 0 || xo.size == 0) {
      return;
    }
    std::vector<char> xbuf, fbuf;
    const void* xp = materialize(xo, xbuf);
    const auto* fp = static_cast<const float*>(materialize(fo, fbuf));
    with_dtype(dtype, [&]<typename T>() {
      rope_rows(
          static_cast<const T*>(xp), fp, static_cast<T*>(y_ptr), xo.size / d,
          d, half, offset, scale, traditional);
    });
  });
}

void AttentionOne::eval_cpu(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  const auto& q = inputs[0];
  const auto& k = inputs[1];
  const auto& v = inputs[2];
  auto& out = outputs[0];
  auto& encoder = prepare(stream(), inputs, out);
  AttentionJob job{};
  job.out = out.data<void>();
  job.heads = q.shape(2);
  job.rep = q.shape(2) / k.shape(1);
  job.s = k.shape(2);
  job.d = q.shape(3);
  job.dv = v.shape(3);
  job.scale = scale_;
  job.items = q.shape(0) * q.shape(2);
  with_dtype(q.dtype(), [&]<typename T>() {
    if constexpr (std::is_same_v<T, float>) {
      job.run = &attention_items_f32;
    } else {
      job.run = &attention_items<T>;
    }
  });
  encoder.dispatch([job,
                    qo = operand(q),
                    k,
                    v,
                    itemsize = static_cast<int64_t>(q.itemsize())]() mutable {
    if (job.items == 0 || job.dv == 0) {
      return;
    }
    std::vector<char> qbuf, kbuf, vbuf;
    job.q = materialize(qo, qbuf);
    job.k = kv_view(k, kbuf, job.k_strides);
    job.v = kv_view(v, vbuf, job.v_strides);
    const int64_t bytes =
        job.items / job.rep * job.s * (job.d + job.dv) * itemsize;
    const int nth = bytes < kMinParallelAttentionBytes ? 1 : pool::num_threads();
    const int ntasks = static_cast<int>(std::min<int64_t>(nth * 2, job.items));
    if (ntasks <= 1) {
      attention_task(&job, 0, 1);
    } else {
      pool::run(ntasks, &attention_task, &job);
    }
  });
}

void RmsNormOne::eval_gpu(
    const std::vector<mx::array>&,
    std::vector<mx::array>&) {
  throw std::runtime_error("[RmsNormOne] CPU only; use mx.fast.rms_norm.");
}

void Silu::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("[Silu] CPU only; use nn.silu.");
}

void RopeOne::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("[RopeOne] CPU only; use mx.fast.rope.");
}

void AttentionOne::eval_gpu(
    const std::vector<mx::array>&,
    std::vector<mx::array>&) {
  throw std::runtime_error(
      "[AttentionOne] CPU only; use mx.fast.scaled_dot_product_attention.");
}

} // namespace chess_mlx

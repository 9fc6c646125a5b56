// Sparse GEMV compute kernels, written as plain loops that g++/clang -O3
// auto-vectorize for whatever instruction set the including translation
// unit is compiled for. Included (only) by kernels_generic.cpp and
// kernels_avx2.cpp, each of which defines:
//   CHESS_MLX_KERNEL_NS     namespace for this copy (e.g. generic, avx2)
//   CHESS_MLX_KERNEL_TABLE  name of the exported table accessor
//   CHESS_MLX_KERNEL_ISA    string naming the instruction set
// Everything except the table accessor has internal linkage, so the copies
// built with different -m flags can never be merged by the linker.
//
// Notes on the loop shapes:
// * fp16/bf16 are handled as raw uint16 bits and converted with integer
//   ops + bit casts (branch-free), which vectorizes on any ISA (x86 without
//   F16C has no fast scalar half conversion). Exception: when compiled with
//   F16C (the AVX2 copy), fp16 weights are converted block-wise with
//   vcvtph2ps into an L1 buffer and fed to the float32 loops.
// * Selections use integer masks rather than ?: on floats: with the default
//   -ftrapping-math g++ will not if-convert floating-point ternaries.
// * Reductions use explicit lane arrays so no -ffast-math is needed.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "kernels.h"

#if (defined(__F16C__) && defined(__AVX__)) || defined(__AVX2__)
#include <immintrin.h>
#endif

#if !defined(CHESS_MLX_KERNEL_NS) || !defined(CHESS_MLX_KERNEL_TABLE) || \
    !defined(CHESS_MLX_KERNEL_ISA)
#error "define CHESS_MLX_KERNEL_NS, _TABLE and _ISA before including"
#endif

#if defined(__GNUC__)
#define CHESS_MLX_RESTRICT __restrict__
#else
#define CHESS_MLX_RESTRICT
#endif

namespace chess_mlx::kernels {
namespace CHESS_MLX_KERNEL_NS {
namespace {

// Output columns accumulated at once by spvmm (float32 accumulators, 16 KiB,
// L1/L2 resident). Long row segments stream better from DRAM than short
// ones: 4096 measured fastest among 512..8192 (-DCHESS_MLX_COL_TILE=N to
// experiment).
#ifndef CHESS_MLX_COL_TILE
#define CHESS_MLX_COL_TILE 4096
#endif
constexpr int64_t kColTile = CHESS_MLX_COL_TILE;
// Lanes per partial-sum array in the vmmsp dot products.
constexpr int kLanes = 16;

inline float bits_to_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline uint32_t f32_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

// IEEE half -> float, exact for all inputs (incl. subnormals, inf, nan).
inline float half_to_f32(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized =
      bits_to_f32((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized =
      bits_to_f32((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t m = 0u - static_cast<uint32_t>(two_w < (1u << 27));
  return bits_to_f32(
      sign | (f32_to_bits(denormalized) & m) |
      (f32_to_bits(normalized) & ~m));
}

// float -> IEEE half, round to nearest even (nan -> 0x7E00).
inline uint16_t f32_to_half(float f) {
  float base = (__builtin_fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = f32_to_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) {
    bias = 0x71000000u;
  }
  base = bits_to_f32((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = f32_to_bits(base);
  const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
  const uint32_t mantissa_bits = bits & 0x00000FFFu;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  return static_cast<uint16_t>(
      (sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

inline float bf16_to_f32(uint16_t b) {
  return bits_to_f32(static_cast<uint32_t>(b) << 16);
}

// float -> bfloat16, round to nearest even, nan -> 0x7FC0 (as MLX does).
inline uint16_t f32_to_bf16(float f) {
  if (f != f) {
    return 0x7FC0u;
  }
  uint32_t u = f32_to_bits(f);
  u += ((u >> 16) & 1u) + 0x7FFFu;
  return static_cast<uint16_t>(u >> 16);
}

#if defined(__F16C__) && defined(__AVX__)
#define CHESS_MLX_HW_HALF 1
// Elements per row block converted at once on the hardware-half path.
constexpr int64_t kHalfBlock = 256;

// n halves -> floats with the F16C instruction (vcvtph2ps). g++ 12 neither
// auto-vectorizes scalar _Float16 conversions nor __builtin_convertvector
// on half vectors (it emits one vcvtph2ps per element), hence the intrinsic.
// (immintrin.h functions are always-inline, so nothing compiled with these
// flags can leak into the portable copy.)
inline void half_block_to_f32(
    const uint16_t* CHESS_MLX_RESTRICT src,
    float* CHESS_MLX_RESTRICT dst,
    int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m128i h =
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j));
    _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(h));
  }
  for (; j < n; ++j) {
    dst[j] = half_to_f32(src[j]);
  }
}
#else
#define CHESS_MLX_HW_HALF 0
#endif

template <int DT>
struct Elem;

template <>
struct Elem<F32> {
  using S = float;
  static inline float load(float v) {
    return v;
  }
  static inline float store(float v) {
    return v;
  }
};

template <>
struct Elem<F16> {
  using S = uint16_t;
  static inline float load(uint16_t v) {
    return half_to_f32(v);
  }
  static inline uint16_t store(float v) {
    return f32_to_half(v);
  }
};

template <>
struct Elem<BF16> {
  using S = uint16_t;
  static inline float load(uint16_t v) {
    return bf16_to_f32(v);
  }
  static inline uint16_t store(float v) {
    return f32_to_bf16(v);
  }
};

// |v| >= t; false for nan.
inline bool keep(float v, float t) {
  return __builtin_fabsf(v) >= t;
}

template <int DT>
int64_t collect_in(
    const void* xv,
    int64_t n,
    const float* thr,
    int64_t thr_stride,
    int32_t* CHESS_MLX_RESTRICT idx,
    float* CHESS_MLX_RESTRICT vals) {
  using E = Elem<DT>;
  const auto* x = static_cast<const typename E::S*>(xv);
  // Branch-free: every channel is written at the next free slot, which
  // only a kept one claims. A branch per channel would mispredict on about
  // half of them, as many cycles as a sparse GEMV's quarter of its rows.
  int64_t k = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float v = E::load(x[i]);
    idx[k] = static_cast<int32_t>(i);
    vals[k] = v;
    k += keep(v, thr[i * thr_stride]);
  }
  return k;
}

template <int DT>
int64_t collect_out(
    const void* gv,
    int64_t n,
    const float* thr,
    int64_t thr_stride,
    int32_t* CHESS_MLX_RESTRICT idx,
    float* CHESS_MLX_RESTRICT gates,
    void* yv) {
  using E = Elem<DT>;
  const auto* g = static_cast<const typename E::S*>(gv);
  auto* y = static_cast<typename E::S*>(yv);
  // Branch-free as collect_in; kept outputs' zeros are overwritten later.
  const typename E::S zero = E::store(0.0f);
  int64_t k = 0;
  for (int64_t o = 0; o < n; ++o) {
    const float v = E::load(g[o]);
    idx[k] = static_cast<int32_t>(o);
    gates[k] = v;
    y[o] = zero;
    k += keep(v, thr[o * thr_stride]);
  }
  return k;
}

template <int DT>
void to_f32(const void* xv, int64_t n, float* CHESS_MLX_RESTRICT out) {
  using E = Elem<DT>;
  const auto* x = static_cast<const typename E::S*>(xv);
#if defined(__AVX512F__)
  // Masked blocks of 16, the last one partial: a quantized row's scales and
  // biases (under 16 at group 64 below 1024 inputs) fell entirely to the
  // scalar tail of a 16-wide vector loop, about a sixth of the output GEMV's
  // time at 960 inputs.
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? static_cast<__mmask16>(0xFFFF)
                                    : static_cast<__mmask16>((1u << (n - i)) - 1u);
    __m512 v;
    if constexpr (DT == F32) {
      v = _mm512_maskz_loadu_ps(m, x + i);
    } else {
      const __m256i h = _mm256_maskz_loadu_epi16(m, x + i);
      if constexpr (DT == BF16) {
        v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
      } else {
        v = _mm512_cvtph_ps(h);
      }
    }
    _mm512_mask_storeu_ps(out + i, m, v);
  }
#else
#if CHESS_MLX_HW_HALF
  if constexpr (DT == F16) {
    half_block_to_f32(x, out, n);
    return;
  }
#endif
  for (int64_t i = 0; i < n; ++i) {
    out[i] = E::load(x[i]);
  }
#endif
}

// acc[j] += sum over k in [k0, k1) of vals[k] * wt[idx[k] * out + t0 + j]
// for j in [0, w). Eight rows per pass over acc: fewer accumulator
// loads/stores per weight load (measured ~2x faster than four rows).
template <int DT>
inline void accumulate_rows(
    float* CHESS_MLX_RESTRICT acc,
    const typename Elem<DT>::S* wt,
    int64_t out,
    int64_t t0,
    int64_t w,
    const int32_t* CHESS_MLX_RESTRICT idx,
    const float* CHESS_MLX_RESTRICT vals,
    int64_t k0,
    int64_t k1) {
  using E = Elem<DT>;
  using S = typename E::S;
#if CHESS_MLX_HW_HALF
  if constexpr (DT == F16) {
    // Hardware half conversion: convert blocks of up to 8 rows to float32
    // in L1, then run the float32 accumulation on them.
    static constexpr int32_t kIota[8] = {0, 1, 2, 3, 4, 5, 6, 7};
    alignas(64) float buf[8 * kHalfBlock];
    for (int64_t k = k0; k < k1; k += 8) {
      const int64_t nr = (k1 - k) < 8 ? (k1 - k) : 8;
      for (int64_t c = 0; c < w; c += kHalfBlock) {
        const int64_t bw = (w - c) < kHalfBlock ? (w - c) : kHalfBlock;
        for (int64_t r = 0; r < nr; ++r) {
          half_block_to_f32(
              wt + idx[k + r] * out + t0 + c, buf + r * kHalfBlock, bw);
        }
        accumulate_rows<F32>(
            acc + c, buf, kHalfBlock, 0, bw, kIota, vals + k, 0, nr);
      }
    }
    return;
  }
#endif
  int64_t k = k0;
  for (; k + 8 <= k1; k += 8) {
    const S* CHESS_MLX_RESTRICT r0 = wt + idx[k] * out + t0;
    const S* CHESS_MLX_RESTRICT r1 = wt + idx[k + 1] * out + t0;
    const S* CHESS_MLX_RESTRICT r2 = wt + idx[k + 2] * out + t0;
    const S* CHESS_MLX_RESTRICT r3 = wt + idx[k + 3] * out + t0;
    const S* CHESS_MLX_RESTRICT r4 = wt + idx[k + 4] * out + t0;
    const S* CHESS_MLX_RESTRICT r5 = wt + idx[k + 5] * out + t0;
    const S* CHESS_MLX_RESTRICT r6 = wt + idx[k + 6] * out + t0;
    const S* CHESS_MLX_RESTRICT r7 = wt + idx[k + 7] * out + t0;
    const float v0 = vals[k], v1 = vals[k + 1], v2 = vals[k + 2];
    const float v3 = vals[k + 3], v4 = vals[k + 4], v5 = vals[k + 5];
    const float v6 = vals[k + 6], v7 = vals[k + 7];
    for (int64_t j = 0; j < w; ++j) {
      acc[j] += (v0 * E::load(r0[j]) + v1 * E::load(r1[j]) +
                 v2 * E::load(r2[j]) + v3 * E::load(r3[j])) +
          (v4 * E::load(r4[j]) + v5 * E::load(r5[j]) + v6 * E::load(r6[j]) +
           v7 * E::load(r7[j]));
    }
  }
  if (k + 4 <= k1) {
    const S* CHESS_MLX_RESTRICT r0 = wt + idx[k] * out + t0;
    const S* CHESS_MLX_RESTRICT r1 = wt + idx[k + 1] * out + t0;
    const S* CHESS_MLX_RESTRICT r2 = wt + idx[k + 2] * out + t0;
    const S* CHESS_MLX_RESTRICT r3 = wt + idx[k + 3] * out + t0;
    const float v0 = vals[k], v1 = vals[k + 1];
    const float v2 = vals[k + 2], v3 = vals[k + 3];
    for (int64_t j = 0; j < w; ++j) {
      acc[j] += v0 * E::load(r0[j]) + v1 * E::load(r1[j]) +
          v2 * E::load(r2[j]) + v3 * E::load(r3[j]);
    }
    k += 4;
  }
  for (; k < k1; ++k) {
    const S* CHESS_MLX_RESTRICT r0 = wt + idx[k] * out + t0;
    const float v0 = vals[k];
    for (int64_t j = 0; j < w; ++j) {
      acc[j] += v0 * E::load(r0[j]);
    }
  }
}

template <int DT>
void spvmm_cols(
    const void* wtv,
    int64_t out,
    const int32_t* CHESS_MLX_RESTRICT idx,
    const float* CHESS_MLX_RESTRICT vals,
    int64_t nact,
    int64_t o0,
    int64_t o1,
    void* yv) {
  using E = Elem<DT>;
  using S = typename E::S;
  const S* wt = static_cast<const S*>(wtv);
  S* y = static_cast<S*>(yv);
  alignas(64) float acc[kColTile];
  for (int64_t t0 = o0; t0 < o1; t0 += kColTile) {
    const int64_t w = (o1 - t0) < kColTile ? (o1 - t0) : kColTile;
    for (int64_t j = 0; j < w; ++j) {
      acc[j] = 0.0f;
    }
    accumulate_rows<DT>(acc, wt, out, t0, w, idx, vals, 0, nact);
    for (int64_t j = 0; j < w; ++j) {
      y[t0 + j] = E::store(acc[j]);
    }
  }
}

// Split-K variant: acc[o - o0] = sum over k in [k0, k1) of
// vals[k] * wt[idx[k] * out + o] for o in [o0, o1) (acc is overwritten).
template <int DT>
void spvmm_partial(
    const void* wtv,
    int64_t out,
    const int32_t* CHESS_MLX_RESTRICT idx,
    const float* CHESS_MLX_RESTRICT vals,
    int64_t k0,
    int64_t k1,
    int64_t o0,
    int64_t o1,
    float* CHESS_MLX_RESTRICT accv) {
  using S = typename Elem<DT>::S;
  const S* wt = static_cast<const S*>(wtv);
  for (int64_t t0 = o0; t0 < o1; t0 += kColTile) {
    const int64_t w = (o1 - t0) < kColTile ? (o1 - t0) : kColTile;
    float* CHESS_MLX_RESTRICT acc = accv + (t0 - o0);
    for (int64_t j = 0; j < w; ++j) {
      acc[j] = 0.0f;
    }
    accumulate_rows<DT>(acc, wt, out, t0, w, idx, vals, k0, k1);
  }
}

// y[o] = sum_p parts[p * stride + o] for o in [o0, o1).
template <int DT>
void reduce_store(
    const float* CHESS_MLX_RESTRICT parts,
    int nparts,
    int64_t stride,
    int64_t o0,
    int64_t o1,
    void* yv) {
  using E = Elem<DT>;
  using S = typename E::S;
  S* y = static_cast<S*>(yv);
  for (int64_t o = o0; o < o1; ++o) {
    float s = parts[o];
    for (int p = 1; p < nparts; ++p) {
      s += parts[p * stride + o];
    }
    y[o] = E::store(s);
  }
}

inline float lane_sum(const float* a) {
  float s[kLanes / 2];
  for (int l = 0; l < kLanes / 2; ++l) {
    s[l] = a[l] + a[l + kLanes / 2];
  }
  for (int h = kLanes / 4; h >= 1; h /= 2) {
    for (int l = 0; l < h; ++l) {
      s[l] += s[l + h];
    }
  }
  return s[0];
}

// a_r[l] += sum over j < n, j % kLanes == l of load(w_r[j]) * xf[j] for the
// four rows r (n a multiple of kLanes). Four rows share every load of x.
template <int DT>
inline void dot4_lanes(
    float* CHESS_MLX_RESTRICT a0,
    float* CHESS_MLX_RESTRICT a1,
    float* CHESS_MLX_RESTRICT a2,
    float* CHESS_MLX_RESTRICT a3,
    const typename Elem<DT>::S* CHESS_MLX_RESTRICT w0,
    const typename Elem<DT>::S* CHESS_MLX_RESTRICT w1,
    const typename Elem<DT>::S* CHESS_MLX_RESTRICT w2,
    const typename Elem<DT>::S* CHESS_MLX_RESTRICT w3,
    const float* CHESS_MLX_RESTRICT xf,
    int64_t n) {
  using E = Elem<DT>;
  float b0[kLanes], b1[kLanes], b2[kLanes], b3[kLanes];
  for (int l = 0; l < kLanes; ++l) {
    b0[l] = a0[l];
    b1[l] = a1[l];
    b2[l] = a2[l];
    b3[l] = a3[l];
  }
  for (int64_t j = 0; j < n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const float xv = xf[j + l];
      b0[l] += E::load(w0[j + l]) * xv;
      b1[l] += E::load(w1[j + l]) * xv;
      b2[l] += E::load(w2[j + l]) * xv;
      b3[l] += E::load(w3[j + l]) * xv;
    }
  }
  for (int l = 0; l < kLanes; ++l) {
    a0[l] = b0[l];
    a1[l] = b1[l];
    a2[l] = b2[l];
    a3[l] = b3[l];
  }
}

template <int DT>
inline void dot1_lanes(
    float* CHESS_MLX_RESTRICT a0,
    const typename Elem<DT>::S* CHESS_MLX_RESTRICT w0,
    const float* CHESS_MLX_RESTRICT xf,
    int64_t n) {
  using E = Elem<DT>;
  float b0[kLanes];
  for (int l = 0; l < kLanes; ++l) {
    b0[l] = a0[l];
  }
  for (int64_t j = 0; j < n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      b0[l] += E::load(w0[j + l]) * xf[j + l];
    }
  }
  for (int l = 0; l < kLanes; ++l) {
    a0[l] = b0[l];
  }
}

template <int DT>
void vmmsp_rows(
    const void* wv,
    int64_t in,
    const float* CHESS_MLX_RESTRICT xf,
    const int32_t* CHESS_MLX_RESTRICT idx,
    const float* CHESS_MLX_RESTRICT gates,
    int64_t k0,
    int64_t k1,
    void* yv) {
  using E = Elem<DT>;
  using S = typename E::S;
  const S* w = static_cast<const S*>(wv);
  S* y = static_cast<S*>(yv);
  const int64_t in_main = in - in % kLanes;
#if CHESS_MLX_HW_HALF
  // Hardware half conversion: convert blocks of the rows to float32 in L1,
  // then run the float32 dot products on them.
  alignas(64) float buf[4 * kHalfBlock];
#endif
  // The four rows of a pass come from the four quarters of [k0, k1): four
  // independent streams for the hardware prefetcher instead of one. Dense
  // (all rows kept) 128256x2048 and 49152x576 GEMVs, the LM heads, ran
  // 5-30% faster this way on our 2-vCPU EPYC; sparse rows were unchanged.
  const int64_t q = (k1 - k0) / 4;
  for (int64_t i = 0; i < q; ++i) {
    const int64_t ks[4] = {k0 + i, k0 + q + i, k0 + 2 * q + i, k0 + 3 * q + i};
    const S* w0 = w + idx[ks[0]] * in;
    const S* w1 = w + idx[ks[1]] * in;
    const S* w2 = w + idx[ks[2]] * in;
    const S* w3 = w + idx[ks[3]] * in;
    float a0[kLanes] = {}, a1[kLanes] = {}, a2[kLanes] = {}, a3[kLanes] = {};
#if CHESS_MLX_HW_HALF
    if constexpr (DT == F16) {
      for (int64_t c = 0; c < in_main; c += kHalfBlock) {
        const int64_t bw =
            (in_main - c) < kHalfBlock ? (in_main - c) : kHalfBlock;
        half_block_to_f32(w0 + c, buf, bw);
        half_block_to_f32(w1 + c, buf + kHalfBlock, bw);
        half_block_to_f32(w2 + c, buf + 2 * kHalfBlock, bw);
        half_block_to_f32(w3 + c, buf + 3 * kHalfBlock, bw);
        dot4_lanes<F32>(
            a0, a1, a2, a3, buf, buf + kHalfBlock, buf + 2 * kHalfBlock,
            buf + 3 * kHalfBlock, xf + c, bw);
      }
    } else
#endif
    {
      dot4_lanes<DT>(a0, a1, a2, a3, w0, w1, w2, w3, xf, in_main);
    }
    float s0 = lane_sum(a0), s1 = lane_sum(a1);
    float s2 = lane_sum(a2), s3 = lane_sum(a3);
    for (int64_t j = in_main; j < in; ++j) {
      const float xv = xf[j];
      s0 += E::load(w0[j]) * xv;
      s1 += E::load(w1[j]) * xv;
      s2 += E::load(w2[j]) * xv;
      s3 += E::load(w3[j]) * xv;
    }
    y[idx[ks[0]]] = E::store(gates[ks[0]] * s0);
    y[idx[ks[1]]] = E::store(gates[ks[1]] * s1);
    y[idx[ks[2]]] = E::store(gates[ks[2]] * s2);
    y[idx[ks[3]]] = E::store(gates[ks[3]] * s3);
  }
  for (int64_t k = k0 + 4 * q; k < k1; ++k) {
    const S* w0 = w + idx[k] * in;
    float a0[kLanes] = {};
    dot1_lanes<DT>(a0, w0, xf, in_main);
    float s0 = lane_sum(a0);
    for (int64_t j = in_main; j < in; ++j) {
      s0 += E::load(w0[j]) * xf[j];
    }
    y[idx[k]] = E::store(gates[k] * s0);
  }
}

// ---------------------------------------------------------------------------
// Affine-quantized weights (see kernels.h). Codes are unpacked with shifts
// and masks in the innermost loop over one word's codes, which vectorizes
// (8 lanes at 4 bits); everything accumulates in float32.
// ---------------------------------------------------------------------------

// One hint per 64-byte line of [p, p + bytes), at __builtin_prefetch's
// locality (3: into L1, 2: into L2).
template <int kLocality = 3>
inline void prefetch_bytes(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t b = 0; b < bytes; b += 64) {
    __builtin_prefetch(c + b, 0, kLocality);
  }
  if (bytes > 0) {
    // an unaligned start's last line
    __builtin_prefetch(c + bytes - 1, 0, kLocality);
  }
}

// Words of packed codes in a 64-byte cache line.
constexpr int64_t kLineWords = 64 / sizeof(uint32_t);

// One line of each of the next pass's R rows (next[0, R)) into L1 and of
// the pass after's (next[R, 2R)) into L2, at word offset j0: called as a
// pass goes, so the fetches spread over it instead of coming in a burst.
template <int R>
inline void prefetch_next_lines(const uint32_t* const* next, int64_t j0) {
  for (int n = 0; n < R; ++n) {
    __builtin_prefetch(next[n] + j0, 0, 3);
    __builtin_prefetch(next[R + n] + j0, 0, 2);
  }
}

// A plain load of one byte. Software prefetches alone of the next group's
// scales and biases gained nothing measurable; led by a load of their first
// line (our guess: the prefetches were dropped on a TLB miss, which the
// load resolves) they made the GEMV about 7% faster.
inline void touch(const char* p) {
  const char v = *reinterpret_cast<const volatile char*>(p);
  asm volatile("" : : "r"(v));
}

// Scales and biases for the outputs of a pass's words, fetched line by
// line as the pass goes: the next group's into L2 during a group's first
// pass, the group's own into L1 during its last. Read cold at the group's
// end, they stalled the input-sparse GEMV for about a sixth of its time;
// its last pass alone is too short to hide a fetch from DRAM.
struct GroupPrefetch {
  const char* own[2] = {nullptr, nullptr};  // nullptr: nothing to fetch
  const char* next[2] = {nullptr, nullptr};
  int64_t bytes_per_word = 0;
  int64_t own_ahead = 0;  // words ahead of the pass that own is fetched

  void operator()(int64_t j0, int64_t words) const {
    const int64_t b0 = j0 * bytes_per_word;
    const int64_t bytes = words * bytes_per_word;
    for (int a = 0; a < 2; ++a) {
      if (own[a] != nullptr) {
        prefetch_bytes(own[a] + b0 + own_ahead * bytes_per_word, bytes);
      }
      if (next[a] != nullptr) {
        if (j0 == 0) {
          touch(next[a]);
        }
        prefetch_bytes<2>(next[a] + b0, bytes);
      }
    }
  }
};

// acc[c] += sum over the eight rows n of v[n] * code(rows[n], c), summed
// pairwise; prefetches as accumulate_codes_n does.
template <int BITS>
inline void accumulate_codes8(
    float* CHESS_MLX_RESTRICT acc,
    const uint32_t* const* rows,
    const uint32_t* const* next,
    int64_t words,
    const float* v,
    const GroupPrefetch& group_prefetch) {
  constexpr int kPer = 32 / BITS;
  constexpr uint32_t kMask = (1u << BITS) - 1u;
  const uint32_t* CHESS_MLX_RESTRICT r0 = rows[0];
  const uint32_t* CHESS_MLX_RESTRICT r1 = rows[1];
  const uint32_t* CHESS_MLX_RESTRICT r2 = rows[2];
  const uint32_t* CHESS_MLX_RESTRICT r3 = rows[3];
  const uint32_t* CHESS_MLX_RESTRICT r4 = rows[4];
  const uint32_t* CHESS_MLX_RESTRICT r5 = rows[5];
  const uint32_t* CHESS_MLX_RESTRICT r6 = rows[6];
  const uint32_t* CHESS_MLX_RESTRICT r7 = rows[7];
  const float v0 = v[0], v1 = v[1], v2 = v[2], v3 = v[3];
  const float v4 = v[4], v5 = v[5], v6 = v[6], v7 = v[7];
  for (int64_t j0 = 0; j0 < words; j0 += kLineWords) {
    prefetch_next_lines<8>(next, j0);
    const int64_t j1 = j0 + kLineWords < words ? j0 + kLineWords : words;
    group_prefetch(j0, j1 - j0);
    for (int64_t j = j0; j < j1; ++j) {
      const uint32_t u0 = r0[j], u1 = r1[j], u2 = r2[j], u3 = r3[j];
      const uint32_t u4 = r4[j], u5 = r5[j], u6 = r6[j], u7 = r7[j];
      for (int t = 0; t < kPer; ++t) {
        acc[j * kPer + t] +=
            ((v0 * static_cast<float>((u0 >> (BITS * t)) & kMask) +
              v1 * static_cast<float>((u1 >> (BITS * t)) & kMask)) +
             (v2 * static_cast<float>((u2 >> (BITS * t)) & kMask) +
              v3 * static_cast<float>((u3 >> (BITS * t)) & kMask))) +
            ((v4 * static_cast<float>((u4 >> (BITS * t)) & kMask) +
              v5 * static_cast<float>((u5 >> (BITS * t)) & kMask)) +
             (v6 * static_cast<float>((u6 >> (BITS * t)) & kMask) +
              v7 * static_cast<float>((u7 >> (BITS * t)) & kMask)));
      }
    }
  }
}

// acc[c] += sum over n < N of v[n] * code(rows[n], c): one pass for N rows,
// prefetching the eight `next` rows a line at a time as it goes.
template <int BITS, int N>
inline void accumulate_codes_n(
    float* CHESS_MLX_RESTRICT acc,
    const uint32_t* const* rows,
    const uint32_t* const* next,
    int64_t words,
    const float* v,
    const GroupPrefetch& group_prefetch) {
  constexpr int kPer = 32 / BITS;
  constexpr uint32_t kMask = (1u << BITS) - 1u;
  for (int64_t j0 = 0; j0 < words; j0 += kLineWords) {
    prefetch_next_lines<8>(next, j0);
    const int64_t j1 = j0 + kLineWords < words ? j0 + kLineWords : words;
    group_prefetch(j0, j1 - j0);
    for (int64_t j = j0; j < j1; ++j) {
      uint32_t u[N];
      for (int n = 0; n < N; ++n) {
        u[n] = rows[n][j];
      }
      for (int t = 0; t < kPer; ++t) {
        float s = 0.0f;
        for (int n = 0; n < N; ++n) {
          s += v[n] * static_cast<float>((u[n] >> (BITS * t)) & kMask);
        }
        acc[j * kPer + t] += s;
      }
    }
  }
}

// fn(std::integral_constant<int, n>{}) for a run-time row count n in
// [1, 8]: each pass's loops unroll over its rows.
template <typename Fn>
inline void with_row_count(int64_t n, Fn fn) {
  switch (n) {
    case 1: fn(std::integral_constant<int, 1>{}); break;
    case 2: fn(std::integral_constant<int, 2>{}); break;
    case 3: fn(std::integral_constant<int, 3>{}); break;
    case 4: fn(std::integral_constant<int, 4>{}); break;
    case 5: fn(std::integral_constant<int, 5>{}); break;
    case 6: fn(std::integral_constant<int, 6>{}); break;
    case 7: fn(std::integral_constant<int, 7>{}); break;
    default: fn(std::integral_constant<int, 8>{}); break;
  }
}

// Eight-lane vectors (GCC/Clang vector extensions): the output GEMV's dot
// products written as loops did not vectorize (g++ 12 emitted mostly scalar
// code), so they are spelled out here; any ISA lowers them.
typedef float F8 __attribute__((vector_size(32)));
typedef uint32_t U8 __attribute__((vector_size(32)));
typedef int32_t I8 __attribute__((vector_size(32)));

inline F8 load_f8(const float* p) {
  F8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline float sum_f8(F8 v) {
  return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}

// sum of a[i] * b[i] over [0, n), in eight lanes.
inline float dot_lanes(const float* a, const float* b, int64_t n) {
  F8 acc = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    acc += load_f8(a + i) * load_f8(b + i);
  }
  float s = sum_f8(acc);
  for (; i < n; ++i) {
    s += a[i] * b[i];
  }
  return s;
}

#if defined(__AVX2__)
// Vectors of 4-bit codes as floats, for the even/odd paths below. The
// kCodes codes at p (kCodes / 2 bytes) zero-extend to kCodes / 2 lanes whose
// low nibbles are the even codes and high nibbles the odd ones: five
// instructions per vector pair where broadcast, shift and mask take eight.
// Blocks of kCodes inputs or outputs are then kept even ones first.
struct Lanes8 {
  using F = __m256;
  static constexpr int kCodes = 16;
  static F zero() { return _mm256_setzero_ps(); }
  static F set1(float v) { return _mm256_set1_ps(v); }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static void codes(const uint32_t* p, F& even, F& odd) {
    const __m256i b = _mm256_cvtepu8_epi32(
        _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    even = _mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(15)));
    odd = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
  }
  // the vector as eight lanes
  static F8 to_f8(F v) { return F8(v); }
  // the kCodes values at p (of Elem<SDT>) split as codes() splits codes
  template <int SDT>
  static void even_odd(const typename Elem<SDT>::S* p, F& even, F& odd) {
    if constexpr (SDT == F32) {
      const __m256 lo = _mm256_loadu_ps(p);
      const __m256 hi = _mm256_loadu_ps(p + 8);
      // per 128-bit lane lo0 lo2 hi0 hi2 | lo4 lo6 hi4 hi6, then 64-bit
      // pairs reordered
      even = _mm256_castpd_ps(_mm256_permute4x64_pd(
          _mm256_castps_pd(_mm256_shuffle_ps(lo, hi, _MM_SHUFFLE(2, 0, 2, 0))),
          _MM_SHUFFLE(3, 1, 2, 0)));
      odd = _mm256_castpd_ps(_mm256_permute4x64_pd(
          _mm256_castps_pd(_mm256_shuffle_ps(lo, hi, _MM_SHUFFLE(3, 1, 3, 1))),
          _MM_SHUFFLE(3, 1, 2, 0)));
    } else {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      if constexpr (SDT == BF16) {
        even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
        odd = _mm256_castsi256_ps(
            _mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
      } else {
        // 32-bit lanes of halves packed to eight halves in the low 128 bits
        const auto halves = [](__m256i d) {
          const __m256i w = _mm256_packus_epi32(d, d);
          return _mm256_castsi256_si128(
              _mm256_permute4x64_epi64(w, _MM_SHUFFLE(3, 1, 2, 0)));
        };
        even = _mm256_cvtph_ps(halves(_mm256_and_si256(v, _mm256_set1_epi32(0xFFFF))));
        odd = _mm256_cvtph_ps(halves(_mm256_srli_epi32(v, 16)));
      }
    }
  }
  // a block stored even outputs first back to output order, in place
  static void natural_order(float* p) {
    const __m256 even = _mm256_loadu_ps(p);
    const __m256 odd = _mm256_loadu_ps(p + 8);
    const __m256 lo = _mm256_unpacklo_ps(even, odd);  // 0 1 2 3 | 8 9 10 11
    const __m256 hi = _mm256_unpackhi_ps(even, odd);  // 4 5 6 7 | 12 ... 15
    _mm256_storeu_ps(p, _mm256_permute2f128_ps(lo, hi, 0x20));
    _mm256_storeu_ps(p + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
  }
};
#endif

#if defined(__AVX512F__)
struct Lanes16 {
  using F = __m512;
  static constexpr int kCodes = 32;
  static F zero() { return _mm512_setzero_ps(); }
  static F set1(float v) { return _mm512_set1_ps(v); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static void codes(const uint32_t* p, F& even, F& odd) {
    const __m512i b = _mm512_cvtepu8_epi32(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    even = _mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(15)));
    odd = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
  }
  static F8 to_f8(F v) {
    const __m256 hi = _mm256_castpd_ps(
        _mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    return F8(_mm256_add_ps(_mm512_castps512_ps256(v), hi));
  }
  template <int SDT>
  static void even_odd(const typename Elem<SDT>::S* p, F& even, F& odd) {
    if constexpr (SDT == F32) {
      const __m512i e = _mm512_set_epi32(
          30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
      const __m512i o = _mm512_set_epi32(
          31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
      const __m512 lo = _mm512_loadu_ps(p);
      const __m512 hi = _mm512_loadu_ps(p + 16);
      even = _mm512_permutex2var_ps(lo, e, hi);
      odd = _mm512_permutex2var_ps(lo, o, hi);
    } else {
      const __m512i v = _mm512_loadu_si512(p);
      if constexpr (SDT == BF16) {
        even = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
        odd = _mm512_castsi512_ps(
            _mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
      } else {
        even = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(v));
        odd = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(v, 16)));
      }
    }
  }
  static void natural_order(float* p) {
    const __m512i lo = _mm512_set_epi32(
        23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i hi = _mm512_set_epi32(
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
    const __m512 even = _mm512_loadu_ps(p);
    const __m512 odd = _mm512_loadu_ps(p + 16);
    _mm512_storeu_ps(p, _mm512_permutex2var_ps(even, lo, odd));
    _mm512_storeu_ps(p + 16, _mm512_permutex2var_ps(even, hi, odd));
  }
};
#endif

// Blocks of V::kCodes outputs stored even ones first back to output order.
template <class V>
inline void natural_order(float* acc, int64_t w) {
  for (int64_t j = 0; j < w; j += V::kCodes) {
    V::natural_order(acc + j);
  }
}

// Outputs (input-sparse GEMV) or inputs (output GEMV) per block that the
// 4-bit paths of this build read even codes first: 32 (AVX-512), 16
// (AVX2), or 0 (natural order) when `n` is no multiple of the block.
inline int even_odd_block(int bits, int64_t n) {
#if defined(__AVX512F__)
  if (bits == 4 && n % 32 == 0) {
    return 32;
  }
#endif
#if defined(__AVX2__)
  if (bits == 4 && n % 16 == 0) {
    return 16;
  }
#endif
  (void)bits;
  (void)n;
  return 0;
}

// fn(V{}) with the vectors V that read blocks of `even_odd` (a value of
// even_odd_block) codes; false, fn not called, for 0 (natural order).
template <typename Fn>
inline bool with_lanes(int even_odd, Fn fn) {
#if defined(__AVX512F__)
  if (even_odd == 32) {
    fn(Lanes16{});
    return true;
  }
#endif
#if defined(__AVX2__)
  if (even_odd == 16) {
    fn(Lanes8{});
    return true;
  }
#endif
  (void)even_odd;
  (void)fn;
  return false;
}

// The rows of one pass (rows[0, n) = kept channels [r, r + n), the rest
// repeat channel r) and the 16 kept channels after them to prefetch
// (next[0, 8) into L1, next[8, 16) into L2), each from output column t0.
inline void pass_rows(
    const uint32_t* wq,
    int64_t words_per_row,
    int64_t word0,
    const int32_t* idx,
    int64_t nact,
    int64_t r,
    int64_t n,
    const uint32_t** rows,
    const uint32_t** next) {
  for (int i = 0; i < 8; ++i) {
    const int64_t ahead = r + n + i < nact ? r + n + i : r;
    const int64_t far = r + n + 8 + i < nact ? r + n + 8 + i : r;
    rows[i] = wq + idx[i < n ? r + i : r] * words_per_row + word0;
    next[i] = wq + idx[ahead] * words_per_row + word0;
    next[8 + i] = wq + idx[far] * words_per_row + word0;
  }
}

// The end of kept channel k's run in its group (idx ascends), with the sum
// of the run's values in xsum.
inline int64_t group_run_end(
    const int32_t* idx,
    const float* vals,
    int64_t nact,
    int64_t k,
    int64_t group_size,
    float& xsum) {
  const int64_t group_end = (idx[k] / group_size + 1) * group_size;
  int64_t end = k;
  xsum = 0.0f;
  while (end < nact && idx[end] < group_end) {
    xsum += vals[end];
    ++end;
  }
  return end;
}

// A pass's prefetches of scales and biases (see GroupPrefetch): the group's
// own (sg, bg) with `own`; with `first`, those of the group of kept channel
// `end`, the next run's, if there is one.
template <class S>
inline GroupPrefetch scale_prefetch(
    const S* scales,
    const S* biases,
    const S* sg,
    const S* bg,
    int64_t out,
    int64_t t0,
    int64_t group_size,
    const int32_t* idx,
    int64_t nact,
    int64_t end,
    int64_t bytes_per_word,
    bool own,
    bool first) {
  GroupPrefetch prefetch;
  prefetch.bytes_per_word = bytes_per_word;
  if (own) {
    prefetch.own[0] = reinterpret_cast<const char*>(sg);
    prefetch.own[1] = reinterpret_cast<const char*>(bg);
  }
  if (first && end < nact) {
    const int64_t g1 = idx[end] / group_size;
    prefetch.next[0] = reinterpret_cast<const char*>(scales + g1 * out + t0);
    prefetch.next[1] = reinterpret_cast<const char*>(biases + g1 * out + t0);
  }
  return prefetch;
}

// One pass of a group in the 4-bit even/odd path: acc (the group's sums so
// far, unless kFirst) plus the N rows; with kLast, scale * sums + bias * xsum
// goes straight into yacc instead of back into acc. acc, yacc, and the
// scales and biases as even_odd reads them, are all in V's block order.
template <class V, int SDT, int N, bool kFirst, bool kLast>
inline void group_pass_4bit(
    float* CHESS_MLX_RESTRICT acc,
    float* CHESS_MLX_RESTRICT yacc,
    const uint32_t* const* rows,
    const uint32_t* const* next,
    int64_t words,
    const float* v,
    const typename Elem<SDT>::S* sg,
    const typename Elem<SDT>::S* bg,
    float xsum,
    const GroupPrefetch& group_prefetch) {
  using F = typename V::F;
  constexpr int64_t kWords = V::kCodes / 8;
  constexpr int64_t kHalf = V::kCodes / 2;
  F vn[N];
  for (int n = 0; n < N; ++n) {
    vn[n] = V::set1(v[n]);
  }
  const F xs = V::set1(xsum);
  for (int64_t j0 = 0; j0 < words; j0 += kLineWords) {
    prefetch_next_lines<8>(next, j0);
    const int64_t j1 = j0 + kLineWords < words ? j0 + kLineWords : words;
    group_prefetch(j0, j1 - j0);
    for (int64_t j = j0; j < j1; j += kWords) {
      F even = kFirst ? V::zero() : V::load(acc + 8 * j);
      F odd = kFirst ? V::zero() : V::load(acc + 8 * j + kHalf);
      for (int n = 0; n < N; ++n) {
        F ce, co;
        V::codes(rows[n] + j, ce, co);
        even = V::fmadd(vn[n], ce, even);
        odd = V::fmadd(vn[n], co, odd);
      }
      if constexpr (kLast) {
        F se, so, be, bo;
        V::template even_odd<SDT>(sg + 8 * j, se, so);
        V::template even_odd<SDT>(bg + 8 * j, be, bo);
        float* y = yacc + 8 * j;
        V::store(y, V::fmadd(se, even, V::fmadd(be, xs, V::load(y))));
        V::store(y + kHalf, V::fmadd(so, odd, V::fmadd(bo, xs, V::load(y + kHalf))));
      } else {
        V::store(acc + 8 * j, even);
        V::store(acc + 8 * j + kHalf, odd);
      }
    }
  }
}

// yacc[j] (j < w, output t0 + j) = the 4-bit input-sparse GEMV of the kept
// channels in vectors V. Sums stay in V's block order until the end: a
// group's first pass starts from zero and its last adds the scaled sums to
// yacc, so no pass over the tile per group clears, reorders or scales.
template <class V, int SDT>
__attribute__((noinline)) void qspvmm_tile_4bit(
    const uint32_t* wq,
    int64_t out,
    int64_t group_size,
    const typename Elem<SDT>::S* scales,
    const typename Elem<SDT>::S* biases,
    const int32_t* CHESS_MLX_RESTRICT idx,
    const float* CHESS_MLX_RESTRICT vals,
    int64_t nact,
    int64_t t0,
    int64_t w,
    float* CHESS_MLX_RESTRICT yacc) {
  using S = typename Elem<SDT>::S;
  alignas(64) float acc[kColTile];
  const int64_t words_per_row = out / 8;
  const int64_t words = w / 8;
  for (int64_t j = 0; j < w; ++j) {
    yacc[j] = 0.0f;
  }
  int64_t k = 0;
  while (k < nact) {
    float xsum;
    const int64_t end = group_run_end(idx, vals, nact, k, group_size, xsum);
    const int64_t g = idx[k] / group_size;
    const S* sg = scales + g * out + t0;
    const S* bg = biases + g * out + t0;
    const uint32_t* rows[8];
    const uint32_t* next[16];
    for (int64_t r = k; r < end; r += 8) {
      const int64_t n = end - r < 8 ? end - r : 8;
      const bool first = r == k;
      const bool last = r + 8 >= end;
      // the last pass reads the group's scales and biases: into L1 during
      // the pass before, or a line of codes ahead in a group of one pass
      GroupPrefetch prefetch = scale_prefetch(
          scales, biases, sg, bg, out, t0, group_size, idx, nact, end,
          static_cast<int64_t>(8 * sizeof(S)),
          (first && last) || (!last && r + 16 >= end), first);
      if (first && last) {
        prefetch.own_ahead = kLineWords;
      }
      pass_rows(wq, words_per_row, t0 / 8, idx, nact, r, n, rows, next);
      with_row_count(n, [&](auto rows_n) {
        constexpr int N = decltype(rows_n)::value;
        const auto pass = [&](auto kFirst, auto kLast) {
          group_pass_4bit<V, SDT, N, decltype(kFirst)::value, decltype(kLast)::value>(
              acc, yacc, rows, next, words, vals + r, sg, bg, xsum, prefetch);
        };
        if (first && last) {
          pass(std::true_type{}, std::true_type{});
        } else if (first) {
          pass(std::true_type{}, std::false_type{});
        } else if (last) {
          pass(std::false_type{}, std::true_type{});
        } else {
          pass(std::false_type{}, std::false_type{});
        }
      });
    }
    k = end;
  }
  natural_order<V>(yacc, w);
}

// yacc[j] (j < w, output t0 + j) = the input-sparse GEMV of the kept
// channels, for any bit width in plain loops: per group g,
// scale * (sum_i v_i code_i) + bias * (sum_i v_i).
template <int SDT, int BITS>
void qspvmm_tile_codes(
    const uint32_t* wq,
    int64_t out,
    int64_t group_size,
    const typename Elem<SDT>::S* scales,
    const typename Elem<SDT>::S* biases,
    const int32_t* CHESS_MLX_RESTRICT idx,
    const float* CHESS_MLX_RESTRICT vals,
    int64_t nact,
    int64_t t0,
    int64_t w,
    float* CHESS_MLX_RESTRICT yacc) {
  using SE = Elem<SDT>;
  using S = typename SE::S;
  constexpr int kPer = 32 / BITS;
  const int64_t words_per_row = out / kPer;
  const int64_t words = w / kPer;
  alignas(64) float acc[kColTile];
  // float16 scales and biases of a group, converted once for its outputs
  // (a bfloat16 one converts with a shift, in the loop below)
  constexpr int64_t kConverted = SDT == F16 ? kColTile : 1;
  alignas(64) float sconv[kConverted];
  alignas(64) float bconv[kConverted];
  for (int64_t j = 0; j < w; ++j) {
    yacc[j] = 0.0f;
  }
  int64_t k = 0;
  while (k < nact) {
    float xsum;
    const int64_t end = group_run_end(idx, vals, nact, k, group_size, xsum);
    for (int64_t j = 0; j < w; ++j) {
      acc[j] = 0.0f;
    }
    const int64_t g = idx[k] / group_size;
    const S* sg = scales + g * out + t0;
    const S* bg = biases + g * out + t0;
    const uint32_t* rows[8];
    const uint32_t* next[16];
    for (int64_t r = k; r < end; r += 8) {
      const int64_t n = end - r < 8 ? end - r : 8;
      const GroupPrefetch prefetch = scale_prefetch(
          scales, biases, sg, bg, out, t0, group_size, idx, nact, end,
          static_cast<int64_t>(kPer * sizeof(S)), r + 8 >= end, r == k);
      pass_rows(wq, words_per_row, t0 / kPer, idx, nact, r, n, rows, next);
      with_row_count(n, [&](auto rows_n) {
        constexpr int N = decltype(rows_n)::value;
        if constexpr (N == 8) {
          accumulate_codes8<BITS>(acc, rows, next, words, vals + r, prefetch);
        } else {
          accumulate_codes_n<BITS, N>(acc, rows, next, words, vals + r, prefetch);
        }
      });
    }
    if constexpr (SDT == F16) {
      to_f32<SDT>(sg, w, sconv);
      to_f32<SDT>(bg, w, bconv);
      for (int64_t j = 0; j < w; ++j) {
        yacc[j] += sconv[j] * acc[j] + bconv[j] * xsum;
      }
    } else {
      for (int64_t j = 0; j < w; ++j) {
        yacc[j] += SE::load(sg[j]) * acc[j] + SE::load(bg[j]) * xsum;
      }
    }
    k = end;
  }
}

// y[o] = sum over kept channels i of vals * (scale[g(i), o] * code[i, o] +
// bias[g(i), o]) for o in [o0, o1), a tile of outputs at a time. A group's
// scales and biases are read only if one of its channels is kept. Scales
// and biases are of SDT, y of DT; with kPartial y is float32 (a split-K
// share, summed later) whatever DT is.
template <int DT, int SDT, int BITS, bool kPartial>
void qspvmm_cols_bits(
    const uint32_t* wq,
    int64_t out,
    int64_t group_size,
    const void* scales_v,
    const void* biases_v,
    const int32_t* CHESS_MLX_RESTRICT idx,
    const float* CHESS_MLX_RESTRICT vals,
    int64_t nact,
    int64_t o0,
    int64_t o1,
    void* yv) {
  using S = typename Elem<SDT>::S;
  const S* scales = static_cast<const S*>(scales_v);
  const S* biases = static_cast<const S*>(biases_v);
  alignas(64) float yacc[kColTile];
  for (int64_t t0 = o0; t0 < o1; t0 += kColTile) {
    const int64_t w = (o1 - t0) < kColTile ? (o1 - t0) : kColTile;
    const bool vectors = with_lanes(even_odd_block(BITS, w), [&](auto lanes) {
      qspvmm_tile_4bit<decltype(lanes), SDT>(
          wq, out, group_size, scales, biases, idx, vals, nact, t0, w, yacc);
    });
    if (!vectors) {
      qspvmm_tile_codes<SDT, BITS>(
          wq, out, group_size, scales, biases, idx, vals, nact, t0, w, yacc);
    }
    if constexpr (kPartial) {
      std::memcpy(static_cast<float*>(yv) + t0, yacc, w * sizeof(float));
    } else {
      auto* y = static_cast<typename Elem<DT>::S*>(yv);
      for (int64_t j = 0; j < w; ++j) {
        y[t0 + j] = Elem<DT>::store(yacc[j]);
      }
    }
  }
}

template <int DT, int SDT, bool kPartial>
void qspvmm_cols(
    const uint32_t* wq,
    int64_t out,
    int bits,
    int64_t group_size,
    const void* scales,
    const void* biases,
    const int32_t* idx,
    const float* vals,
    int64_t nact,
    int64_t o0,
    int64_t o1,
    void* y) {
  if (bits == 4) {
    qspvmm_cols_bits<DT, SDT, 4, kPartial>(
        wq, out, group_size, scales, biases, idx, vals, nact, o0, o1, y);
  } else {
    qspvmm_cols_bits<DT, SDT, 8, kPartial>(
        wq, out, group_size, scales, biases, idx, vals, nact, o0, o1, y);
  }
}

// The eight codes that start at word `w` of a row, as floats: one word at
// 4 bits, two at 8 (whose codes are its bytes, in order). Codes convert as
// signed ints: x86 has no unsigned int-to-float vector conversion.
template <int BITS>
inline F8 codes_f8(const uint32_t* CHESS_MLX_RESTRICT w) {
  if constexpr (BITS == 4) {
    const U8 shift = {0, 4, 8, 12, 16, 20, 24, 28};
    const U8 codes = ((U8{} + w[0]) >> shift) & 15u;
    return __builtin_convertvector(reinterpret_cast<const I8&>(codes), F8);
  } else {
#if defined(__AVX2__)
    // g++ 12 assembles a byte vector's conversion lane by lane.
    const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w));
    return F8(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes)));
#else
    uint8_t bytes[8];
    std::memcpy(bytes, w, sizeof(bytes));
    F8 codes;
    for (int t = 0; t < 8; ++t) {
      codes[t] = static_cast<float>(bytes[t]);
    }
    return codes;
#endif
  }
}

// tot[r] = sum over groups g of scale[r][g] * (row r's 4-bit dot with
// group g of x), in vectors V: x in the order of qvmmsp_order_x (each
// V::kCodes inputs even ones first), as V::codes yields the codes. The
// sums stay in V's lanes until the end; the `next` rows are prefetched.
template <class V, int R>
inline void scaled_dots_4bit(
    const uint32_t* const* row,
    const uint32_t* const* next,
    const float* CHESS_MLX_RESTRICT xf,
    int64_t groups,
    int64_t group_size,
    const float* const* scale,
    F8* tot) {
  const int64_t group_words = group_size / 8;
  typename V::F sum[R];
  for (int r = 0; r < R; ++r) {
    sum[r] = V::zero();
  }
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t w0 = g * group_words;
    const float* xg = xf + g * group_size;
    typename V::F even[R], odd[R];
    for (int r = 0; r < R; ++r) {
      even[r] = V::zero();
      odd[r] = V::zero();
    }
    for (int64_t c = 0; c < group_size; c += V::kCodes) {
      const int64_t w = w0 + c / 8;
      if (w % kLineWords == 0) {
        // here, not in a loop or helper of its own: g++ 12 deleted a loop
        // of prefetches (no side effects), which made the GEMV 2x slower,
        // and deleted them again when this `if` was an inline helper
        prefetch_next_lines<R>(next, w);
      }
      const typename V::F xe = V::load(xg + c);
      const typename V::F xo = V::load(xg + c + V::kCodes / 2);
      for (int r = 0; r < R; ++r) {
        typename V::F ce, co;
        V::codes(row[r] + w, ce, co);
        even[r] = V::fmadd(xe, ce, even[r]);
        odd[r] = V::fmadd(xo, co, odd[r]);
      }
    }
    for (int r = 0; r < R; ++r) {
      sum[r] = V::fmadd(V::set1(scale[r][g]), V::add(even[r], odd[r]), sum[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    tot[r] = V::to_f8(sum[r]);
  }
}

// Puts xf (in floats) in the order qvmmsp_rows reads it, in place: each
// block of even_odd_block(bits, group_size) inputs even ones first, or as
// it is. Groups keep their members, so group sums of xf are the same
// either way.
inline void qvmmsp_order_x(int bits, int64_t group_size, float* xf, int64_t in) {
  const int n = even_odd_block(bits, group_size);
  for (int64_t b = 0; n > 0 && b < in; b += n) {
    float block[32];
    for (int t = 0; t < n / 2; ++t) {
      block[t] = xf[b + 2 * t];
      block[n / 2 + t] = xf[b + 2 * t + 1];
    }
    std::memcpy(xf + b, block, n * sizeof(float));
  }
}

// y[idx[k]] = gates[k] * sum_g (scale[o, g] * dot_g + bias[o, g] * xgsum[g])
// for the kept rows k in [k0, k1) of the stock layout, four rows at a time
// sharing every load of xf (a short last pass repeats its last row).
// Scales and biases are of SDT, y of DT.
template <int DT, int SDT, int BITS>
void qvmmsp_rows_bits(
    const uint32_t* wq,
    int64_t in,
    int64_t group_size,
    const void* scales_v,
    const void* biases_v,
    const float* CHESS_MLX_RESTRICT xf,
    const float* CHESS_MLX_RESTRICT xgsum,
    const int32_t* CHESS_MLX_RESTRICT idx,
    const float* CHESS_MLX_RESTRICT gates,
    int64_t k0,
    int64_t k1,
    void* yv) {
  using E = Elem<DT>;
  using SE = Elem<SDT>;
  using S = typename SE::S;
  constexpr int kRows = 4;
  constexpr int kPer = 32 / BITS;
  constexpr int kWordsPerVec = 8 / kPer;
  const S* scales = static_cast<const S*>(scales_v);
  const S* biases = static_cast<const S*>(biases_v);
  auto* y = static_cast<typename E::S*>(yv);
  const int64_t groups = in / group_size;
  const int64_t row_words = in / kPer;
  const int even_odd = even_odd_block(BITS, group_size); // as qvmmsp_order_x
  // Scales and biases of a pass's rows as float32, converted a row at a
  // time (vector loops; per group, a scale is then one broadcast load and
  // the bias terms one dot product with xgsum per row).
  std::vector<float> converted(2 * kRows * groups);
  for (int64_t k = k0; k < k1; k += kRows) {
    int64_t o[kRows];
    const uint32_t* row[kRows];
    const float* sconv[kRows];
    for (int r = 0; r < kRows; ++r) {
      o[r] = idx[k + r < k1 ? k + r : k1 - 1];
      row[r] = wq + o[r] * row_words;
      float* sf = converted.data() + 2 * r * groups;
      to_f32<SDT>(scales + o[r] * groups, groups, sf);
      to_f32<SDT>(biases + o[r] * groups, groups, sf + groups);
      sconv[r] = sf;
    }
    // Quantized rows are short (1 KiB for 2048 4-bit inputs), too short for
    // the hardware prefetcher to find each scattered kept row in time, and
    // so are their scale and bias rows (another array). The next pass's
    // rows are fetched into L1 a line at a time as this pass goes, the one
    // after into L2.
    const uint32_t* next[2 * kRows];
    for (int r = 0; r < 2 * kRows; ++r) {
      const int64_t n = k + kRows + r;
      next[r] = wq + idx[n < k1 ? n : k1 - 1] * row_words;
      if (r < kRows && n < k1) {
        prefetch_bytes(scales + idx[n] * groups, groups * sizeof(S));
        prefetch_bytes(biases + idx[n] * groups, groups * sizeof(S));
      }
    }
    F8 tot[kRows] = {};
    const bool in_lanes = with_lanes(even_odd, [&](auto lanes) {
      scaled_dots_4bit<decltype(lanes), kRows>(row, next, xf, groups, group_size, sconv, tot);
    });
    for (int64_t g = 0; !in_lanes && g < groups; ++g) {
      const float* xg = xf + g * group_size;
      const int64_t w0 = g * group_size / kPer;
      F8 dot[kRows] = {};
      for (int64_t c = 0; c < group_size; c += 8) {
        const F8 xv = load_f8(xg + c);
        const int64_t w = w0 + c / 8 * kWordsPerVec;
        if (w % kLineWords == 0) {
          prefetch_next_lines<kRows>(next, w);  // as in scaled_dots_4bit
        }
        for (int r = 0; r < kRows; ++r) {
          dot[r] += xv * codes_f8<BITS>(row[r] + w);
        }
      }
      for (int r = 0; r < kRows; ++r) {
        tot[r] += sconv[r][g] * dot[r];
      }
    }
    for (int r = 0; r < kRows && k + r < k1; ++r) {
      const float bias = dot_lanes(sconv[r] + groups, xgsum, groups);
      y[o[r]] = E::store(gates[k + r] * (sum_f8(tot[r]) + bias));
    }
  }
}

template <int DT, int SDT>
void qvmmsp_rows(
    const uint32_t* wq,
    int64_t in,
    int bits,
    int64_t group_size,
    const void* scales,
    const void* biases,
    const float* xf,
    const float* xgsum,
    const int32_t* idx,
    const float* gates,
    int64_t k0,
    int64_t k1,
    void* y) {
  if (bits == 4) {
    qvmmsp_rows_bits<DT, SDT, 4>(
        wq, in, group_size, scales, biases, xf, xgsum, idx, gates, k0, k1, y);
  } else {
    qvmmsp_rows_bits<DT, SDT, 8>(
        wq, in, group_size, scales, biases, xf, xgsum, idx, gates, k0, k1, y);
  }
}

} // namespace
} // namespace CHESS_MLX_KERNEL_NS

const Table& CHESS_MLX_KERNEL_TABLE() {
  namespace K = CHESS_MLX_KERNEL_NS;
  static const Table table = {
      CHESS_MLX_KERNEL_ISA,
      {&K::collect_in<F32>, &K::collect_in<F16>, &K::collect_in<BF16>},
      {&K::spvmm_cols<F32>, &K::spvmm_cols<F16>, &K::spvmm_cols<BF16>},
      {&K::spvmm_partial<F32>,
       &K::spvmm_partial<F16>,
       &K::spvmm_partial<BF16>},
      {&K::reduce_store<F32>, &K::reduce_store<F16>, &K::reduce_store<BF16>},
      {&K::collect_out<F32>, &K::collect_out<F16>, &K::collect_out<BF16>},
      {&K::to_f32<F32>, &K::to_f32<F16>, &K::to_f32<BF16>},
      {&K::vmmsp_rows<F32>, &K::vmmsp_rows<F16>, &K::vmmsp_rows<BF16>},
      // [y dtype][scales dtype]: half scales with float32 activations, as
      // a half-precision checkpoint run in float32 on the CPU has them.
      {{&K::qspvmm_cols<F32, F32, false>,
        &K::qspvmm_cols<F32, F16, false>,
        &K::qspvmm_cols<F32, BF16, false>},
       {nullptr, &K::qspvmm_cols<F16, F16, false>, nullptr},
       {nullptr, nullptr, &K::qspvmm_cols<BF16, BF16, false>}},
      {&K::qspvmm_cols<F32, F32, true>,
       &K::qspvmm_cols<F32, F16, true>,
       &K::qspvmm_cols<F32, BF16, true>},
      {{&K::qvmmsp_rows<F32, F32>,
        &K::qvmmsp_rows<F32, F16>,
        &K::qvmmsp_rows<F32, BF16>},
       {nullptr, &K::qvmmsp_rows<F16, F16>, nullptr},
       {nullptr, nullptr, &K::qvmmsp_rows<BF16, BF16>}},
      &K::qvmmsp_order_x,
  };
  return table;
}

} // namespace chess_mlx::kernels

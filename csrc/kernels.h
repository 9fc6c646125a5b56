// ISA-neutral interface of the sparse GEMV compute kernels.
//
// The kernels themselves live in kernels_impl.h and are compiled once per
// instruction set (kernels_generic.cpp with the compiler's baseline flags,
// kernels_avx2.cpp with -mavx2 -mfma -mf16c on x86-64). best() picks the
// fastest table the running CPU supports. These files include no MLX
// headers, so they stay independent of MLX's ABI and compile fast.
#pragma once

#include <cstdint>

namespace chess_mlx::kernels {

// Element type of x / weights / gate / output.
enum DType : int { F32 = 0, F16 = 1, BF16 = 2, NUM_DTYPES = 3 };

// Threshold: t[i * thr_stride]; thr_stride is 0 (scalar) or 1 (vector).
// Kept: |v| >= t (compared in float32). NaN values are dropped.

// sparse_in_gemv, step 1: collect active input channels of x (length n):
// idx[k] = i, vals[k] = float(x[i]). Returns the number of active channels.
using CollectInFn = int64_t (*)(
    const void* x, int64_t n, const float* thr, int64_t thr_stride,
    int32_t* idx, float* vals);

// sparse_in_gemv, step 2, for output columns [o0, o1):
// y[o] = sum_k vals[k] * wt[idx[k] * out + o], wt is [in, out] row-major.
// Only the nact listed rows of wt are read.
using SpvmmColsFn = void (*)(
    const void* wt, int64_t out, const int32_t* idx, const float* vals,
    int64_t nact, int64_t o0, int64_t o1, void* y);

// sparse_in_gemv, step 2 split over kept rows instead (split-K): for listed
// rows k in [k0, k1) and columns [o0, o1):
// acc[o - o0] = sum_k vals[k] * wt[idx[k] * out + o]   (acc overwritten).
using SpvmmPartialFn = void (*)(
    const void* wt, int64_t out, const int32_t* idx, const float* vals,
    int64_t k0, int64_t k1, int64_t o0, int64_t o1, float* acc);

// Split-K epilogue: y[o] = sum_p parts[p * stride + o], o in [o0, o1).
using ReduceStoreFn = void (*)(
    const float* parts, int nparts, int64_t stride, int64_t o0, int64_t o1,
    void* y);

// sparse_out_gate_gemv, step 1: collect kept outputs of gate (length n):
// idx[k] = o, gates[k] = float(gate[o]); y[o] = 0 for the dropped ones.
using CollectOutFn = int64_t (*)(
    const void* gate, int64_t n, const float* thr, int64_t thr_stride,
    int32_t* idx, float* gates, void* y);

// Convert n elements to float32.
using ToF32Fn = void (*)(const void* x, int64_t n, float* out);

// sparse_out_gate_gemv, step 2, for listed rows k in [k0, k1):
// y[idx[k]] = gates[k] * dot(w[idx[k], :], xf), w is [out, in] row-major.
using VmmspRowsFn = void (*)(
    const void* w, int64_t in, const float* xf, const int32_t* idx,
    const float* gates, int64_t k0, int64_t k1, void* y);

// Affine-quantized weights (bits 4 or 8): uint32 words of 32/bits codes,
// w = scale * code + bias, one scale/bias per group_size inputs.
// qspvmm: codes input-major, wq[i, o / per] holds channel i's codes for
// outputs o (per = 32/bits per word); scales/biases [in / group_size, out].
// o0 and o1 are multiples of per.
using QSpvmmColsFn = void (*)(
    const uint32_t* wq, int64_t out, int bits, int64_t group_size,
    const void* scales, const void* biases, const int32_t* idx,
    const float* vals, int64_t nact, int64_t o0, int64_t o1, void* y);

// qvmmsp: stock layout, wq[o, i / per], scales/biases [out, in / group_size];
// xgsum[g] is the sum of xf over group g.
using QVmmspRowsFn = void (*)(
    const uint32_t* wq, int64_t in, int bits, int64_t group_size,
    const void* scales, const void* biases, const float* xf,
    const float* xgsum, const int32_t* idx, const float* gates, int64_t k0,
    int64_t k1, void* y);

// qvmmsp, before qvmmsp_rows: puts xf in the order this table's
// qvmmsp_rows reads (in place, once per call; group sums unchanged).
using QVmmspOrderXFn = void (*)(int bits, int64_t group_size, float* xf, int64_t in);

struct Table {
  const char* isa;
  CollectInFn collect_in[NUM_DTYPES];
  SpvmmColsFn spvmm_cols[NUM_DTYPES];
  SpvmmPartialFn spvmm_partial[NUM_DTYPES];
  ReduceStoreFn reduce_store[NUM_DTYPES];
  CollectOutFn collect_out[NUM_DTYPES];
  ToF32Fn to_f32[NUM_DTYPES];
  VmmspRowsFn vmmsp_rows[NUM_DTYPES];
  // Quantized GEMVs by [y dtype][scales and biases dtype]; scales are
  // either of y's dtype or, with float32 y, half (nullptr elsewhere).
  QSpvmmColsFn qspvmm_cols[NUM_DTYPES][NUM_DTYPES];
  // qspvmm_cols into float32 y (a split-K share), by scales dtype.
  QSpvmmColsFn qspvmm_partial[NUM_DTYPES];
  QVmmspRowsFn qvmmsp_rows[NUM_DTYPES][NUM_DTYPES];
  QVmmspOrderXFn qvmmsp_order_x;
};

const Table& table_generic();
#if defined(CHESS_MLX_HAVE_AVX2_TU)
const Table& table_avx2();
const Table& table_avx512();
#endif

// Best table for the running CPU (env CHESS_MLX_ISA=generic or avx2 caps
// the choice at that copy).
const Table& best();

} // namespace chess_mlx::kernels

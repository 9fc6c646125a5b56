// MLX ops + primitives for the CHESS sparse GEMVs (see sparse_gemv.h).
//
// Graph construction validates shapes/dtypes; eval_cpu allocates the output
// and dispatches one task on the primitive's CPU stream. That task
// 1. compacts the kept channels (indices + float32 values) serially, then
// 2. splits the remaining work over the persistent thread pool:
//    - sparse_in_gemv and sparse_in_qgemv: contiguous, 16-aligned tiles of
//      output columns when each thread gets >= kMinColsPerTask columns
//      (every thread reads its column slice of each kept row of wt);
//      otherwise split-K: shares of the kept rows into float32 partial
//      sums, reduced at the end (run_input_sparse);
//    - sparse_out_gate_gemv and sparse_out_gate_qgemv: equal shares of the
//      kept output rows.
//    Small GEMVs (< kMinParallelBytes of weights to read) run inline.
// Only the split (and so the float32 summation order) depends on the thread
// count; results are otherwise deterministic.
// Inputs that are not row-contiguous are copied (strided gather) inside the
// task, so any view is accepted; pass contiguous weights for speed.
#include "sparse_gemv.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <sstream>
#include <stdexcept>
#include <vector>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"

#include "kernels.h"
#include "op_utils.h"
#include "thread_pool.h"

namespace chess_mlx {

namespace {

namespace K = kernels;
using namespace op_utils;

// Below this many weight bytes to read, a GEMV runs on one thread: waking
// the pool would cost more than it saves.
constexpr int64_t kMinParallelBytes = 64 * 1024;
// Column tiles handed to threads are multiples of this many elements (the
// AVX-512 4-bit path reads blocks of 32 outputs).
constexpr int64_t kColAlign = 32;
// sparse_in_gemv splits by output columns only when every thread then gets
// at least this many: shorter row segments stream poorly from DRAM, and
// splitting over kept rows (split-K, float32 partials + a final reduction)
// is faster (e.g. 8192x2048 on two threads).
constexpr int64_t kMinColsPerTask = 2048;
// Pool tasks per thread for row splits (tasks are claimed dynamically, see
// thread_pool.h, so a few per thread balance uneven progress).
constexpr int kTasksPerThread = 2;

K::DType kernel_dtype(mx::Dtype d) {
  if (d == mx::float32) {
    return K::F32;
  }
  if (d == mx::float16) {
    return K::F16;
  }
  if (d == mx::bfloat16) {
    return K::BF16;
  }
  throw std::invalid_argument("unsupported dtype");
}

mx::array threshold_arg(
    const char* op,
    const mx::array& thr,
    int64_t n,
    const char* what,
    mx::Stream st) {
  const int64_t sz = static_cast<int64_t>(thr.size());
  if (sz != 1 && sz != n) {
    std::ostringstream os;
    os << "threshold must have 1 or " << n << " (" << what
       << ") elements, got shape " << shape_str(thr);
    fail(op, os.str());
  }
  if (!mx::issubdtype(thr.dtype(), mx::floating) &&
      !mx::issubdtype(thr.dtype(), mx::integer)) {
    fail(op, "threshold must be a real number array");
  }
  return thr.dtype() == mx::float32 ? thr : mx::astype(thr, mx::float32, st);
}

// Per-stream-thread scratch, reused across calls.
struct Scratch {
  std::vector<int32_t> idx;
  std::vector<float> vals;
  std::vector<float> xf;
  std::vector<float> parts;
  std::vector<float> xgsum;
};

Scratch& scratch() {
  static thread_local Scratch s;
  return s;
}

// Threads worth using for a GEMV reading work_bytes of weights (1: run
// inline on the stream thread).
int threads_for(int64_t work_bytes) {
  if (work_bytes < kMinParallelBytes) {
    return 1;
  }
  return pool::num_threads();
}

struct SpvmmJob {
  K::SpvmmColsFn cols;
  K::SpvmmPartialFn partial;
  const void* wt;
  int64_t out;
  const int32_t* idx;
  const float* vals;
  int64_t nact;
  int64_t chunk; // columns per task (column split)
  float* parts; // [ntasks, out] partial sums (split-K)
  void* y;
};

void spvmm_cols_task(void* ctx, int t, int) {
  auto* j = static_cast<SpvmmJob*>(ctx);
  const int64_t o0 = t * j->chunk;
  const int64_t o1 = std::min(j->out, o0 + j->chunk);
  if (o0 < o1) {
    j->cols(j->wt, j->out, j->idx, j->vals, j->nact, o0, o1, j->y);
  }
}

void spvmm_rows_task(void* ctx, int t, int ntasks) {
  auto* j = static_cast<SpvmmJob*>(ctx);
  const int64_t k0 = j->nact * t / ntasks;
  const int64_t k1 = j->nact * (t + 1) / ntasks;
  j->partial(
      j->wt, j->out, j->idx, j->vals, k0, k1, 0, j->out, j->parts + t * j->out);
}

struct VmmspJob {
  K::VmmspRowsFn fn;
  const void* w;
  int64_t in;
  const float* xf;
  const int32_t* idx;
  const float* gates;
  int64_t nact;
  void* y;
};

void vmmsp_task(void* ctx, int t, int ntasks) {
  auto* j = static_cast<VmmspJob*>(ctx);
  const int64_t k0 = j->nact * t / ntasks;
  const int64_t k1 = j->nact * (t + 1) / ntasks;
  if (k0 < k1) {
    j->fn(j->w, j->in, j->xf, j->idx, j->gates, k0, k1, j->y);
  }
}

struct QSpvmmJob {
  K::QSpvmmColsFn fn;
  K::QSpvmmColsFn partial;
  const uint32_t* wq;
  int64_t out;
  int bits;
  int64_t group_size;
  const void* scales;
  const void* biases;
  const int32_t* idx;
  const float* vals;
  int64_t nact;
  int64_t chunk;
  void* y;
  float* parts;
};

void qspvmm_task(void* ctx, int t, int) {
  auto* j = static_cast<QSpvmmJob*>(ctx);
  const int64_t o0 = t * j->chunk;
  const int64_t o1 = std::min(j->out, o0 + j->chunk);
  if (o0 < o1) {
    j->fn(
        j->wq, j->out, j->bits, j->group_size, j->scales, j->biases, j->idx,
        j->vals, j->nact, o0, o1, j->y);
  }
}

// Split-K: a share of the kept rows over every output, into float32 parts.
void qspvmm_rows_task(void* ctx, int t, int ntasks) {
  auto* j = static_cast<QSpvmmJob*>(ctx);
  const int64_t k0 = j->nact * t / ntasks;
  const int64_t k1 = j->nact * (t + 1) / ntasks;
  j->partial(
      j->wq, j->out, j->bits, j->group_size, j->scales, j->biases,
      j->idx + k0, j->vals + k0, k1 - k0, 0, j->out,
      j->parts + t * j->out);
}

struct QVmmspJob {
  K::QVmmspRowsFn fn;
  const uint32_t* wq;
  int64_t in;
  int bits;
  int64_t group_size;
  const void* scales;
  const void* biases;
  const float* xf;
  const float* xgsum;
  const int32_t* idx;
  const float* gates;
  int64_t nact;
  void* y;
};

void qvmmsp_task(void* ctx, int t, int ntasks) {
  auto* j = static_cast<QVmmspJob*>(ctx);
  const int64_t k0 = j->nact * t / ntasks;
  const int64_t k1 = j->nact * (t + 1) / ntasks;
  if (k0 < k1) {
    j->fn(
        j->wq, j->in, j->bits, j->group_size, j->scales, j->biases, j->xf,
        j->xgsum, j->idx, j->gates, k0, k1, j->y);
  }
}

void check_quantization(const char* op, int group_size, int bits) {
  if (bits != 4 && bits != 8) {
    fail(op, "bits must be 4 or 8, got " + std::to_string(bits));
  }
  if (group_size <= 0 || group_size % (32 / bits) != 0) {
    fail(
        op,
        "group_size must be a positive multiple of " +
            std::to_string(32 / bits) + ", got " + std::to_string(group_size));
  }
}

void check_float_operand(
    const char* op,
    const char* name,
    const mx::array& a,
    const mx::array& x) {
  if (a.dtype() != x.dtype()) {
    fail(op, std::string(name) + " must have the same dtype as x");
  }
}

// Scales and biases share one dtype: x's, or half (float16/bfloat16) with
// float32 x, as a half-precision checkpoint run in float32 keeps them.
void check_scales(
    const char* op,
    const mx::array& scales,
    const mx::array& biases,
    const mx::array& x) {
  if (biases.dtype() != scales.dtype()) {
    fail(op, "scales and biases must have the same dtype");
  }
  const bool half =
      scales.dtype() == mx::float16 || scales.dtype() == mx::bfloat16;
  if (scales.dtype() != x.dtype() && !(x.dtype() == mx::float32 && half)) {
    fail(
        op,
        "scales must have the dtype of x, or float16/bfloat16 with float32 x");
  }
}

// Runs an input-sparse GEMV job on nth threads: one tile of output columns
// per thread (no reduction) when each gets kMinColsPerTask of them, else
// split-K, at most max_tasks shares of the kept rows into float32 parts
// that `reduce` sums into y. Job has `chunk` and `parts`.
template <typename Job>
void run_input_sparse(
    Job& job,
    int nth,
    int64_t out,
    int64_t max_tasks,
    pool::TaskFn cols_task,
    pool::TaskFn rows_task,
    Scratch& sc,
    K::ReduceStoreFn reduce,
    void* y) {
  if (out >= kMinColsPerTask * nth) {
    const int64_t per = (out + nth - 1) / nth;
    job.chunk = (per + kColAlign - 1) / kColAlign * kColAlign;
    pool::run(nth, cols_task, &job);
    return;
  }
  const int ntasks = static_cast<int>(std::min<int64_t>(
      static_cast<int64_t>(nth) * kTasksPerThread, max_tasks));
  sc.parts.resize(static_cast<size_t>(ntasks) * out);
  job.parts = sc.parts.data();
  pool::run(ntasks, rows_task, &job);
  reduce(sc.parts.data(), ntasks, out, 0, out, y);
}

} // namespace

std::string kernel_isa() {
  return K::best().isa;
}

///////////////////////////////////////////////////////////////////////////////
// Ops
///////////////////////////////////////////////////////////////////////////////

mx::array sparse_in_gemv(
    const mx::array& x,
    const mx::array& wt,
    const mx::array& threshold,
    mx::StreamOrDevice s) {
  constexpr const char* op = "sparse_in_gemv";
  mx::Stream st = cpu_stream(op, s);
  check_float_dtype(op, "x", x);
  if (wt.dtype() != x.dtype()) {
    fail(op, "wt must have the same dtype as x");
  }
  const int64_t in = single_row_len(op, "x", x);
  if (wt.ndim() != 2 || wt.shape(0) != in) {
    fail(
        op,
        "wt must have shape (in, out) = (" + std::to_string(in) +
            ", out), got " + shape_str(wt));
  }
  mx::array thr = threshold_arg(op, threshold, in, "in", st);
  mx::Shape out_shape = x.shape();
  out_shape.back() = wt.shape(1);
  return mx::array(
      std::move(out_shape),
      x.dtype(),
      std::make_shared<SparseInGemv>(st),
      {x, wt, thr});
}

mx::array sparse_out_gate_gemv(
    const mx::array& x,
    const mx::array& w,
    const mx::array& gate,
    const mx::array& threshold,
    mx::StreamOrDevice s) {
  constexpr const char* op = "sparse_out_gate_gemv";
  mx::Stream st = cpu_stream(op, s);
  check_float_dtype(op, "x", x);
  if (w.dtype() != x.dtype() || gate.dtype() != x.dtype()) {
    fail(op, "w and gate must have the same dtype as x");
  }
  const int64_t in = single_row_len(op, "x", x);
  if (w.ndim() != 2 || w.shape(1) != in) {
    fail(
        op,
        "w must have shape (out, in) = (out, " + std::to_string(in) +
            "), got " + shape_str(w));
  }
  const int64_t out = w.shape(0);
  if (gate.ndim() < 1 || static_cast<int64_t>(gate.size()) != out ||
      gate.shape(-1) != out) {
    fail(
        op,
        "gate must have " + std::to_string(out) +
            " elements in its last axis, got shape " + shape_str(gate));
  }
  mx::array thr = threshold_arg(op, threshold, out, "out", st);
  mx::Shape out_shape = x.shape();
  out_shape.back() = static_cast<int>(out);
  return mx::array(
      std::move(out_shape),
      x.dtype(),
      std::make_shared<SparseOutGateGemv>(st),
      {x, w, gate, thr});
}

mx::array sparse_in_qgemv(
    const mx::array& x,
    const mx::array& wq,
    const mx::array& scales,
    const mx::array& biases,
    const mx::array& threshold,
    int group_size,
    int bits,
    mx::StreamOrDevice s) {
  constexpr const char* op = "sparse_in_qgemv";
  mx::Stream st = cpu_stream(op, s);
  check_quantization(op, group_size, bits);
  check_float_dtype(op, "x", x);
  check_scales(op, scales, biases, x);
  const int64_t in = single_row_len(op, "x", x);
  const int per = 32 / bits;
  if (scales.ndim() != 2 || in % group_size != 0 ||
      scales.shape(0) != in / group_size || biases.shape() != scales.shape()) {
    fail(
        op,
        "scales and biases must have shape (in / group_size, out), got " +
            shape_str(scales) + " and " + shape_str(biases) + " for in = " +
            std::to_string(in));
  }
  const int64_t out = scales.shape(1);
  if (wq.dtype() != mx::uint32 || wq.ndim() != 2 || wq.shape(0) != in ||
      wq.shape(1) * per != out) {
    fail(
        op,
        "wq must be uint32 of shape (in, out / " + std::to_string(per) +
            ") = (" + std::to_string(in) + ", " + std::to_string(out / per) +
            "), got " + shape_str(wq));
  }
  mx::array thr = threshold_arg(op, threshold, in, "in", st);
  mx::Shape out_shape = x.shape();
  out_shape.back() = static_cast<int>(out);
  return mx::array(
      std::move(out_shape),
      x.dtype(),
      std::make_shared<SparseInQGemv>(st, group_size, bits),
      {x, wq, scales, biases, thr});
}

mx::array sparse_out_gate_qgemv(
    const mx::array& x,
    const mx::array& wq,
    const mx::array& scales,
    const mx::array& biases,
    const mx::array& gate,
    const mx::array& threshold,
    int group_size,
    int bits,
    mx::StreamOrDevice s) {
  constexpr const char* op = "sparse_out_gate_qgemv";
  mx::Stream st = cpu_stream(op, s);
  check_quantization(op, group_size, bits);
  check_float_dtype(op, "x", x);
  check_scales(op, scales, biases, x);
  check_float_operand(op, "gate", gate, x);
  const int64_t in = single_row_len(op, "x", x);
  const int per = 32 / bits;
  if (wq.dtype() != mx::uint32 || wq.ndim() != 2 || in % group_size != 0 ||
      wq.shape(1) * per != in) {
    fail(
        op,
        "wq must be uint32 of shape (out, in / " + std::to_string(per) +
            ") with in a multiple of group_size, got " + shape_str(wq) +
            " for in = " + std::to_string(in));
  }
  const int64_t out = wq.shape(0);
  if (scales.ndim() != 2 || scales.shape(0) != out ||
      scales.shape(1) != in / group_size || biases.shape() != scales.shape()) {
    fail(
        op,
        "scales and biases must have shape (out, in / group_size), got " +
            shape_str(scales) + " and " + shape_str(biases));
  }
  if (gate.ndim() < 1 || static_cast<int64_t>(gate.size()) != out ||
      gate.shape(-1) != out) {
    fail(
        op,
        "gate must have " + std::to_string(out) +
            " elements in its last axis, got shape " + shape_str(gate));
  }
  mx::array thr = threshold_arg(op, threshold, out, "out", st);
  mx::Shape out_shape = x.shape();
  out_shape.back() = static_cast<int>(out);
  return mx::array(
      std::move(out_shape),
      x.dtype(),
      std::make_shared<SparseOutGateQGemv>(st, group_size, bits),
      {x, wq, scales, biases, gate, thr});
}

///////////////////////////////////////////////////////////////////////////////
// CPU evaluation
///////////////////////////////////////////////////////////////////////////////

void SparseInGemv::eval_cpu(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  const auto& x = inputs[0];
  const auto& wt = inputs[1];
  const auto& thr = inputs[2];
  auto& y = outputs[0];
  auto& encoder = prepare(stream(), inputs, y);

  encoder.dispatch([xo = operand(x),
                    wo = operand(wt),
                    to = operand(thr),
                    y_ptr = y.data<void>(),
                    in = static_cast<int64_t>(wt.shape(0)),
                    out = static_cast<int64_t>(wt.shape(1)),
                    dt = kernel_dtype(y.dtype()),
                    itemsize = static_cast<int64_t>(y.itemsize())]() {
    if (out == 0) {
      return;
    }
    const K::Table& kt = K::best();
    std::vector<char> xbuf, wbuf, tbuf; // only used for strided inputs
    const void* xp = materialize(xo, xbuf);
    const void* wp = materialize(wo, wbuf);
    const auto* tp = static_cast<const float*>(materialize(to, tbuf));
    const int64_t tstride = to.size == 1 ? 0 : 1;

    Scratch& sc = scratch();
    sc.idx.resize(std::max<int64_t>(in, 1));
    sc.vals.resize(std::max<int64_t>(in, 1));
    const int64_t nact = kt.collect_in[dt](
        xp, in, tp, tstride, sc.idx.data(), sc.vals.data());

    SpvmmJob job{
        kt.spvmm_cols[dt],
        kt.spvmm_partial[dt],
        wp,
        out,
        sc.idx.data(),
        sc.vals.data(),
        nact,
        out,
        nullptr,
        y_ptr};
    const int nth = threads_for(nact * out * itemsize);
    if (nth <= 1 || nact < 8) {
      spvmm_cols_task(&job, 0, 1);
      return;
    }
    run_input_sparse(
        job, nth, out, nact / 4, &spvmm_cols_task, &spvmm_rows_task, sc,
        kt.reduce_store[dt], y_ptr);
  });
}

void SparseOutGateGemv::eval_cpu(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  const auto& x = inputs[0];
  const auto& w = inputs[1];
  const auto& gate = inputs[2];
  const auto& thr = inputs[3];
  auto& y = outputs[0];
  auto& encoder = prepare(stream(), inputs, y);

  encoder.dispatch([xo = operand(x),
                    wo = operand(w),
                    go = operand(gate),
                    to = operand(thr),
                    y_ptr = y.data<void>(),
                    in = static_cast<int64_t>(w.shape(1)),
                    out = static_cast<int64_t>(w.shape(0)),
                    dt = kernel_dtype(y.dtype()),
                    itemsize = static_cast<int64_t>(y.itemsize())]() {
    if (out == 0) {
      return;
    }
    const K::Table& kt = K::best();
    std::vector<char> xbuf, wbuf, gbuf, tbuf; // only used for strided inputs
    const void* xp = materialize(xo, xbuf);
    const void* wp = materialize(wo, wbuf);
    const void* gp = materialize(go, gbuf);
    const auto* tp = static_cast<const float*>(materialize(to, tbuf));
    const int64_t tstride = to.size == 1 ? 0 : 1;

    Scratch& sc = scratch();
    sc.idx.resize(out);
    sc.vals.resize(out);
    sc.xf.resize(std::max<int64_t>(in, 1));
    const int64_t nact = kt.collect_out[dt](
        gp, out, tp, tstride, sc.idx.data(), sc.vals.data(), y_ptr);
    if (nact == 0) {
      return;
    }
    kt.to_f32[dt](xp, in, sc.xf.data());

    VmmspJob job{
        kt.vmmsp_rows[dt],
        wp,
        in,
        sc.xf.data(),
        sc.idx.data(),
        sc.vals.data(),
        nact,
        y_ptr};
    const int nth = threads_for(nact * in * itemsize);
    if (nth <= 1 || nact < 8) {
      vmmsp_task(&job, 0, 1);
      return;
    }
    const int ntasks = static_cast<int>(std::min<int64_t>(
        static_cast<int64_t>(nth) * kTasksPerThread, nact / 4));
    pool::run(ntasks, &vmmsp_task, &job);
  });
}

void SparseInQGemv::eval_cpu(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  auto& y = outputs[0];
  auto& encoder = prepare(stream(), inputs, y);
  const auto& wq = inputs[1];
  encoder.dispatch([xo = operand(inputs[0]),
                    wo = operand(wq),
                    so = operand(inputs[2]),
                    bo = operand(inputs[3]),
                    to = operand(inputs[4]),
                    y_ptr = y.data<void>(),
                    in = static_cast<int64_t>(wq.shape(0)),
                    out = static_cast<int64_t>(inputs[2].shape(1)),
                    group_size = static_cast<int64_t>(group_size_),
                    bits = bits_,
                    dt = kernel_dtype(y.dtype()),
                    sdt = kernel_dtype(inputs[2].dtype())]() {
    if (out == 0) {
      return;
    }
    const K::Table& kt = K::best();
    std::vector<char> xbuf, wbuf, sbuf, bbuf, tbuf;
    const void* xp = materialize(xo, xbuf);
    const auto* wp = static_cast<const uint32_t*>(materialize(wo, wbuf));
    const void* sp = materialize(so, sbuf);
    const void* bp = materialize(bo, bbuf);
    const auto* tp = static_cast<const float*>(materialize(to, tbuf));
    const int64_t tstride = to.size == 1 ? 0 : 1;

    Scratch& sc = scratch();
    sc.idx.resize(std::max<int64_t>(in, 1));
    sc.vals.resize(std::max<int64_t>(in, 1));
    const int64_t nact = kt.collect_in[dt](
        xp, in, tp, tstride, sc.idx.data(), sc.vals.data());
    QSpvmmJob job{
        kt.qspvmm_cols[dt][sdt], kt.qspvmm_partial[sdt], wp, out, bits,
        group_size, sp, bp, sc.idx.data(), sc.vals.data(), nact, out, y_ptr,
        nullptr};
    const int nth = threads_for(nact * out * bits / 8);
    if (nth <= 1 || out < kColAlign * nth || nact < 16) {
      qspvmm_task(&job, 0, 1);
      return;
    }
    // Split-K lets each task read whole kept rows (and a group's scales and
    // biases for every output), not a slice of each.
    run_input_sparse(
        job, nth, out, nact / 8, &qspvmm_task, &qspvmm_rows_task, sc,
        kt.reduce_store[dt], y_ptr);
  });
}

void SparseOutGateQGemv::eval_cpu(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  auto& y = outputs[0];
  auto& encoder = prepare(stream(), inputs, y);
  const auto& wq = inputs[1];
  encoder.dispatch([xo = operand(inputs[0]),
                    wo = operand(wq),
                    so = operand(inputs[2]),
                    bo = operand(inputs[3]),
                    go = operand(inputs[4]),
                    to = operand(inputs[5]),
                    y_ptr = y.data<void>(),
                    in = static_cast<int64_t>(inputs[0].shape(-1)),
                    out = static_cast<int64_t>(wq.shape(0)),
                    group_size = static_cast<int64_t>(group_size_),
                    bits = bits_,
                    dt = kernel_dtype(y.dtype()),
                    sdt = kernel_dtype(inputs[2].dtype())]() {
    if (out == 0) {
      return;
    }
    const K::Table& kt = K::best();
    std::vector<char> xbuf, wbuf, sbuf, bbuf, gbuf, tbuf;
    const void* xp = materialize(xo, xbuf);
    const auto* wp = static_cast<const uint32_t*>(materialize(wo, wbuf));
    const void* sp = materialize(so, sbuf);
    const void* bp = materialize(bo, bbuf);
    const void* gp = materialize(go, gbuf);
    const auto* tp = static_cast<const float*>(materialize(to, tbuf));
    const int64_t tstride = to.size == 1 ? 0 : 1;

    Scratch& sc = scratch();
    sc.idx.resize(out);
    sc.vals.resize(out);
    sc.xf.resize(std::max<int64_t>(in, 1));
    const int64_t nact = kt.collect_out[dt](
        gp, out, tp, tstride, sc.idx.data(), sc.vals.data(), y_ptr);
    if (nact == 0) {
      return;
    }
    kt.to_f32[dt](xp, in, sc.xf.data());
    const int64_t groups = in / group_size;
    sc.xgsum.assign(std::max<int64_t>(groups, 1), 0.0f);
    for (int64_t g = 0; g < groups; ++g) {
      for (int64_t i = g * group_size; i < (g + 1) * group_size; ++i) {
        sc.xgsum[g] += sc.xf[i];
      }
    }
    kt.qvmmsp_order_x(bits, group_size, sc.xf.data(), in);
    QVmmspJob job{
        kt.qvmmsp_rows[dt][sdt], wp, in, bits, group_size, sp, bp,
        sc.xf.data(), sc.xgsum.data(), sc.idx.data(), sc.vals.data(), nact,
        y_ptr};
    const int nth = threads_for(nact * in * bits / 8);
    if (nth <= 1 || nact < 8) {
      qvmmsp_task(&job, 0, 1);
      return;
    }
    const int ntasks = static_cast<int>(std::min<int64_t>(
        static_cast<int64_t>(nth) * kTasksPerThread, nact / 4));
    pool::run(ntasks, &qvmmsp_task, &job);
  });
}

void QuantizedPrimitive::eval_gpu(
    const std::vector<mx::array>&,
    std::vector<mx::array>&) {
  throw std::runtime_error(
      std::string("[") + name() + "] not implemented on GPU; use a CPU stream.");
}

void SparseInGemv::eval_gpu(
    const std::vector<mx::array>&,
    std::vector<mx::array>&) {
  throw std::runtime_error(
      "[SparseInGemv] not implemented on GPU; use a CPU stream.");
}

void SparseOutGateGemv::eval_gpu(
    const std::vector<mx::array>&,
    std::vector<mx::array>&) {
  throw std::runtime_error(
      "[SparseOutGateGemv] not implemented on GPU; use a CPU stream.");
}

} // namespace chess_mlx

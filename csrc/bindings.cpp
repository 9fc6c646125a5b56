// nanobind module chess_mlx._cpu_kernels. Must be built with the nanobind
// version MLX itself uses (3.1.0 for mlx 0.32.x) and NB_DOMAIN mlx, so that
// mx.array / mx.Stream arguments are recognised.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include "mlx/version.h"

#include "decode_ops.h"
#include "huge_pages.h"
#include "sparse_gemv.h"
#include "thread_pool.h"

namespace nb = nanobind;
using namespace nb::literals;

#define CHESS_MLX_STR2(x) #x
#define CHESS_MLX_STR(x) CHESS_MLX_STR2(x)

// Exact mlx.__version__ of the MLX installation built against (set by
// CMakeLists.txt); falls back to the header's major.minor.patch.
#ifndef CHESS_MLX_BUILT_MLX_VERSION
#define CHESS_MLX_BUILT_MLX_VERSION          \
  CHESS_MLX_STR(MLX_VERSION_MAJOR)           \
  "." CHESS_MLX_STR(MLX_VERSION_MINOR) "." CHESS_MLX_STR(MLX_VERSION_PATCH)
#endif

NB_MODULE(_cpu_kernels, m) {
  m.doc() = "CHESS sparse GEMV kernels for MLX on CPU (decode).";

  m.attr("built_mlx_version") = CHESS_MLX_BUILT_MLX_VERSION;

  m.def(
      "runtime_mlx_version",
      []() { return std::string(mx::version()); },
      "Version string reported by the libmlx loaded at runtime.");

  m.def(
      "sparse_in_gemv",
      &chess_mlx::sparse_in_gemv,
      "x"_a,
      "wt"_a,
      "threshold"_a,
      nb::kw_only(),
      "stream"_a = nb::none(),
      R"(Input-sparse GEMV ("spvmm").

        ``y[o] = sum_i (|x_i| >= t_i ? x_i : 0) * wt[i, o]``

        Only rows of ``wt`` whose input channel is kept are read.

        Args:
            x (array): ``[in]`` or ``[..., in]`` holding one row.
            wt (array): ``[in, out]`` (transposed ``nn.Linear`` weight),
              same dtype as ``x`` (float32, float16 or bfloat16).
            threshold (array): float32, 1 or ``in`` elements.
            stream: CPU stream or device (default: default CPU stream).

        Returns:
            array: ``x.shape[:-1] + [out]``, dtype of ``x``.)");

  m.def(
      "sparse_out_gate_gemv",
      &chess_mlx::sparse_out_gate_gemv,
      "x"_a,
      "w"_a,
      "gate"_a,
      "threshold"_a,
      nb::kw_only(),
      "stream"_a = nb::none(),
      R"(Output-sparse gated GEMV ("vmmsp").

        ``y[o] = gate_o * dot(w[o, :], x) if |gate_o| >= t_o else 0``

        Rows of ``w`` whose output is dropped are not read.

        Args:
            x (array): ``[in]`` or ``[..., in]`` holding one row.
            w (array): ``[out, in]`` (``nn.Linear`` weight), dtype of ``x``.
            gate (array): ``out`` elements (activated gate), dtype of ``x``.
            threshold (array): float32, 1 or ``out`` elements.
            stream: CPU stream or device (default: default CPU stream).

        Returns:
            array: ``x.shape[:-1] + [out]``, dtype of ``x``.)");

  m.def(
      "sparse_in_qgemv",
      &chess_mlx::sparse_in_qgemv,
      "x"_a,
      "wq"_a,
      "scales"_a,
      "biases"_a,
      "threshold"_a,
      "group_size"_a,
      "bits"_a,
      nb::kw_only(),
      "stream"_a = nb::none(),
      R"(Input-sparse GEMV on affine-quantized weights, input-major.

        Args:
            x (array): ``[in]`` or ``[..., in]`` holding one row.
            wq (array): uint32 ``[in, out * bits / 32]``: input channel i's
              codes for all outputs, packed along the outputs.
            scales, biases (array): ``[in / group_size, out]``, dtype of x.
            threshold (array): float32, 1 or ``in`` elements.
            group_size (int), bits (int): 4 or 8.

        Returns:
            array: ``x.shape[:-1] + [out]``, dtype of ``x``.)");

  m.def(
      "sparse_out_gate_qgemv",
      &chess_mlx::sparse_out_gate_qgemv,
      "x"_a,
      "wq"_a,
      "scales"_a,
      "biases"_a,
      "gate"_a,
      "threshold"_a,
      "group_size"_a,
      "bits"_a,
      nb::kw_only(),
      "stream"_a = nb::none(),
      R"(Output-sparse gated GEMV on MLX's QuantizedLinear layout.

        Args:
            x (array): ``[in]`` or ``[..., in]`` holding one row.
            wq (array): uint32 ``[out, in * bits / 32]`` (QuantizedLinear.weight).
            scales, biases (array): ``[out, in / group_size]``, dtype of x.
            gate (array): ``out`` elements, dtype of x.
            threshold (array): float32, 1 or ``out`` elements.
            group_size (int), bits (int): 4 or 8.

        Returns:
            array: ``x.shape[:-1] + [out]``, dtype of ``x``.)");

  m.def(
      "rms_norm",
      &chess_mlx::rms_norm,
      "x"_a,
      "w"_a,
      "eps"_a,
      nb::kw_only(),
      "stream"_a = nb::none(),
      R"(``mx.fast.rms_norm(x, w, eps)`` as one CPU op.)");

  m.def(
      "silu",
      &chess_mlx::silu,
      "x"_a,
      nb::kw_only(),
      "stream"_a = nb::none(),
      R"(``nn.silu(x)`` as one CPU op.)");

  m.def(
      "rope_one",
      &chess_mlx::rope_one,
      "x"_a,
      "inv_freqs"_a,
      "offset"_a,
      "scale"_a,
      "traditional"_a,
      nb::kw_only(),
      "stream"_a = nb::none(),
      R"(``mx.fast.rope`` of one position as one CPU op.

        Every row of ``x`` (its last axis is one head) is rotated by the
        angles ``offset * scale * inv_freqs``; ``inv_freqs`` is float32 of
        shape ``(dims / 2,)`` and entries past ``dims`` pass through.)");

  m.def(
      "attention_one",
      &chess_mlx::attention_one,
      "q"_a,
      "k"_a,
      "v"_a,
      "scale"_a,
      nb::kw_only(),
      "stream"_a = nb::none(),
      R"(``mx.fast.scaled_dot_product_attention`` of one query, no mask.

        Args:
            q (array): ``[B, 1, Hq, D]``.
            k (array): ``[B, Hkv, S, D]`` (any strides, e.g. a KV cache view).
            v (array): ``[B, Hkv, S, Dv]``.
            scale (float): multiplies q first.

        Returns:
            array: ``[B, 1, Hq, Dv]``, dtype of ``q``.)");

  m.def(
      "huge_page_copies",
      &chess_mlx::huge_page_copies,
      "arrays"_a,
      R"(Copies of ``arrays`` packed on transparent huge pages where the system has them.

        One 2 MiB aligned region, advised for huge pages before it is
        written (Linux), holds every copy (64-byte aligned); it is freed
        with the last of them. Elsewhere, or with THP disabled, they are
        ordinary copies. Evaluates the arrays.)");

  m.def(
      "release_free_memory",
      &chess_mlx::release_free_memory,
      "Returns the heap's free memory to the system (glibc malloc_trim).");

  m.def(
      "set_num_threads",
      &chess_mlx::pool::set_num_threads,
      "n"_a,
      "Threads used by the kernels (including MLX's stream thread); "
      "n <= 0 restores the default.");
  m.def(
      "get_num_threads",
      &chess_mlx::pool::num_threads,
      "Threads used by the kernels.");
  m.def(
      "kernel_isa",
      &chess_mlx::kernel_isa,
      "Instruction set of the kernels in use: 'avx512', 'avx2' or 'generic'.");
}

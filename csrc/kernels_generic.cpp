// Portable copy of the kernels (compiler baseline ISA, e.g. SSE2 on x86-64,
// NEON on arm64) plus the runtime selection of the best copy.
#define CHESS_MLX_KERNEL_NS generic
#define CHESS_MLX_KERNEL_TABLE table_generic
#define CHESS_MLX_KERNEL_ISA "generic"
#include "kernels_impl.h"

#include <cstdlib>
#include <cstring>

namespace chess_mlx::kernels {

namespace {

const Table& select_table() {
  const char* force = std::getenv("CHESS_MLX_ISA");
  if (force != nullptr && std::strcmp(force, "generic") == 0) {
    return table_generic();
  }
#if defined(CHESS_MLX_HAVE_AVX2_TU)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") &&
      __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
      __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (avx512 && !(force != nullptr && std::strcmp(force, "avx2") == 0)) {
    return table_avx512();
  }
  if (avx2) {
    return table_avx2();
  }
#endif
  return table_generic();
}

} // namespace

const Table& best() {
  static const Table& t = select_table();
  return t;
}

} // namespace chess_mlx::kernels

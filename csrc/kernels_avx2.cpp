// x86-64 copy of the kernels, compiled with -mavx2 -mfma -mf16c (see
// CMakeLists.txt) and only called when the CPU reports those features.
#define CHESS_MLX_KERNEL_NS avx2
#define CHESS_MLX_KERNEL_TABLE table_avx2
#define CHESS_MLX_KERNEL_ISA "avx2"
#include "kernels_impl.h"

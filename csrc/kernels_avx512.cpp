// x86-64 copy of the kernels with AVX-512 (F, BW, VL, DQ) on top of the AVX2
// copy's -mavx2 -mfma -mf16c (see CMakeLists.txt), only called when the CPU
// reports all of them. The 4-bit paths read 32 codes per instruction where
// the AVX2 copy reads 16: the quantized GEMVs are bound by arithmetic, not
// memory, on CPUs with full-width AVX-512 units.
#define CHESS_MLX_KERNEL_NS avx512
#define CHESS_MLX_KERNEL_TABLE table_avx512
#define CHESS_MLX_KERNEL_ISA "avx512"
#include "kernels_impl.h"

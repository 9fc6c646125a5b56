// Weights on transparent huge pages (Linux). A decode step streams every
// weight once, and a sparse GEMV reads scattered 1 KiB rows, which on 4 KiB
// pages costs a page walk every few kept rows (the whole model is far
// beyond the TLB's reach); 2 MiB pages remove nearly all of them.
#pragma once

#include <vector>

#include "mlx/array.h"

namespace mx = mlx::core;

namespace chess_mlx {

// Copies of `arrays` (evaluated here) packed into one region of memory
// advised for transparent huge pages: 2 MiB aligned, madvise(MADV_HUGEPAGE)
// before the first touch, each copy 64-byte aligned. The region is freed
// with the last copy. Without transparent huge pages (not Linux, or THP
// disabled) they are ordinary copies.
std::vector<mx::array> huge_page_copies(const std::vector<mx::array>& arrays);

// Returns the heap's free memory to the system (glibc's malloc_trim; a
// no-op elsewhere). glibc keeps the arrays the copies replaced, freed
// inside its heap, as part of the process's resident memory otherwise.
void release_free_memory();

} // namespace chess_mlx

#include "huge_pages.h"

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <new>

#include "mlx/allocator.h"
#include "mlx/ops.h"
#include "mlx/transforms.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__GLIBC__)
#include <malloc.h>
#endif

namespace chess_mlx {

namespace {

#if defined(__linux__)
constexpr size_t kHugePage = size_t{2} << 20;
constexpr size_t kAlign = 64;

size_t round_up(size_t n, size_t to) {
  return (n + to - 1) / to * to;
}

// Anonymous memory at a kHugePage boundary, unmapped with the last owner.
class Region {
 public:
  explicit Region(size_t bytes) : bytes_(round_up(bytes, kHugePage)) {
    // mmap with a huge page of slack, then unmap what lies outside.
    const size_t slack = bytes_ + kHugePage;
    void* p = mmap(nullptr, slack, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
      throw std::bad_alloc();
    }
    const auto start = reinterpret_cast<uintptr_t>(p);
    const uintptr_t aligned = round_up(start, kHugePage);
    if (aligned > start) {
      munmap(p, aligned - start);
    }
    if (start + slack > aligned + bytes_) {
      munmap(reinterpret_cast<void*>(aligned + bytes_), start + slack - aligned - bytes_);
    }
    base_ = reinterpret_cast<char*>(aligned);
    // Advice only: without THP the pages stay 4 KiB, and the copies work.
    madvise(base_, bytes_, MADV_HUGEPAGE);
  }
  Region(const Region&) = delete;
  Region& operator=(const Region&) = delete;
  ~Region() {
    munmap(base_, bytes_);
  }
  char* base() const {
    return base_;
  }

 private:
  size_t bytes_;
  char* base_;
};

// Bytes an MLX buffer keeps before its data (the CPU allocator stores the
// size there); read from Buffer::raw_ptr, which only offsets the pointer.
ptrdiff_t buffer_header() {
  alignas(kAlign) static char probe[kAlign];
  mx::allocator::Buffer b(probe);
  return static_cast<char*>(b.raw_ptr()) - probe;
}

// The arrays' copies in one Region, or an empty vector where MLX's buffers
// do not look as expected (then nothing is kept).
std::vector<mx::array> copy_to_region(const std::vector<mx::array>& src) {
  const ptrdiff_t header = buffer_header();
  if (header < 0 || static_cast<size_t>(header) > kAlign) {
    return {};
  }
  // Each copy's data at a multiple of kAlign with room for the header.
  std::vector<size_t> offsets;
  size_t end = 0;
  for (const auto& a : src) {
    offsets.push_back(round_up(end + header, kAlign));
    end = offsets.back() + a.nbytes();
  }
  auto region = std::make_shared<Region>(end);
  std::vector<mx::array> out;
  for (size_t i = 0; i < src.size(); ++i) {
    char* data = region->base() + offsets[i];
    if (header == sizeof(size_t)) {
      *reinterpret_cast<size_t*>(data - header) = src[i].nbytes();
    }
    std::memcpy(data, src[i].data<void>(), src[i].nbytes());
    mx::allocator::Data owned(
        mx::allocator::Buffer(data - header),
        [region](mx::allocator::Buffer) {});
    out.emplace_back(std::move(owned), src[i].shape(), src[i].dtype());
    if (out.back().data<void>() != data) {
      return {};
    }
  }
  return out;
}
#endif

} // namespace

std::vector<mx::array> huge_page_copies(const std::vector<mx::array>& arrays) {
  if (arrays.empty()) {
    return {};
  }
  std::vector<mx::array> src;
  for (const auto& a : arrays) {
    src.push_back(mx::contiguous(a));
  }
  mx::eval(src);
#if defined(__linux__)
  if (auto out = copy_to_region(src); !out.empty()) {
    return out;
  }
#endif
  std::vector<mx::array> out;
  for (const auto& a : src) {
    out.push_back(mx::copy(a));
  }
  mx::eval(out);
  return out;
}

void release_free_memory() {
#if defined(__GLIBC__)
  malloc_trim(0);
#endif
}

} // namespace chess_mlx

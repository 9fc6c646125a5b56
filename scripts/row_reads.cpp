// What scattered rows cost this machine's memory system.
//
//   g++ -O2 -march=native -pthread scripts/row_reads.cpp -o row_reads && ./row_reads
//   ./row_reads 2048          # rows of 2 KiB (default 1024: a 2048-wide 4-bit row)
//   ./row_reads 1024 arith    # with the input-sparse 4-bit GEMV's arithmetic
//
// Two threads read rows of a matrix (8 MiB, 32 copies so the last-level cache
// holds none) the way the input-sparse GEMVs read kept rows: 64-byte lines,
// each line of a row read while the same line of a row 8 kept rows ahead is
// prefetched. Plain: one row after the other, each line only summed.
// arith (AVX-512 only): as the kernel, passes of 8 rows read line by line,
// each line's 128 codes unpacked, converted to floats and multiplied into
// the even/odd sums of their outputs. Placements of the rows read:
// all, a random half (as CHESS's per-channel masks keep them), runs of 8
// rows, the first half. Prints the median microseconds per matrix and the
// median of its time over reading every row in the same rep.
#include <immintrin.h>
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

namespace {

constexpr size_t kMatrixBytes = 8 << 20;
constexpr int kCopies = 32;
constexpr int kAhead = 8;

// Sums the 32-bit words of the rows idx[0..n) (each row_bytes long) so that
// nothing is optimized away.
uint32_t read_rows(const char* base, const int* idx, int n, size_t row_bytes) {
  __m256i acc = _mm256_setzero_si256();
  for (int k = 0; k < n; ++k) {
    const char* row = base + idx[k] * row_bytes;
    const char* ahead = k + kAhead < n ? base + idx[k + kAhead] * row_bytes : nullptr;
    for (size_t line = 0; line < row_bytes; line += 64) {
      if (ahead != nullptr) {
        _mm_prefetch(ahead + line, _MM_HINT_T0);
      }
      acc = _mm256_add_epi32(acc, _mm256_load_si256(reinterpret_cast<const __m256i*>(row + line)));
      acc = _mm256_add_epi32(acc, _mm256_load_si256(reinterpret_cast<const __m256i*>(row + line + 32)));
    }
  }
  alignas(32) uint32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), acc);
  uint32_t sum = 0;
  for (uint32_t lane : lanes) {
    sum += lane;
  }
  return sum;
}

#if defined(__AVX512F__)
// The rows idx[0..n) in passes of kAhead rows, as the input-sparse 4-bit GEMV
// reads them: line by line across the pass's rows, the next pass's lines
// prefetched meanwhile, every 16 bytes of codes unpacked, converted and
// multiplied into the even/odd sums of their 32 outputs (float32, in L1).
uint32_t read_rows_arith(const char* base, const int* idx, int n, size_t row_bytes) {
  static thread_local std::vector<float> sums;
  sums.assign(2 * row_bytes, 0.0f);  // two 4-bit codes a byte
  for (int k = 0; k < n; k += kAhead) {
    const int rows = n - k < kAhead ? n - k : kAhead;
    for (size_t line = 0; line < row_bytes; line += 64) {
      for (int r = k + kAhead; r < k + 2 * kAhead && r < n; ++r) {
        _mm_prefetch(base + idx[r] * row_bytes + line, _MM_HINT_T0);
      }
      for (size_t q = line; q < line + 64; q += 16) {
        float* out = sums.data() + 2 * q;
        __m512 even = _mm512_loadu_ps(out);
        __m512 odd = _mm512_loadu_ps(out + 16);
        for (int r = 0; r < rows; ++r) {
          const char* codes = base + idx[k + r] * row_bytes + q;
          const __m512 v = _mm512_set1_ps(1e-3f * static_cast<float>(r + 1));
          const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes)));
          even = _mm512_fmadd_ps(v, _mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(15))), even);
          odd = _mm512_fmadd_ps(v, _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4)), odd);
        }
        _mm512_storeu_ps(out, even);
        _mm512_storeu_ps(out + 16, odd);
      }
    }
  }
  float total = 0;
  for (float sum : sums) total += sum;
  return static_cast<uint32_t>(total);
}
#endif

std::vector<int> placement(const char* name, int rows, std::mt19937& rng) {
  std::vector<int> idx;
  if (std::strcmp(name, "all") == 0) {
    for (int i = 0; i < rows; ++i) idx.push_back(i);
  } else if (std::strcmp(name, "random half") == 0) {
    std::vector<int> all(rows);
    for (int i = 0; i < rows; ++i) all[i] = i;
    std::shuffle(all.begin(), all.end(), rng);
    idx.assign(all.begin(), all.begin() + rows / 2);
    std::sort(idx.begin(), idx.end());
  } else if (std::strcmp(name, "runs of 8") == 0) {
    std::vector<int> runs(rows / 8);
    for (int i = 0; i < rows / 8; ++i) runs[i] = i;
    std::shuffle(runs.begin(), runs.end(), rng);
    runs.resize(rows / 16);
    std::sort(runs.begin(), runs.end());
    for (int r : runs)
      for (int i = 0; i < 8; ++i) idx.push_back(8 * r + i);
  } else {
    for (int i = 0; i < rows / 2; ++i) idx.push_back(i);
  }
  return idx;
}

}  // namespace

int main(int argc, char** argv) {
  const size_t row_bytes = argc > 1 ? std::strtoul(argv[1], nullptr, 10) : 1024;
  if (row_bytes < 64 || row_bytes % 64 != 0 || row_bytes > kMatrixBytes / 16) {
    std::fprintf(stderr, "row bytes must be a multiple of 64 from 64 to %zu\n", kMatrixBytes / 16);
    return 2;
  }
  const bool arith = argc > 2 && std::strcmp(argv[2], "arith") == 0;
  if (argc > 2 && !arith) {
    std::fprintf(stderr, "the second argument is 'arith' or nothing\n");
    return 2;
  }
#if defined(__AVX512F__)
  const auto read = arith ? read_rows_arith : read_rows;
#else
  if (arith) {
    std::fprintf(stderr, "arith needs AVX-512\n");
    return 2;
  }
  const auto read = read_rows;
#endif
  const int rows = static_cast<int>(kMatrixBytes / row_bytes);
  const size_t bytes = kMatrixBytes * kCopies;
  char* buffer = static_cast<char*>(std::aligned_alloc(2 << 20, bytes));
  madvise(buffer, bytes, MADV_HUGEPAGE);  // as decode's weights
  std::memset(buffer, 1, bytes);
  std::mt19937 rng(1);
  const char* names[] = {"all", "random half", "runs of 8", "first half"};
  constexpr int kPlacements = 4;
  constexpr int kReps = 15;
  std::vector<std::vector<int>> idx[kPlacements];
  for (int p = 0; p < kPlacements; ++p)
    for (int c = 0; c < kCopies; ++c) idx[p].push_back(placement(names[p], rows, rng));
  // The placements take turns within each rep, so a change of the machine's
  // speed falls on all of them; ratios are paired per rep.
  std::vector<double> us[kPlacements];
  volatile uint32_t sink = 0;
  for (int rep = 0; rep < kReps; ++rep) {
    for (int p = 0; p < kPlacements; ++p) {
      uint32_t sums[2] = {0, 0};
      const auto start = std::chrono::steady_clock::now();
      auto work = [&](int half) {
        for (int c = 0; c < kCopies; ++c) {
          const int n = static_cast<int>(idx[p][c].size());
          const int begin = half == 0 ? 0 : n / 2, end = half == 0 ? n / 2 : n;
          sums[half] += read(buffer + c * kMatrixBytes, idx[p][c].data() + begin, end - begin, row_bytes);
        }
      };
      std::thread other(work, 1);
      work(0);
      other.join();
      us[p].push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count() /
                      kCopies);
      sink = sink + sums[0] + sums[1];
    }
  }
  const auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  for (int p = 0; p < kPlacements; ++p) {
    std::vector<double> ratio;
    for (int rep = 0; rep < kReps; ++rep) ratio.push_back(us[p][rep] / us[0][rep]);
    const double m = median(us[p]);
    std::printf("%s%4zu-byte rows, %-11s %7.1f us per 8 MiB matrix, %.2f of all (%.1f GB/s)\n", arith ? "arith, " : "", row_bytes, names[p], m,
                median(ratio), idx[p][0].size() * row_bytes / m / 1e3);
  }
  std::free(buffer);
  return 0;
}
